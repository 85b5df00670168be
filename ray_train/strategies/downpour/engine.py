"""Asynchronous Downpour SGD (DistBelief, Dean et al. 2012): parameter shards own the model and
its optimizer; replicas fetch parameters and push gradients at their own pace; the driver only
hands out chunks of steps and heals failures in place (Ray restarts a dead replica or shard, the
replica's lost steps go to the others, a shard comes back from its snapshot).

An epoch here is an epoch-equivalent: the training set once, by all replicas together. The driver
never waits on a barrier: it ``ray.wait``s on whichever replica chunk (or restarted replica) is
ready first and keeps two chunks queued per replica, so none idles while the loop evaluates a
parameter snapshot or checkpoints."""
from __future__ import annotations

import os
import time

import numpy as np
import ray
import torch

from ray_train.cluster import ReplicaContext, actor_class, check_resources, first_ready, reserve, retried
from ray_train.config import TrainConfig
from ray_train.engine import Chunk, Engine
from ray_train.errors import ConfigError, StorageError
from ray_train.run import storage
from ray_train.run.failure import Decision
from ray_train.strategies.downpour.parameter_server import ParameterShard, StalenessGate, decay_ranges, split_bounds
from ray_train.strategies.driver_model import DriverModel
from ray_train.worker.batches import steps_per_epoch
from ray_train.worker.pipeline_group import StageMetrics
from ray_train.worker.stages import bubble

QUEUE = 2  # chunks queued per replica
REJOIN_WAIT_S = 60.0  # at the end of a run, how long to wait for a replica restart under way


def flat_params(model: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]).numpy()


def _adopted(failure: dict, info: dict) -> None:
    """A restarted shard that took a replica's copy of its slice (ParameterShard.offer) lost only
    the updates between that copy and the newest version any replica saw acknowledged."""
    if info.get("adopted_version") is not None:
        lost = max(0, int(info["seen_before"]) - int(info["adopted_version"]))
        failure.update(adopted_version=int(info["adopted_version"]), updates_lost=lost, updates_lost_min=lost)


def _storage_failure(exc: BaseException) -> str | None:
    """The one line of a shard's StorageError: from its method (Ray's wrapper is an instance of
    it) or from its constructor (the actor's death carries it as text only)."""
    if isinstance(exc, StorageError):
        return str(getattr(exc, "cause", None) or exc)
    mark = f"{StorageError.__name__}: "
    lines = [ln.split(mark, 1)[1].strip() for ln in str(exc).splitlines() if mark in ln]
    return lines[-1] if lines else None


class Downpour:
    """The actors of one async run: shards, the optional staleness gate, replicas. Every actor gets
    its large values (parameters, data) by a method call after construction."""

    def __init__(self, cfg: TrainConfig, data_ref, factory, model: torch.nn.Module,
                 snapshot_dir: str | None = None, states: list[dict] | None = None, replica_cls=None,
                 stage_shards: list[list[tuple[int, int]]] | None = None) -> None:
        self.replicas, self.shards, self.gate, self.pg = [], [], None, None
        try:
            self._start(cfg, data_ref, factory, model, snapshot_dir, states, replica_cls, stage_shards)
        except BaseException:
            self.shutdown()  # a factory failing in the replicas must not leave shards or the reservation
            raise

    def _start(self, cfg, data_ref, factory, model, snapshot_dir, states, replica_cls, stage_shards) -> None:
        from ray_train.strategies.downpour.replica import AsyncReplica
        from ray_train.strategies.downpour.stages import PipelinedReplica

        a, res = cfg.async_, cfg.resources
        flat = flat_params(model)
        # Pipelined replicas (``stage_shards``: per stage, its shards' bounds): no shard straddles two stages.
        self.stage_shards = stage_shards
        self.bounds = [b for per in stage_shards for b in per] if stage_shards else split_bounds(len(flat), a.ps_shards)
        self.shards = []
        for k, (lo, hi) in enumerate(self.bounds):
            path = os.path.join(snapshot_dir, f"shard-{k}.pt") if snapshot_dir else None
            if path and storage.exists(path):
                storage.remove(path)  # a snapshot of an earlier run must not look like a crash
            self.shards.append(actor_class(ParameterShard, num_cpus=a.ps_cpus, max_restarts=cfg.run.max_failures).remote(
                k, hi - lo, cfg.optim, decay_ranges(model, lo, hi), a.staleness_lr, path, a.snapshot_every_s))
        try:
            ray.get([s.load.remote(states[k]) if states else s.assign.remote(flat[lo:hi])
                     for k, (s, (lo, hi)) in enumerate(zip(self.shards, self.bounds))])
        except (StorageError, ray.exceptions.RayActorError) as exc:  # a shard that cannot reach --storage
            message = _storage_failure(exc)
            if message is None:
                raise
            for shard in self.shards:
                ray.kill(shard, no_restart=True)
            raise StorageError(message) from None
        self.gate = None
        if a.max_staleness is not None:
            self.gate = actor_class(StalenessGate, num_cpus=0, max_concurrency=1000).remote(a.max_staleness)
        self.pg = reserve(res, count=res.replicas * cfg.pipeline.stages)
        self.data_ref = data_ref
        contexts = [ReplicaContext(r, res.replicas, res.cpus_per_replica, res.gpus_per_replica, cfg.run.seed)
                    for r in range(res.replicas)]
        if stage_shards:  # each replica's stage actors take its bundles; it holds no CPU itself
            self.replicas = [actor_class(PipelinedReplica, num_cpus=0, max_restarts=cfg.run.max_failures).remote(
                ctx, cfg, factory, self.pg) for ctx in contexts]
        else:
            self.replicas = [actor_class(replica_cls or AsyncReplica, num_cpus=res.cpus_per_replica,
                                         num_gpus=res.gpus_per_replica, pg=self.pg, bundle=ctx.rank,
                                         max_restarts=cfg.run.max_failures).remote(ctx, cfg, factory)
                             for ctx in contexts]
        # A constructor that failed (the user's factory) is reported as the actor's death here, once;
        # the retried setup below would resubmit to it and have Ray print every attempt.
        ray.get([r.info.remote() for r in self.replicas])
        if a.transport == "shm":
            self._check_one_node()
        # per replica, each shard's transport: "shm" (same node) or "ray"
        self.transports = ray.get([self.setup(r) for r in range(res.replicas)])

    def _check_one_node(self) -> None:
        """async.transport = shm: every replica and shard must share one node (auto falls back)."""
        nodes = {i["node_id"] for i in ray.get([s.info.remote() for s in self.shards] +
                                                [r.info.remote() for r in self.replicas])}
        if len(nodes) > 1:
            self.shutdown()
            raise ConfigError(f"async.transport: shm needs every replica and parameter shard on one node, "
                              f"but they run on {len(nodes)} nodes; use auto (shared memory where a shard "
                              f"shares a replica's node, Ray calls elsewhere) or ray")

    def setup(self, rank: int):
        """(Re)connect replica ``rank`` to the data and the shards; returns the call's ref."""
        if self.stage_shards:
            per, k = [], 0
            for bounds in self.stage_shards:
                per.append(self.shards[k : k + len(bounds)])
                k += len(bounds)
            return retried(self.replicas[rank].setup).remote([self.data_ref], per, self.stage_shards)
        return retried(self.replicas[rank].setup).remote(self.data_ref, self.shards, self.bounds, self.gate)

    def params(self) -> np.ndarray:
        """A consistent-enough snapshot for evaluation: each shard's current slice."""
        for attempt in range(3):
            try:
                refs = [inner for _, (inner,) in ray.get([retried(s.pull_ref).remote() for s in self.shards])]
                return np.concatenate(ray.get(refs))
            except ray.exceptions.RayError:  # a shard died after answering: its object went with it
                if attempt == 2:
                    raise

    def set_lr(self, lr: float) -> None:
        ray.get([retried(s.set_lr).remote(lr) for s in self.shards])

    def shutdown(self) -> None:
        from ray_train.cluster import release

        for actor in [*self.replicas, *self.shards, *([self.gate] if self.gate else [])]:
            ray.kill(actor, no_restart=True)
        if self.pg is not None:
            release(self.pg)
            self.pg = None


class DownpourEngine(DriverModel, Engine):
    overlaps_evaluation = True
    hooks = None  # tests: hooks(event, progress) sees every completed chunk (to inject faults)

    def epoch_steps(self) -> int:
        return steps_per_epoch(len(self.ctx.data.y_train), 1, self.ctx.cfg.run.batch_size)

    # -- start and the epoch ---------------------------------------------------------------------
    def start(self, state: dict | None) -> None:
        cfg, ctx = self.ctx.cfg, self.ctx
        with torch.random.fork_rng():  # the replicas' initial model, seeded the same way
            torch.manual_seed(cfg.run.seed)
            self.model = ctx.model()
        n_params, a = len(flat_params(self.model)), cfg.async_
        if a.ps_shards > n_params:  # known only once the model is: raised before any actor starts
            raise ConfigError(f"async.ps_shards: {a.ps_shards} shards for {cfg.model.name}'s {n_params} "
                              f"parameters; allowed: 1..{n_params}")
        stage_shards = None
        if cfg.pipeline.stages > 1:
            from ray_train.strategies.downpour.stages import aligned_shards, stage_bounds
            from ray_train.worker.batches import to_tensor

            stage_shards = aligned_shards(stage_bounds(self.model, cfg, to_tensor(ctx.data.x_train[:2])), a.ps_shards)
        shards = sum(len(b) for b in stage_shards) if stage_shards else a.ps_shards
        check_resources(cfg.resources, shards=shards, shard_cpus=a.ps_cpus, stages=cfg.pipeline.stages)
        self.spe = self.epoch_steps()
        self.total, n = cfg.run.epochs * self.spe, cfg.resources.replicas
        self.done, self.rank_done, self.restarts = 0, [0] * n, 0
        if state:
            self.done, self.rank_done, self.restarts = int(state["done"]), list(state["rank_done"]), int(state["restarts"])
        self.actors = Downpour(cfg, ctx.data_ref, ctx.model, self.model, os.path.join(ctx.run_dir, "ps"),
                               state["shards"] if state else None, stage_shards=stage_shards)
        self.rank_next = list(self.rank_done)
        self.inflight: dict = {}  # chunk ref -> (rank, start, steps)
        self.rejoining: dict = {}  # setup ref of a restarting replica -> rank
        self.to_issue = self.total - self.done
        self.seen = np.zeros(shards, dtype=np.int64)
        self.gated: set[int] = set()  # replicas the staleness gate waits for
        self.lost: set[int] = set()  # replicas whose restarts are used up
        infos = ray.get([r.info.remote() for r in self.actors.replicas])
        self.pids = {i["rank"]: i["pid"] for i in infos}
        self.replica_nodes = {i["rank"]: i.get("node_id") for i in infos}  # None while a replica is down
        self.shard_pids = {i["index"]: i["pid"] for i in ray.get([s.info.remote() for s in self.actors.shards])}
        self.lr, self.updates0, self.window_t, self.t_first, self.steps = None, 0.0, None, None, {}
        self.stage_metrics = StageMetrics(cfg.pipeline.stages) if stage_shards else None
        self.stage_pids: dict[int, list[int]] = {}  # pipelined replicas: rank -> its stage actors' pids
        self.warm_steps = self.spe if a.warm_start_steps is None else a.warm_start_steps
        self.warm = self.warm_steps > self.done
        self.active = {0} if self.warm else set(range(n))
        stages = f" of {cfg.pipeline.stages} stages" if stage_shards else ""
        ctx.sink.say(f"async SGD (Downpour): {n} replicas{stages}, {shards} parameter shards, fetch every {a.n_fetch}, "
                     f"push every {a.n_push} steps, transport {self.transport()}"
                     + (f", warm start {self.warm_steps} steps on replica 0" if self.warm else ""))

    def transport(self) -> str:
        """shm, ray, or mixed (some replica-shard pairs on different nodes), as set up at start."""
        kinds = {k for per in self.actors.transports for k in per if k is not None}
        return kinds.pop() if len(kinds) == 1 else "mixed" if kinds else "none"

    def train_epoch(self, epoch, lr, start, on_chunk, should_stop) -> bool:
        if lr != self.lr:
            self.actors.set_lr(lr)
            self.lr = lr
        self.window_t = self.window_t or time.perf_counter()
        self.t_first = self.t_first or self.window_t
        boundary, stopping = min((epoch + 1) * self.spe, self.total), False
        while self.done < boundary:
            stopping = stopping or should_stop()
            if not stopping:
                self._fill()
            if not self.inflight and (stopping or not self.rejoining):
                if stopping:
                    return False
                raise RuntimeError("async SGD: every replica is dead and none could be restarted")
            ref = first_ready({} if stopping else self.rejoining, self.inflight)
            if ref in self.rejoining:
                self._rejoin(ref)
            else:
                self._chunk_done(ref, on_chunk)
            if self.warm and self.done >= self.warm_steps:
                self.warm = False
                self.active |= set(range(self.ctx.cfg.resources.replicas)) - set(self.rejoining.values()) - self.lost
        self._end_epoch()
        return True

    def _fill(self) -> None:
        """Keep QUEUE chunks queued on every live replica while steps remain to hand out. The
        gate counts only replicas with work queued: one left idle at the end of the run (or
        before the warm start ends) must not hold back those still running."""
        for r in sorted(self.active):
            while self.to_issue > 0 and sum(1 for v in self.inflight.values() if v[0] == r) < QUEUE:
                if r not in self.gated:
                    self._gate("join", {r})
                n = min(self.ctx.cfg.run.log_every, self.to_issue)
                self.inflight[self.actors.replicas[r].run.remote(self.rank_next[r], n)] = (r, self.rank_next[r], n)
                self.rank_next[r] += n
                self.to_issue -= n
        busy = {v[0] for v in self.inflight.values()}
        self._gate("leave", self.gated - busy)

    def _chunk_done(self, ref, on_chunk) -> None:
        rank, start, n = self.inflight.pop(ref)
        try:
            res = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self._replica_failed(rank, exc)
            return
        self.rank_done[rank] = start + n
        self.done += n
        self.steps[rank] = self.steps.get(rank, 0) + n
        self.seen = np.maximum(self.seen, res["versions"])
        on_chunk(Chunk.of([res], steps=n))
        if self.stage_metrics is not None:
            self.stage_metrics.add(res["stage_results"])
            self.stage_pids[rank] = res["stage_pids"]
        if res["shard_errors"]:
            self._check_shards()
        if self.hooks:
            self.hooks("chunk", {"step": self.done, "replica_pids": dict(self.pids), "shard_pids": dict(self.shard_pids),
                                 "stage_pids": dict(self.stage_pids), "rejoining": list(self.rejoining)})

    def _end_epoch(self) -> None:
        """The parameter server's epoch metrics: staleness, updates/s, every replica's steps/s."""
        sink, step = self.ctx.sink, self.done
        self._check_shards()
        now = time.perf_counter()
        elapsed, self.window_t = max(now - self.window_t, 1e-9), now
        stats = ray.get([retried(s.stats).remote() for s in self.actors.shards])
        recent = np.concatenate([s["recent"] for s in stats])
        if recent.size:
            sink.histogram("ps/staleness", recent, step)
            sink.scalar("ps/staleness_mean", float(recent.mean()), step)
        updates = float(np.mean([s["count"] for s in stats]))
        sink.scalar("ps/updates_per_s", (updates - self.updates0) / elapsed, step)
        self.updates0 = updates
        for r in range(self.ctx.cfg.resources.replicas):  # 0 for a replica that was down or not yet started
            sink.scalar(f"throughput/steps_per_s/replica_{r}", self.steps.get(r, 0) / elapsed, step)
        self.steps = {}
        if self.stage_metrics is not None:
            self.stage_metrics.report(sink, step)

    # -- failures ------------------------------------------------------------------------------------
    def _replica_failed(self, rank: int, exc: Exception) -> None:
        """Forget the dead replica's queued chunks, hand their steps to the others, and wait (on
        the setup call that reconnects it, in the main ray.wait) for Ray to restart it."""
        for ref in [ref for ref, v in self.inflight.items() if v[0] == rank]:
            del self.inflight[ref]
        self.to_issue += self.rank_next[rank] - self.rank_done[rank]
        self.rank_next[rank] = self.rank_done[rank]
        self.active.discard(rank)
        self._gate("leave", {rank})
        self.replica_nodes[rank] = None
        self._record({"kind": "replica", "rank": rank, "pid": self.pids[rank], "error": type(exc).__name__})
        self.rejoining[self.actors.setup(rank)] = rank

    def _rejoin(self, ref) -> None:
        rank = self.rejoining.pop(ref)
        try:
            self.actors.transports[rank] = ray.get(ref)
            info = ray.get(retried(self.actors.replicas[rank].info).remote())
        except ray.exceptions.RayActorError:
            self.ctx.sink.say(f"warning: replica {rank} could not be restarted; continuing without it")
            self.lost.add(rank)
            return
        self.restarts += 1
        for failure in reversed(self.ctx.failures.failures):
            if failure.get("rank") == rank and "restarted_pid" not in failure:
                failure["restarted_pid"] = info["pid"]
                failure["rejoined_step"] = self.done
                break
        self.ctx.sink.say(f"replica {rank} restarted (pid {info['pid']}); it rejoins by fetching the current parameters")
        self.pids[rank], self.replica_nodes[rank] = info["pid"], info.get("node_id")
        self.active.add(rank)

    def _check_shards(self) -> None:
        """A shard whose process changed was restored from its snapshot: report the updates lost."""
        for info in ray.get([retried(s.info).remote() for s in self.actors.shards]):
            k = info["index"]
            if info["pid"] != self.shard_pids[k]:
                # seen may already include pushes applied after the restore (versions restart at
                # the snapshot's), so the loss is bracketed rather than exact.
                restored, seen, old = info["restored_version"] or 0, int(self.seen[k]), self.shard_pids[k]
                lost = max(0, seen - restored)
                self.restarts += 1
                self.shard_pids[k], self.seen[k] = info["pid"], info["version"]
                failure = {"kind": "shard", "shard": k, "pid": old, "restarted_pid": info["pid"],
                           "restored_version": restored, "updates_lost": lost,
                           "updates_lost_min": max(0, seen - int(info["version"]))}
                _adopted(failure, info)
                self._record(failure)
                self.ctx.sink.say(f"parameter shard {k} restored from its snapshot at version {restored}"
                                  + (f", then from a replica's copy at version {failure['adopted_version']}"
                                     if failure.get("adopted_version") else "")
                                  + f" ({failure['updates_lost']} updates lost)")

    def _record(self, failure: dict) -> None:
        failure.update(step=self.done, epoch=round(self.done / self.spe, 3))
        self.ctx.sink.say(f"warning: {failure['kind']} failure: {failure}")
        if self.ctx.failures.decide(failure) is Decision.RAISE:
            what = (f"replica {failure['rank']} (pid {failure['pid']})" if failure["kind"] == "replica"
                    else f"parameter shard {failure['shard']}")
            raise self.ctx.failures.give_up(f"async SGD: {what} died at step {self.done}", self.ctx.run_dir)

    def _gate(self, verb: str, ranks) -> None:
        ranks = set(ranks)
        if self.actors.gate is not None and ranks:
            ray.get([getattr(self.actors.gate, verb).remote(r) for r in sorted(ranks)])
        self.gated = self.gated | ranks if verb == "join" else self.gated - ranks

    # -- evaluation, state, the end ------------------------------------------------------------------
    def driver_params(self) -> torch.Tensor:
        """A snapshot of the shards' parameters (evaluated on the driver while the replicas keep going)."""
        return torch.from_numpy(self.actors.params())

    def state(self) -> dict:
        return {"shards": ray.get([retried(s.state).remote() for s in self.actors.shards]),
                "rank_done": list(self.rank_done), "done": self.done, "restarts": self.restarts}

    def extras(self) -> dict:
        if self.rejoining and self._room_for_a_replica():
            # Record restarts still under way (a fresh process imports torch: seconds), so the
            # summary pairs every failure with its restart. With no room (its node is gone and none
            # replaced it) the restart cannot come: the summary says the replica was lost.
            ready, _ = ray.wait(list(self.rejoining), num_returns=len(self.rejoining), timeout=REJOIN_WAIT_S)
            for ref in ready:
                self._rejoin(ref)
        stats = ray.get([retried(s.stats).remote() for s in self.actors.shards])
        count = sum(s["count"] for s in stats)
        updates = float(np.mean([s["count"] for s in stats]))
        lead = ray.get(self.actors.gate.stats.remote()) if self.actors.gate is not None else None
        seconds = time.perf_counter() - self.t_first if self.t_first else 0.0
        return {"staleness_mean": sum(s["sum"] for s in stats) / max(count, 1),
                "staleness_max": max(s["max"] for s in stats), "updates": int(round(updates)),
                "updates_per_s": updates / max(seconds, 1e-9),
                "lead_max": None if lead is None else lead["lead_max"], "ps_shards": len(self.actors.bounds),
                "restarts": self.restarts, "transport": self.transport(), "nodes": self.nodes(),
                "replicas_down": sorted({*self.rejoining.values(), *self.lost}),
                **({"stages": self.ctx.cfg.pipeline.stages, "micro_batches": self.ctx.cfg.pipeline.micro_batches,
                    "bubble_bound": bubble(self.ctx.cfg.pipeline.stages, self.ctx.cfg.pipeline.micro_batches),
                    "bubble": self.stage_metrics.bubble()}
                   if self.actors.stage_shards else {})}

    def nodes(self) -> dict:
        """Which Ray node runs each replica (by rank; None for one that is down) and each parameter
        shard (by index; shards need no CPU, Ray restarts them wherever there is a node). Shard
        failures are brought up to date meanwhile: replicas may have offered fresher copies of a
        restarted shard's slice since the failure was recorded."""
        shards = ray.get([retried(s.info).remote() for s in self.actors.shards])
        for failure in self.ctx.failures.failures:
            if failure.get("kind") == "shard" and shards[failure["shard"]]["pid"] == failure["restarted_pid"]:
                _adopted(failure, shards[failure["shard"]])
        return {"replicas": [self.replica_nodes[r] for r in range(len(self.actors.replicas))],
                "shards": [i["node_id"] for i in shards]}

    def _room_for_a_replica(self) -> bool:
        res = self.ctx.cfg.resources
        if self.actors.stage_shards:  # a pipelined replica's stages come back into its bundles of the placement group
            return True
        free = ray.available_resources()
        return (free.get("CPU", 0.0) + 1e-9 >= res.cpus_per_replica
                and free.get("GPU", 0.0) + 1e-9 >= res.gpus_per_replica)

    def shutdown(self, graceful: bool = True) -> None:
        if getattr(self, "actors", None) is not None:
            self.actors.shutdown()
            self.actors = None
