"""Evaluation, written once: a model's summed loss and softmax probabilities on a slice of a split.

Replicas evaluate their slice of the test set (sync, ensemble members); the Downpour engine
evaluates a parameter snapshot on the driver; both call ``predict`` and combine with ``combine``.
Probabilities, not only labels, because an ensemble's tie rule and soft vote need them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    errors: int
    probs: np.ndarray  # softmax [n, C], float32
    labels: np.ndarray | None = None  # streamed splits: the labels in the order of probs

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(1)


@torch.no_grad()
def predict(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, loss_sum_fn, device: torch.device,
            num_classes: int, batch_size: int = 1000) -> tuple[float, np.ndarray]:
    """(summed loss, probabilities [n, C] float32) of ``model`` on images ``x`` with labels ``y``;
    ``loss_sum_fn(logits, labels)`` is the loss summed over a batch. The model is put in eval mode
    and back in train mode afterwards."""
    from ray_train.worker.batches import to_tensor

    model.eval()
    loss_sum, probs = 0.0, []
    for start in range(0, len(y), batch_size):
        xb = to_tensor(x[start : start + batch_size]).to(device)
        yb = torch.tensor(y[start : start + batch_size], dtype=torch.int64, device=device)
        out = model(xb)
        loss_sum += float(loss_sum_fn(out, yb))
        probs.append(torch.softmax(out.float(), dim=1).cpu().numpy())
    model.train()
    return loss_sum, np.concatenate(probs) if probs else np.empty((0, num_classes), dtype=np.float32)


def combine(parts: list[dict], y: np.ndarray) -> EvalResult:
    """One result from the slices ``predict`` gave, each a dict with start, loss_sum, probs (and
    labels: a streamed split's shares, in the order the replicas read them)."""
    parts = sorted(parts, key=lambda p: p["start"])
    probs = np.concatenate([p["probs"] for p in parts])
    labels = np.concatenate([p["labels"] for p in parts]) if "labels" in parts[0] else None
    if labels is not None:
        y = labels
    n = max(len(y), 1)
    errors = int((probs.argmax(1) != y).sum())
    return EvalResult(sum(p["loss_sum"] for p in parts) / n, 1.0 - errors / n, errors, probs, labels)
