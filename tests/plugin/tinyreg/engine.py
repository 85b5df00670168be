"""Tiny's engine: one replica actor from ray_train's worker/ takes every step; no averaging."""
import dataclasses

from ray_train.engine import Chunk, Engine
from ray_train.worker.group import ReplicaGroup
from ray_train.worker.replica import Replica


class TinyEngine(Engine):
    def start(self, state):
        ctx = self.ctx
        one = dataclasses.replace(ctx.cfg, resources=dataclasses.replace(ctx.cfg.resources, replicas=1))
        self.group = ReplicaGroup.create(one, ctx.data_ref, ctx.model, Replica)
        if state is not None:
            self.group.load_state(state)
        ctx.sink.say("tiny: 1 replica")

    def epoch_steps(self) -> int:
        from ray_train.worker.batches import steps_per_epoch

        return steps_per_epoch(len(self.ctx.data.y_train), 1, self.ctx.cfg.run.batch_size)

    def train_epoch(self, epoch, lr, start, on_chunk, should_stop) -> bool:
        return self.group.train_epoch(epoch, lr, start, self.ctx.cfg.run.log_every,
                                      lambda results: on_chunk(Chunk.of(results)), should_stop)

    def evaluate(self, split):
        return self.group.evaluate(split, getattr(self.ctx.data, f"y_{split}"))

    def state(self):
        return self.group.state()

    def model_state(self):
        return self.group.get([self.group.actors[0].state.remote()])[0]

    def shutdown(self, graceful=True):
        if getattr(self, "group", None) is not None:
            self.group.shutdown(graceful)
            self.group = None
