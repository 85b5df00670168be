"""Synchronous data-parallel SGD: every step each replica computes gradients on its batch, the
gradients are averaged among the replicas, and every replica applies the same update. N replicas
with batch b therefore follow single-process SGD with batch N*b (tests/test_sync_equivalence.py).

The state holds everything the next step depends on: parameters, optimizer state (momentum) and
every replica's RNG (dropout masks). A resumed run, or a group rebuilt after a replica died,
continues exactly as the uninterrupted run would (tests/test_resume.py, tests/test_sync_faults.py).
"""
from __future__ import annotations

from ray_train.engine import Chunk, Engine, StateMismatch
from ray_train.worker.evaluation import EvalResult
from ray_train.worker.group import ReplicaGroup
from ray_train.worker.replica import Replica


class SyncEngine(Engine):
    replica_cls = Replica  # tests and ensembles swap in subclasses

    def start(self, state: dict | None) -> None:
        from ray.exceptions import RayTaskError

        ctx = self.ctx
        self.group = ReplicaGroup.create(ctx.cfg, ctx.data_ref, ctx.model, self.replica_cls)
        if state is not None:
            try:
                self.group.load_state(state)
            except RayTaskError as exc:
                self.group.shutdown()
                raise StateMismatch(" ".join(str(exc.cause or exc).split())[:240]) from None
        ctx.sink.say(self.describe())

    def describe(self) -> str:
        """The run's line saying how it trains (each engine built on this one says its own)."""
        devices = sorted({i["device"] for i in self.group.info})
        n = self.ctx.cfg.resources.replicas
        return f"sync SGD: {n} replica{'s' if n != 1 else ''} on {devices}, gradient averaging: {self.group.comm}"

    def train_epoch(self, epoch, lr, start, on_chunk, should_stop) -> bool:
        return self.group.train_epoch(epoch, lr, start, self.ctx.cfg.run.log_every,
                                      lambda results: on_chunk(Chunk.of(results)), should_stop)

    def evaluate(self, split: str) -> EvalResult:
        return self.group.evaluate(split, getattr(self.ctx.data, f"y_{split}"))

    def state(self) -> dict:
        return self.group.state()

    def model_state(self) -> dict:
        return self.group.get([self.group.actors[0].state.remote()])[0]

    def weights(self):
        return self.group.get([self.group.actors[0].weights.remote()])[0]

    def shutdown(self, graceful: bool = True) -> None:
        if getattr(self, "group", None) is not None:
            self.group.shutdown(graceful)

    def extras(self) -> dict:
        return {"allreduce": self.group.comm, "devices": [i["device"] for i in self.group.info],
                "nodes": self.group.nodes()}
