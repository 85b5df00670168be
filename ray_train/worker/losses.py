"""The cost functions of Nielsen's book, each a mean over the mini-batch (``loss``) and a sum over
a batch (``summed``, for evaluation). Networks output raw scores z; the loss picks the output
layer:

- ``log_likelihood`` (default, ch. 3 and 6): softmax outputs, C = -ln a_y;
- ``cross_entropy`` (ch. 3): sigmoid outputs, C = -sum_j [y_j ln a_j + (1 - y_j) ln(1 - a_j)];
- ``quadratic`` (ch. 1): sigmoid outputs, C = 1/2 ||y - a||^2,

y one-hot. Predictions are argmax z in every case (softmax and sigmoid are both monotone), and an
ensemble's soft vote averages the softmax of z."""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("log_likelihood", "cross_entropy", "quadratic")


def summed(name: str, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The cost of scores ``z`` [n, C] against labels ``y`` [n], summed over the n examples."""
    if name == "log_likelihood":
        return F.cross_entropy(z, y, reduction="sum")
    target = F.one_hot(y, z.shape[1]).to(z.dtype)
    if name == "cross_entropy":
        return F.binary_cross_entropy_with_logits(z, target, reduction="sum")
    if name == "quadratic":
        return 0.5 * (torch.sigmoid(z) - target).pow(2).sum()
    raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(LOSSES)}")


def loss(name: str, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mini-batch mean: what a training step differentiates."""
    if name == "log_likelihood":
        return F.cross_entropy(z, y)  # the fused kernel; the same value as summed / n
    return summed(name, z, y) / len(y)


def at_chance(name: str, classes: int) -> float | None:
    """The loss of an untrained network that scores every class alike (z = 0): where training starts
    from, near enough, with the registry's initialisations; None for a loss without one."""
    import math

    table = {"log_likelihood": math.log(classes), "cross_entropy": classes * math.log(2.0), "quadratic": classes / 8}
    return table.get(name)
