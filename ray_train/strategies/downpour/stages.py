"""Pipelined Downpour replicas (--stages with --strategy async; docs/pipeline.md): each replica is
S stage actors in a line (ray_train/worker/pipeline.py), and each stage fetches and pushes only
its own parameter slice, to the shards that hold it (DistBelief's figure: a model's partitions
talk to the parameter server independently). Activations and gradients move between a replica's
neighbouring stages over a process group of that replica's stages only.

To the engine a pipelined replica is one actor, a ``PipelinedReplica``: it creates its stage
actors and runs a chunk on all of them. When a stage dies the replica ends its own process, so
Ray restarts it like any Downpour replica; ``setup`` then builds fresh stages, which fetch their
slices again (the lost stages, owned by the dead process, go with it)."""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from ray_train.cluster import ReplicaContext, actor_class
from ray_train.config import TrainConfig
from ray_train.data.dataset import Dataset
from ray_train.strategies.downpour.replica import ShardClient
from ray_train.worker.batches import shard_batches, steps_per_epoch
from ray_train.worker.pipeline import Stage, StageContext
from ray_train.worker.stages import cut

DEATH_WAIT_S = 30.0  # how long a stage's error waits to learn whether a neighbour died (Ray says so in ~1 s)


def stage_bounds(model: torch.nn.Module, cfg: TrainConfig, example: torch.Tensor) -> list[tuple[int, int]]:
    """Each stage's [lo, hi) in the network's flat parameter vector (stages are consecutive layers,
    so their slices are consecutive too)."""
    out, lo = [], 0
    for part in cut(model, cfg.pipeline.stages, cfg.pipeline.split_names, example):
        n = sum(p.numel() for _, m in part for p in m.parameters() if p.requires_grad)
        out.append((lo, lo + n))
        lo += n
    return out


def aligned_shards(stages: list[tuple[int, int]], shards: int) -> list[list[tuple[int, int]]]:
    """``shards`` shards (at least one per stage with parameters) cut inside the stages' slices, so
    that no shard straddles two stages: per stage, its shards' global bounds."""
    from ray_train.strategies.downpour.parameter_server import split_bounds

    sizes = [hi - lo for lo, hi in stages]
    owners = [s for s, n in enumerate(sizes) if n]
    count = {s: 1 for s in owners}
    for _ in range(shards - len(owners)):  # each further shard to the stage with the largest shards
        count[max(owners, key=lambda s: sizes[s] / count[s])] += 1
    out = []
    for s, (lo, hi) in enumerate(stages):
        k = min(count.get(s, 0), hi - lo)
        out.append([(lo + a, lo + b) for a, b in split_bounds(hi - lo, k)] if k else [])
    return out


class AsyncStage(ShardClient, Stage):
    """One stage of a pipelined Downpour replica: the pipeline's forward and backward, then its own
    slice's fetches and pushes (the rhythm n_fetch / n_push of a Downpour replica)."""

    def __init__(self, ctx: StageContext, cfg: TrainConfig, data: Dataset, model) -> None:
        super().__init__(ctx, cfg, data, model)
        self.flat = torch.cat([p.detach().reshape(-1) for p in self.params]) if self.params else torch.zeros(0)
        offset = 0
        for p in self.params:
            p.data = self.flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.init_client()
        self.spe = steps_per_epoch(len(data.y_train), ctx.replicas, cfg.run.batch_size)
        self.local_epoch = -1

    def run(self, start: int, n: int) -> dict:
        step_ms = np.empty(n, dtype=np.float32)
        wait_ms = np.empty(n, dtype=np.float32)
        loss_sum, correct, pushes, sent = 0.0, 0, 0, 0
        for i, s in enumerate(range(start, start + n)):
            t0 = time.perf_counter()
            epoch, pos = divmod(s, self.spe)
            if epoch != self.local_epoch:
                self.batches = shard_batches(len(self.data.y_train), self.ctx.replicas, self.ctx.replica,
                                             self.cfg.run.batch_size, self.cfg.run.seed, epoch)
                self.local_epoch = epoch
            if self.since_fetch == 0 and self.shards:
                self.fetch()
            loss, hits, waited, nbytes = self.step(self.batches[pos])
            loss_sum, correct, sent = loss_sum + loss, correct + hits, sent + nbytes
            wait_ms[i] = waited * 1e3
            self.acc += self.grad
            self.since_fetch = (self.since_fetch + 1) % self.n_fetch
            self.since_push += 1
            if self.since_push == self.n_push:
                if self.shards:
                    self.push()
                    pushes += 1
                self.since_push = 0
                self.acc.zero_()
            step_ms[i] = (time.perf_counter() - t0) * 1e3
        self.settle()
        errors, self.shard_errors = self.shard_errors, []
        moved, self.comm_bytes = self.comm_bytes, 0
        return {"loss_sum": loss_sum, "correct": correct, "samples": n * self.cfg.run.batch_size if self.last else 0,
                "step_ms": step_ms, "pushes": pushes, "versions": self.seen.copy(), "shard_errors": errors,
                "comm_bytes": moved + sent, "stage": self.ctx.stage, "wait_ms": wait_ms, "act_bytes": sent,
                "pid": os.getpid()}


class PipelinedReplica:
    """What the Downpour engine drives as replica ``ctx.rank``: S AsyncStage actors in bundles
    ``rank*S .. rank*S+S-1`` of the run's placement group."""

    def __init__(self, ctx: ReplicaContext, cfg: TrainConfig, model, pg=None) -> None:
        self.ctx, self.cfg, self.model, self.pg = ctx, cfg, model, pg
        self.stages: list = []
        self.transports: list = []

    def setup(self, data_ref: list, shards: list[list], bounds: list[list[tuple[int, int]]], gate=None) -> list[str]:
        """Start this replica's stages (again, after a restart), connect them in a line and to the
        shards of their slices; each shard's transport, in the engine's shard order.
        ``data_ref`` is the dataset's reference in a list, so that it reaches the stages unresolved."""
        import ray

        for actor in self.stages:
            ray.kill(actor)
        c, S = self.ctx, self.cfg.pipeline.stages
        self.stages = [
            actor_class(AsyncStage, num_cpus=c.num_cpus, pg=self.pg, bundle=c.rank * S + s if self.pg else None).remote(
                StageContext(c.rank, c.world_size, s, S, c.num_cpus, c.seed), self.cfg, data_ref[0], self.model)
            for s in range(S)]
        info = ray.get([a.info.remote() for a in self.stages])
        port = ray.get(self.stages[0].free_port.remote())
        ray.get([a.connect.remote(info[0]["address"], port, True) for a in self.stages])
        kinds = ray.get([a.attach.remote(shards[s], [(lo - bounds[s][0][0], hi - bounds[s][0][0]) for lo, hi in bounds[s]])
                         if shards[s] else a.attach.remote([], [])
                         for s, a in enumerate(self.stages)])
        self.transports = [k for per in kinds for k in per]
        return self.transports

    def info(self) -> dict:
        import ray

        # the node of the process that drives the stages (summary.json ``nodes``)
        return {"pid": os.getpid(), "rank": self.ctx.rank, "transports": self.transports,
                "node_id": ray.get_runtime_context().get_node_id()}

    @staticmethod
    def _a_stage_died(pending: list) -> bool:
        """Whether one of the stages still running ``pending`` died (waits up to DEATH_WAIT_S for them)."""
        import ray

        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=DEATH_WAIT_S)
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                return True
            except ray.exceptions.RayError:
                pass
        return False

    def run(self, start: int, n: int) -> dict:
        """Steps ``start .. start+n-1`` on every stage. A stage's death ends this process, so that
        Ray restarts the replica (its neighbours would wait on it until the process group's timeout)."""
        import ray

        refs, results = [a.run.remote(start, n) for a in self.stages], {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                results[ready[0]] = ray.get(ready[0])
            except ray.exceptions.RayActorError:
                os._exit(1)
            except ray.exceptions.RayTaskError:
                # a neighbour's death often shows first as a broken gloo connection in a live stage
                if self._a_stage_died(pending):
                    os._exit(1)
                raise
        parts = [results[r] for r in refs]
        last = parts[-1]
        step_ms = np.max(np.stack([p["step_ms"] for p in parts]), axis=0)
        offsets = np.cumsum([0] + [len(p["versions"]) for p in parts])
        return {"loss_sum": last["loss_sum"], "correct": last["correct"], "samples": last["samples"],
                "step_ms": step_ms, "rank": self.ctx.rank, "pushes": sum(p["pushes"] for p in parts),
                "versions": np.concatenate([p["versions"] for p in parts]),
                "shard_errors": [int(offsets[s] + k) for s, p in enumerate(parts) for k in p["shard_errors"]],
                "pid": os.getpid(), "comm_bytes": sum(p["comm_bytes"] for p in parts),
                "stage_results": [{k: p[k] for k in ("stage", "step_ms", "wait_ms", "act_bytes")} for p in parts],
                "stage_pids": [p["pid"] for p in parts]}
