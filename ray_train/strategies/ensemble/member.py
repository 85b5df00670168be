"""An ensemble member's replica: the sync Replica plus what voting and recovery need.

- Bagging: with ``cfg.ensemble.bagging`` the member draws one bootstrap sample of the training
  set (n indices with replacement, seeded by the member's seed) and every epoch's batches index
  into it, so members see different data as well as different initialisations. On streamed data
  (docs/data.md) it is the online form: each example of the stream weighted by a seeded Poisson(1)
  draw per member.
(The vote's probabilities come from Replica.evaluate; a restarted member loads its checkpoint
through Replica.load_state, like any sync group.)
"""
from __future__ import annotations

import numpy as np
import torch

from ray_train.cluster import ReplicaContext
from ray_train.config import TrainConfig
from ray_train.data.dataset import Dataset
from ray_train.worker.batches import shard_batches
from ray_train.worker.pipeline import Stage, StageContext
from ray_train.worker.replica import Replica

BAGGING_STREAM = 0xBA6  # separates the bootstrap draw from the seed's other random streams


def bootstrap_indices(n: int, seed: int) -> np.ndarray:
    """n draws with replacement from range(n): about 63% of the examples, some of them repeated."""
    return np.random.default_rng((seed, BAGGING_STREAM)).integers(0, n, n, dtype=np.int64)


class EnsembleMember(Replica):
    def __init__(self, ctx: ReplicaContext, cfg: TrainConfig, data: Dataset, model) -> None:
        super().__init__(ctx, cfg, data, model)
        n = len(data.y_train)
        streamed = getattr(data, "streamed", False)
        # Every replica of a member's group draws the same sample (same seed), then takes its shard.
        self.sample = bootstrap_indices(n, ctx.seed) if cfg.ensemble.bagging and not streamed else None
        self.poisson = cfg.ensemble.bagging and streamed  # online bootstrap over the stream
        self.weights_rng = None

    def set_epoch(self, epoch: int, lr: float, start: int = 0, shard=None) -> int:
        steps = super().set_epoch(epoch, lr, start, shard)
        if self.poisson:
            self.weights_rng = np.random.default_rng((self.ctx.seed, BAGGING_STREAM, epoch, self.ctx.rank))
            self.weights_rng.poisson(1.0, start * self.cfg.run.batch_size)  # the batches a resume skipped
        if self.sample is not None:
            positions = shard_batches(len(self.sample), self.ctx.world_size, self.ctx.rank,
                                      self.cfg.run.batch_size, self.cfg.run.seed, epoch)
            self.batches = self.sample[positions]
            steps = len(self.batches)
        return steps

    def batch(self, idx):
        """A streamed batch under online bagging: each example repeated Poisson(1) times (seeded by
        the member, epoch and rank), so every member learns from its own bootstrap of the stream
        without holding it (Oza and Russell's online bagging)."""
        x, y = super().batch(idx)
        if not (self.poisson and isinstance(idx, tuple)):
            return x, y
        w = torch.from_numpy(self.weights_rng.poisson(1.0, len(y))).to(y.device)
        if int(w.sum()) == 0:  # every draw 0 (rare): the batch as it is rather than no step
            return x, y
        return x.repeat_interleave(w, dim=0), y.repeat_interleave(w)

    def distinct_examples(self) -> int:
        """Distinct training examples this member learns from (the bootstrap's coverage)."""
        return len(self.data.y_train) if self.sample is None else int(len(np.unique(self.sample)))


class EnsembleStage(Stage):
    """A stage actor of a member that is a pipeline (--stages): the same bootstrap sample, so the
    stages of one replica take the same batches."""

    def __init__(self, ctx: StageContext, cfg: TrainConfig, data: Dataset, model) -> None:
        super().__init__(ctx, cfg, data, model)
        self.sample = bootstrap_indices(len(data.y_train), ctx.seed) if cfg.ensemble.bagging else None

    def set_epoch(self, epoch: int, lr: float, start: int = 0) -> int:
        steps = super().set_epoch(epoch, lr, start)
        if self.sample is not None:
            positions = shard_batches(len(self.sample), self.ctx.replicas, self.ctx.replica,
                                      self.cfg.run.batch_size, self.cfg.run.seed, epoch)
            self.batches = self.sample[positions]
            steps = len(self.batches)
        return steps

    distinct_examples = EnsembleMember.distinct_examples
