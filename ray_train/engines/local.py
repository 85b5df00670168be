"""Model averaging (local SGD; Jubatus-style mixing in the seed article): every replica trains on
its own shard with its own optimizer, and every ``--average-every H`` steps (and at the end of
every epoch, so that evaluation and checkpoints see one model) the replicas replace their
parameters by the mean over all replicas. Between averages nothing moves: H times fewer messages
than sync SGD, each of the same size. With H = 1 and plain SGD it is sync SGD: the mean of
w - eta g_i is w - eta mean(g_i) (tests/test_local.py holds it to 1e-5).

The engine is the sync engine with another replica class: the same group, process group and
shared-memory averaging, the same checkpoints (taken at epoch ends, where the replicas agree)."""
from __future__ import annotations

from ray_train.comm import allreduce_bytes, flatten_params
from ray_train.engines.sync import SyncEngine
from ray_train.replica import Replica


class LocalReplica(Replica):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.flat = flatten_params(self.params)  # averaged in place, like sync's gradients
        self.since_average = 0

    def step(self, idx):
        loss, hits = self.gradients(*self.batch(idx))
        self.opt.step()
        self.since_average += 1
        if self.since_average == self.cfg.local.average_every:
            self.average()
        return loss, hits

    def average(self) -> None:
        if self.comm is not None:
            self.comm.mean_(self.flat)
            self.comm_bytes += allreduce_bytes(self.flat, self.ctx.world_size)
        self.since_average = 0

    def train_steps(self, n: int) -> dict:
        result = super().train_steps(n)
        if self.cursor >= len(self.batches) and self.since_average:
            self.average()  # the epoch ends with one model on every replica
        return result


class LocalEngine(SyncEngine):
    replica_cls = LocalReplica

    def start(self, state):
        super().start(state)
        self.ctx.sink.say(f"model averaging (local SGD): every {self.ctx.cfg.local.average_every} steps "
                          "and at the end of every epoch")
