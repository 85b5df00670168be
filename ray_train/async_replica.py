"""A Downpour replica: its own loop over its data shard, talking to the parameter shards directly
(no global barrier, no driver round trip per step). Every n_fetch steps it pulls the current
parameters from every shard; every n_push steps it pushes the mean gradient since its last push,
one flat float32 slice per shard. It never applies an update itself: the shards own the model."""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from ray_train.cluster import ReplicaContext
from ray_train.config import TrainConfig
from ray_train.data import Dataset, shard_batches, steps_per_epoch
from ray_train.replica import Replica, straggle

SHARD_RETRIES = 20  # failed calls to one shard in a row before the replica gives up


class ShardLost(RuntimeError):
    """A shard stayed unreachable through every retry (its restarts are used up)."""


class AsyncReplica(Replica):
    """Built from small arguments only; the data and the shards arrive with ``setup``, which the
    driver calls again after Ray restarts the actor (restarts must not depend on object refs)."""

    def __init__(self, ctx: ReplicaContext, cfg: TrainConfig, model) -> None:
        super().__init__(ctx, cfg, None, model)
        self.n_fetch, self.n_push = cfg.async_.n_fetch, cfg.async_.n_push
        # One flat buffer the parameters are views of: a fetch is one copy per shard.
        self.flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        offset = 0
        for p in self.params:
            p.data = self.flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.acc = torch.zeros_like(self.grad)
        self.since_fetch = self.since_push = 0
        self.pending: list = []  # (shard, push ref, whether it returns parameters) not yet acknowledged
        self.prefetched: dict = {}  # shard -> (version, [ref]) a push_pull returned, for the next fetch
        self.shard_errors: list[int] = []
        self.local_epoch = -1

    def setup(self, data: Dataset, shards: list, bounds: list[tuple[int, int]], gate=None) -> None:
        self.data, self.shards, self.bounds, self.gate = data, shards, bounds, gate
        self.versions = np.zeros(len(shards), dtype=np.int64)  # as last fetched, per shard
        self.seen = np.zeros(len(shards), dtype=np.int64)  # highest version acknowledged, per shard
        self.spe = steps_per_epoch(len(data.y_train), self.ctx.world_size, self.cfg.run.batch_size)

    def info(self) -> dict:
        return {**super().info(), "rank": self.ctx.rank}

    # -- the loop ------------------------------------------------------------------------------
    def run(self, start: int, n: int) -> dict:
        """Steps ``start .. start+n-1`` of this rank's own sequence of batches. The driver passes
        ``start``, so a restarted replica resumes its data order where the lost one stopped."""
        loss_sum = torch.zeros(())
        correct = torch.zeros((), dtype=torch.int64)
        step_ms = np.empty(n, dtype=np.float32)
        pushes = 0
        for i, s in enumerate(range(start, start + n)):
            t0 = time.perf_counter()
            epoch, pos = divmod(s, self.spe)
            if epoch != self.local_epoch:
                self.batches = shard_batches(len(self.data.y_train), self.ctx.world_size, self.ctx.rank,
                                             self.cfg.run.batch_size, self.cfg.run.seed, epoch)
                self.local_epoch = epoch
            if self.since_fetch == 0:
                self.fetch()
            loss, hits = self.gradients(*self.batch(self.batches[pos]))
            loss_sum += loss
            correct += hits
            self.acc += self.grad
            self.since_fetch = (self.since_fetch + 1) % self.n_fetch
            self.since_push += 1
            if self.since_push == self.n_push:
                self.push()
                pushes += 1
            step_ms[i] = straggle(self.slow, t0)
        # Acknowledged pushes only: when the driver sees this chunk, its updates are on the shards.
        self.settle()
        errors, self.shard_errors = self.shard_errors, []
        moved, self.comm_bytes = self.comm_bytes, 0
        return {"loss_sum": float(loss_sum) * self.cfg.run.batch_size, "correct": int(correct),
                "samples": n * self.cfg.run.batch_size, "step_ms": step_ms, "rank": self.ctx.rank,
                "pushes": pushes, "versions": self.seen.copy(), "shard_errors": errors, "pid": os.getpid(),
                "comm_bytes": moved}

    # -- talking to the shards ---------------------------------------------------------------------
    def fetch(self) -> None:
        # The parameters a push_pull just returned, else a pull; ask every shard first, then
        # read: the shards answer in parallel.
        self.settle()
        replies = [self.prefetched.pop(k, None) or self._pull(sh) for k, sh in enumerate(self.shards)]
        flat = self.flat.numpy()
        for k, ((lo, hi), reply) in enumerate(zip(self.bounds, replies)):
            version, values = self._retry(k, reply)
            np.copyto(flat[lo:hi], values)
            self.comm_bytes += values.nbytes
            self.versions[k] = version
            self.seen[k] = max(self.seen[k], version)

    def push(self) -> None:
        import ray

        self.acc.div_(self.since_push)
        if self.gate is not None:
            ray.get(self.gate.admit.remote(self.ctx.rank))  # waits on the gate's condition
        self.settle()
        mean = self.acc.numpy()
        # The next step starts with a fetch: have the push return the parameters it produced
        # (one call per shard, not a push and then a pull). With one replica these are exactly
        # what a pull would return: a caller's calls run in order on a shard.
        pull = self.since_fetch == 0
        verb = "push_pull" if pull else "push"
        # Ray serialises the arguments at submission, so acc can be reused at once.
        self.pending = [(k, getattr(sh, verb).remote(mean[lo:hi], int(self.versions[k]), self.ctx.rank), pull)
                        for k, (sh, (lo, hi)) in enumerate(zip(self.shards, self.bounds))]
        self.comm_bytes += mean.nbytes
        self.acc.zero_()
        self.since_push = 0

    def settle(self) -> None:
        """Wait for the last pushes; a push lost with a dead shard is dropped (Downpour tolerates
        a lost gradient) and the shard is re-fetched once it is back."""
        import ray

        for k, ref, pull in self.pending:
            try:
                reply = ray.get(ref)
            except ray.exceptions.RayError:
                self.shard_errors.append(k)
                self.since_fetch = 0  # the restored shard's parameters differ: fetch before the next step
                continue
            if pull:
                self.prefetched[k] = reply
                reply = reply[0]
            self.seen[k] = max(self.seen[k], reply)
        self.pending = []

    @staticmethod
    def _pull(shard):
        # A pull is idempotent: Ray resubmits it until a restarting shard is back.
        return shard.pull_ref.options(max_task_retries=-1).remote()

    def _retry(self, k: int, ref):
        import ray

        for _ in range(SHARD_RETRIES):
            try:
                # ref: a pull in flight, or the (version, [ref]) reply a push_pull already gave
                version, (inner,) = ref if isinstance(ref, tuple) else ray.get(ref)
                return version, ray.get(inner)
            except ray.exceptions.RayError:
                # The shard died (and its object with it) between our pull and our read.
                self.shard_errors.append(k)
                ref = self._pull(self.shards[k])
        raise ShardLost(f"parameter shard {k} unreachable after {SHARD_RETRIES} attempts")
