"""An ensemble member's replica: the sync Replica plus what voting and recovery need.

- Bagging: with ``cfg.ensemble.bagging`` the member draws one bootstrap sample of the training
  set (n indices with replacement, seeded by the member's seed) and every epoch's batches index
  into it, so members see different data as well as different initialisations.
- Probabilities: the vote's tie rule and the soft vote need each member's softmax on the test set,
  not only its argmax.
- Restore: a member restarted after its process died loads its last checkpoint.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ray_train.cluster import ReplicaContext
from ray_train.config import TrainConfig
from ray_train.data import Dataset, eval_shard, shard_batches, to_tensor
from ray_train.replica import Replica

BAGGING_STREAM = 0xBA6  # separates the bootstrap draw from the seed's other random streams


def bootstrap_indices(n: int, seed: int) -> np.ndarray:
    """n draws with replacement from range(n): about 63% of the examples, some of them repeated."""
    return np.random.default_rng((seed, BAGGING_STREAM)).integers(0, n, n, dtype=np.int64)


class EnsembleMember(Replica):
    def __init__(self, ctx: ReplicaContext, cfg: TrainConfig, data: Dataset) -> None:
        super().__init__(ctx, cfg, data)
        n = len(data.y_train)
        # Every replica of a member's group draws the same sample (same seed), then takes its shard.
        self.sample = bootstrap_indices(n, ctx.seed) if cfg.ensemble.bagging else None

    def set_epoch(self, epoch: int, lr: float) -> int:
        steps = super().set_epoch(epoch, lr)
        if self.sample is not None:
            positions = shard_batches(len(self.sample), self.ctx.world_size, self.ctx.rank,
                                      self.cfg.run.batch_size, self.cfg.run.seed, epoch)
            self.batches = self.sample[positions]
            steps = len(self.batches)
        return steps

    def distinct_examples(self) -> int:
        """Distinct training examples this member learns from (the bootstrap's coverage)."""
        return len(self.data.y_train) if self.sample is None else int(len(np.unique(self.sample)))

    @torch.no_grad()
    def probabilities(self, batch_size: int = 1000) -> dict:
        """Softmax [n_shard, C] float32 on this rank's slice of the test set, plus its loss sum."""
        self.model.eval()
        idx = eval_shard(len(self.data.y_test), self.ctx.world_size, self.ctx.rank)
        loss_sum, probs = 0.0, []
        for start in range(0, len(idx), batch_size):
            sel = idx[start : start + batch_size]
            out = self.model(to_tensor(self.data.x_test[sel]).to(self.device))
            y = torch.from_numpy(self.data.y_test[sel]).to(self.device)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            probs.append(F.softmax(out.float(), dim=1).cpu().numpy())
        self.model.train()
        probs = np.concatenate(probs) if probs else np.empty((0, self.data.num_classes), dtype=np.float32)
        return {"start": int(idx[0]) if len(idx) else 0, "probs": probs, "loss_sum": loss_sum}

    def load(self, state: dict) -> None:
        """Model and optimizer state from a checkpoint (the same on every replica of a group)."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
