"""How an ensemble's members are combined: pure numpy functions, no Ray, no torch.

Hard vote (Nielsen ch. 6): every member votes for its argmax class and the plurality wins. Ties
are common with few members (2-2-1 among five), so the rule is fixed and tested:

    a tie goes to the tied class with the highest summed softmax probability over the members
    (weighted by the member weights when given); if that ties too, the lowest label wins.

With integer predictions only (no probabilities) the first step is skipped: lowest label wins.
Member weights scale a member's vote (and its probabilities); a weight of 0 silences a member.
"""
from __future__ import annotations

import numpy as np


def _weights(weights, members: int) -> np.ndarray:
    if weights is None:
        return np.ones(members, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(w) != members:
        raise ValueError(f"expected {members} weights (one per member), got {len(w)}")
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError(f"weights must be finite and >= 0, got {w.tolist()}")
    if w.sum() <= 0:
        raise ValueError("at least one member weight must be > 0")
    return w


def _split(votes_or_probs, num_classes: int | None) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(predictions [M, n], probabilities [M, n, C] or None, C) from either input form."""
    a = np.asarray(votes_or_probs)
    if a.ndim == 3:
        return a.argmax(axis=2), a.astype(np.float64, copy=False), a.shape[2]
    if a.ndim != 2:
        raise ValueError(f"expected predictions [members, n] or probabilities [members, n, classes], got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"predictions must be integer labels, got dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise ValueError("predictions must be labels >= 0")
    classes = num_classes if num_classes is not None else (int(a.max()) + 1 if a.size else 1)
    if a.size and a.max() >= classes:
        raise ValueError(f"label {int(a.max())} is out of range for {classes} classes")
    return a.astype(np.int64, copy=False), None, classes


def _labels(votes_or_probs) -> np.ndarray:
    a = np.asarray(votes_or_probs)
    return a.argmax(axis=2) if a.ndim == 3 else a.astype(np.int64, copy=False)


def vote_counts(votes_or_probs, weights=None, num_classes: int | None = None) -> np.ndarray:
    """Weighted votes per class, float [n, C]."""
    preds, _, classes = _split(votes_or_probs, num_classes)
    w = _weights(weights, preds.shape[0])
    counts = np.zeros((preds.shape[1], classes), dtype=np.float64)
    cols = np.arange(preds.shape[1])
    for m in range(preds.shape[0]):
        np.add.at(counts, (cols, preds[m]), w[m])
    return counts


def majority_vote(votes_or_probs, weights=None, num_classes: int | None = None) -> np.ndarray:
    """The hard-vote label per example, int64 [n], with the module's tie rule."""
    preds, probs, classes = _split(votes_or_probs, num_classes)
    w = _weights(weights, preds.shape[0])
    counts = vote_counts(preds, w, classes)
    # Weighted counts are sums of floats: compare with a tolerance so 0.1+0.2 ties with 0.3.
    tied = np.isclose(counts, counts.max(axis=1, keepdims=True), rtol=1e-9, atol=1e-12)
    if probs is None:
        return tied.argmax(axis=1).astype(np.int64)  # argmax takes the first: the lowest tied label
    summed = np.einsum("m,mnc->nc", w, probs)
    # Only tied classes compete; -inf elsewhere. argmax again resolves equal sums to the lowest label.
    return np.where(tied, summed, -np.inf).argmax(axis=1).astype(np.int64)


def soft_vote(probs, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """(labels int64 [n], weighted mean probabilities [n, C]): the average of the members' softmax
    outputs, the combination that uses each member's confidence rather than only its top class."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 3:
        raise ValueError(f"expected probabilities [members, n, classes], got shape {p.shape}")
    w = _weights(weights, p.shape[0])
    mean = np.einsum("m,mnc->nc", w / w.sum(), p)
    return mean.argmax(axis=1).astype(np.int64), mean


def oracle_accuracy(votes_or_probs, labels) -> float:
    """Fraction of examples at least one member gets right: the ceiling no vote can pass."""
    preds = _labels(votes_or_probs)
    y = np.asarray(labels).reshape(1, -1)
    if preds.shape[1] != y.shape[1]:
        raise ValueError(f"{preds.shape[1]} predictions per member but {y.shape[1]} labels")
    if y.shape[1] == 0:
        return 0.0
    return float((preds == y).any(axis=0).mean())


def disagreement(votes_or_probs) -> np.ndarray:
    """Pairwise disagreement [M, M]: the fraction of examples on which members i and j predict
    different labels (0 on the diagonal). Members that never disagree add nothing to a vote."""
    preds = _labels(votes_or_probs)
    if preds.shape[1] == 0:
        return np.zeros((preds.shape[0], preds.shape[0]))
    return (preds[:, None, :] != preds[None, :, :]).mean(axis=2)


def accuracy(preds, labels) -> tuple[float, int]:
    """(accuracy, errors) of one label vector."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    errors = int((preds != labels).sum())
    return (1.0 - errors / len(labels) if len(labels) else 0.0), errors


def vote_report(probs: np.ndarray, weights: np.ndarray, y: np.ndarray) -> dict:
    """Everything summary.json reports about combining members' probabilities [M, n, C] on labels
    ``y``: hard and soft vote, the members alone, oracle, disagreement; ``vote_preds`` the hard vote."""
    hard = majority_vote(probs, weights)
    soft, mean = soft_vote(probs, weights)
    member_acc = [accuracy(p.argmax(1), y) for p in probs]
    dis = disagreement(probs)
    off = dis[~np.eye(len(dis), dtype=bool)]
    vote_acc, vote_err = accuracy(hard, y)
    soft_acc, soft_err = accuracy(soft, y)
    nll = float(-np.log(np.clip(mean[np.arange(len(y)), y], 1e-12, None)).mean()) if len(y) else 0.0
    return {"vote_accuracy": vote_acc, "vote_errors": vote_err, "soft_vote_accuracy": soft_acc,
            "soft_vote_errors": soft_err, "soft_vote_nll": nll, "oracle_accuracy": oracle_accuracy(probs, y),
            "member_mean_accuracy": float(np.mean([a for a, _ in member_acc])),
            "member_mean_errors": float(np.mean([e for _, e in member_acc])),
            "member_best_errors": int(min(e for _, e in member_acc)),
            "disagreement": dis.round(6).tolist(), "mean_disagreement": float(off.mean()) if off.size else 0.0,
            "tie_rule": "plurality of argmax votes; ties -> highest summed softmax probability, then lowest label",
            "vote_preds": hard}


# -- regression: the members' outputs averaged (a vote needs classes) ---------------------------
VOTE_NEEDS_CLASSES = ("a vote needs class labels; this ensemble's members are regressors (float targets), and "
                      "their outputs are averaged (weighted by the member weights) instead")


def average(outputs: np.ndarray, weights=None) -> np.ndarray:
    """Members' outputs [M, n, ...] averaged with the member weights: a regression ensemble's prediction."""
    a = np.asarray(outputs, dtype=np.float64)
    w = _weights(weights, a.shape[0])
    return np.tensordot(w / w.sum(), a, axes=1)


def average_report(outputs: np.ndarray, weights: np.ndarray, y: np.ndarray, loss_of) -> dict:
    """What summary.json reports about a regression ensemble: the averaged outputs' loss
    (``loss_of(predictions, y)``, the run's loss) and mean absolute error, and the members' own."""
    mean = average(outputs, weights)
    mae = [_mae(o, y) for o in outputs]
    return {"average_loss": float(loss_of(mean, y)), "average_mae": _mae(mean, y),
            "member_mean_mae": float(np.mean(mae)), "member_best_mae": float(min(mae)),
            "combine": "weighted average of the members' outputs", "average_preds": mean}


def _mae(pred: np.ndarray, y: np.ndarray) -> float:
    if not len(y):
        return 0.0
    return float(np.abs(np.asarray(pred, dtype=np.float64).reshape(y.shape) - y).reshape(len(y), -1).mean(1).mean())
