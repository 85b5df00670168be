"""What every strategy receives and the small helpers they share."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ray_train.checkpoint import CheckpointStore
from ray_train.config import TrainConfig
from ray_train.data import Dataset
from ray_train.metrics import MetricsSink


@dataclass
class RunContext:
    cfg: TrainConfig
    data: Dataset
    data_ref: Any  # the dataset's object-store reference, put once by the driver
    sink: MetricsSink
    run_dir: str
    checkpoints: CheckpointStore | None = None
    resume_state: dict | None = None
    """The last checkpoint when resuming (``--resume``), else None. It holds at least epoch
    (epochs completed), step (TensorBoard step reached) and history; strategies add their own."""

    def save_model(self, state: dict) -> str:
        import torch

        path = os.path.join(self.run_dir, "model.pt")
        torch.save(state, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
        return path


def chunk_metrics(results: list[dict]) -> tuple[int, float, float, dict[int, float]]:
    """(steps, mean loss, accuracy, mean step ms per replica) of one chunk from every replica."""
    samples = sum(r["samples"] for r in results) or 1
    loss = sum(r["loss_sum"] for r in results) / samples
    accuracy = sum(r["correct"] for r in results) / samples
    step_ms = {r["rank"]: float(np.mean(r["step_ms"])) if len(r["step_ms"]) else 0.0 for r in results}
    return len(results[0]["step_ms"]), loss, accuracy, step_ms


def epoch_record(epoch: int, lr: float, totals: dict, elapsed: float, evaluation) -> dict:
    samples = max(totals["samples"], 1)
    return {
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": totals["loss_sum"] / samples,
        "train_accuracy": totals["correct"] / samples,
        "samples_per_s": totals["samples"] / max(elapsed, 1e-9),
        "epoch_s": elapsed,
        "test_loss": None if evaluation is None else evaluation.loss,
        "test_accuracy": None if evaluation is None else evaluation.accuracy,
        "test_errors": None if evaluation is None else evaluation.errors,
    }
