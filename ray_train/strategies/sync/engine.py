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
from ray_train.worker.pipeline import Stage
from ray_train.worker.pipeline_group import PipelineGroup
from ray_train.worker.stages import bubble
from ray_train.worker.replica import Replica


class SyncEngine(Engine):
    replica_cls = Replica  # tests and ensembles swap in subclasses
    stage_cls = Stage  # the same for a pipelined replica's stage actors

    def start(self, state: dict | None) -> None:
        from ray.exceptions import RayTaskError

        ctx = self.ctx
        stages = ctx.cfg.pipeline.stages
        if stages > 1:  # each replica a pipeline of stage actors (docs/pipeline.md)
            self.group = PipelineGroup.create(ctx.cfg, ctx.data_ref, ctx.model, self.stage_cls)
        else:
            self.group = ReplicaGroup.create(ctx.cfg, ctx.data_ref, ctx.model, self.replica_cls)
        if state is not None:
            if (state.get("stages") or 1) != stages:
                self.group.shutdown()
                raise StateMismatch(f"it holds {state.get('stages') or 1} stage(s) per replica, this run has "
                                    f"--stages {stages}")
            try:
                self.group.load_state(state)
            except RayTaskError as exc:
                self.group.shutdown()
                raise StateMismatch(" ".join(str(exc.cause or exc).split())[:240]) from None
        ctx.sink.say(self.describe())

    def describe(self) -> str:
        """The run's line saying how it trains (each engine built on this one says its own)."""
        devices = sorted({i["device"] for i in self.group.info})
        n, pipe = self.ctx.cfg.resources.replicas, self.ctx.cfg.pipeline
        pipeline = (f", {pipe.stages} stages x {pipe.micro_batches} micro-batches ({pipe.schedule})"
                    if pipe.stages > 1 else "")
        return (f"sync SGD: {n} replica{'s' if n != 1 else ''} on {devices}{pipeline}, "
                f"gradient averaging: {self.group.averaging()}")

    def train_epoch(self, epoch, lr, start, on_chunk, should_stop) -> bool:
        step = epoch * self.epoch_steps() + start

        def chunk(results):
            nonlocal step
            step += len(results[0]["step_ms"])
            if isinstance(self.group, PipelineGroup):
                self.group.report(results, self.ctx.sink, step)
            on_chunk(Chunk.of(results))

        return self.group.train_epoch(epoch, lr, start, self.ctx.cfg.run.log_every, chunk, should_stop)

    def evaluate(self, split: str) -> EvalResult:
        return self.group.evaluate(split, getattr(self.ctx.data, f"y_{split}"))

    def state(self) -> dict:
        return self.group.state()

    def model_state(self) -> dict:
        return self.group.model_state()

    def weights(self):
        return self.group.weights()

    def shutdown(self, graceful: bool = True) -> None:
        if getattr(self, "group", None) is not None:
            self.group.shutdown(graceful)

    def extras(self) -> dict:
        extras = {"allreduce": self.group.comm, "devices": [i["device"] for i in self.group.info],
                  "nodes": self.group.nodes()}
        if isinstance(self.group, PipelineGroup):
            pipe = self.ctx.cfg.pipeline
            extras |= {"stages": pipe.stages, "micro_batches": pipe.micro_batches, "pipeline_schedule": pipe.schedule,
                       "bubble": self.group.bubble(), "bubble_bound": bubble(pipe.stages, pipe.micro_batches),
                       "stage_params": [i["params"] for i in self.group.info[: pipe.stages]]}
        return extras
