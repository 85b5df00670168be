"""Evaluation, written once: a model's summed loss and outputs on a slice of a split.

Replicas evaluate their slice of the test set (sync, ensemble members); the Downpour engine
evaluates a parameter snapshot on the driver; both call ``predict`` and combine with ``combine``.
Outputs are softmax probabilities for class labels (an ensemble's tie rule and soft vote need
them, not only labels) and the predictions themselves for regression."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class EvalResult:
    loss: float
    accuracy: float | None  # None for regression
    errors: int | None  # None for regression
    probs: np.ndarray  # softmax [n, C] float32; for regression the outputs [n, ...]
    mae: float | None = None  # mean absolute error, regression only
    labels: np.ndarray | None = None  # streamed splits: the labels in the order of probs

    @property
    def regression(self) -> bool:
        return self.mae is not None

    @property
    def preds(self) -> np.ndarray:
        return self.probs if self.regression else self.probs.argmax(1)

    @property
    def score(self) -> float:
        """Higher is better: accuracy, or for regression the negated loss (model selection,
        schedules and early stopping read it)."""
        return -self.loss if self.regression else self.accuracy


@torch.no_grad()
def predict(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, objective, device: torch.device,
            batch_size: int = 1000) -> tuple[float, np.ndarray]:
    """(summed loss, outputs float32) of ``model`` on inputs ``x`` with targets ``y`` under
    ``objective`` (losses.Objective). The model is put in eval mode and back in train mode
    afterwards."""
    from ray_train.worker.batches import to_tensor

    model.eval()
    loss_sum, outs = 0.0, []
    for start in range(0, len(y), batch_size):
        xb = to_tensor(x[start : start + batch_size]).to(device)
        yb = torch.tensor(y[start : start + batch_size], device=device)  # a copy: y may be read-only (object store)
        out = model(xb)
        loss_sum += float(objective.summed(out, yb))
        outs.append(objective.outputs(out, yb).cpu().numpy())
    model.train()
    if not outs:
        return loss_sum, np.empty((0,) + tuple(np.shape(y)[1:]), dtype=np.float32)
    return loss_sum, np.concatenate(outs)


def combine(parts: list[dict], y: np.ndarray) -> EvalResult:
    """One result from the slices ``predict`` gave, each a dict with start, loss_sum, probs (and
    labels: a streamed split's shares, in the order the replicas read them); float targets ``y`` (a
    regression dataset's) give a loss and mean absolute error, labels accuracy."""
    parts = sorted(parts, key=lambda p: p["start"])
    probs = np.concatenate([p["probs"] for p in parts])
    labels = np.concatenate([p["labels"] for p in parts]) if "labels" in parts[0] else None
    if labels is not None:
        y = labels
    n = max(len(y), 1)
    loss = sum(p["loss_sum"] for p in parts) / n
    if np.issubdtype(y.dtype, np.floating):
        return EvalResult(loss, None, None, probs, mean_absolute_error(probs, y))
    errors = int((probs.argmax(1) != y).sum())
    return EvalResult(loss, 1.0 - errors / n, errors, probs, labels=labels)


def mean_absolute_error(outputs: np.ndarray, y: np.ndarray) -> float:
    """The mean over examples of each example's mean absolute error (outputs reshaped to y's)."""
    if not len(y):
        return 0.0
    diff = np.abs(outputs.reshape(y.shape).astype(np.float64) - y)
    return float(diff.reshape(len(y), -1).mean(1).mean())
