"""The costs a step differentiates and what a run reports besides them, for class labels and for
float targets (regression). Networks output raw scores z.

Classification (integer labels y), Nielsen's costs, y one-hot where it enters:

- ``log_likelihood`` (default, ch. 3 and 6): softmax outputs, C = -ln a_y;
- ``cross_entropy`` (ch. 3): sigmoid outputs, C = -sum_j [y_j ln a_j + (1 - y_j) ln(1 - a_j)];
- ``quadratic`` (ch. 1): sigmoid outputs, C = 1/2 ||y - a||^2.

Predictions are argmax z in every case (softmax and sigmoid are both monotone), and an ensemble's
soft vote averages the softmax of z. Regression (float targets of any shape): ``mse`` (mean squared
error) and ``l1`` (mean absolute error); the outputs are the predictions, and a run reports their
mean absolute error where it reports accuracy for classes.

Any callable (outputs, targets) -> scalar, the mean over the batch (``nn.CrossEntropyLoss(
label_smoothing=0.1)``, ``nn.MSELoss()``, a function), works too: handed to ``fit(loss=...)``
(pickled to every replica with the config) or named "package.module:function" (``--loss``;
imported in every process)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ray_train.fields import CLASSIFICATION_LOSSES, CUSTOM_LOSS, LOSSES, REGRESSION_LOSSES  # noqa: F401


def summed(name: str, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The cost of scores ``z`` [n, C] against labels ``y`` [n] (or, for regression, predictions
    against targets of their shape), summed over the n examples."""
    if name == "log_likelihood":
        return F.cross_entropy(z, y, reduction="sum")
    if name == "mse":
        return (z - y).pow(2).reshape(len(y), -1).mean(1).sum()
    if name == "l1":
        return (z - y).abs().reshape(len(y), -1).mean(1).sum()
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


def at_chance(name: str, classes: int | None) -> float | None:
    """The loss of an untrained network that scores every class alike (z = 0): where training starts
    from, near enough, with the registry's initialisations; None for a loss without one."""
    if classes is None:
        return None
    table = {"log_likelihood": math.log(classes), "cross_entropy": classes * math.log(2.0), "quadratic": classes / 8}
    return table.get(name)


def imported_loss(spec: str):
    """The callable "package.module:function" names (a ConfigError if it cannot be imported)."""
    import importlib

    from ray_train.errors import ConfigError

    module, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model.loss: cannot import {spec!r}: {type(exc).__name__}: {exc}") from None
    if not callable(fn):
        raise ConfigError(f"model.loss: {spec!r} is a {type(fn).__name__}, not a callable (outputs, targets) -> loss")
    return fn


class Objective:
    """One run's cost and report, built in every process from the config and the data: ``loss``
    (the batch mean a step differentiates), ``summed`` (evaluation), ``score`` (the correct count,
    or for regression the summed per-example mean absolute error) and ``outputs`` (softmax
    probabilities, or for regression the predictions themselves)."""

    def __init__(self, name: str, regression: bool, fn=None) -> None:
        self.name, self.regression = name, regression
        if fn is None and ":" in name:
            fn = imported_loss(name)
        self.fn = fn  # a callable (outputs, targets) -> batch mean, or None for a named cost

    @classmethod
    def of(cls, model_cfg, data) -> "Objective":
        return cls(model_cfg.loss, bool(getattr(data, "regression", False)), model_cfg.loss_fn)

    def _shape(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # a network's [n, 1] (or [n, k]) outputs meet targets [n] (or [n, a, b] with a*b = k)
        if self.regression and z.shape != y.shape and z.numel() == y.numel():
            return z.reshape(y.shape)
        return z

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self._shape(z, y)
        return self.fn(z, y) if self.fn is not None else loss(self.name, z, y)

    def summed(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self._shape(z, y)
        return self.fn(z, y) * len(y) if self.fn is not None else summed(self.name, z, y)

    def score(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self._shape(z.detach(), y)
        if self.regression:
            return (z - y).abs().reshape(len(y), -1).mean(1).sum().double()
        return (z.argmax(1) == y).sum().double()

    def outputs(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.regression:
            return z.float() if y is None else self._shape(z, y).float()
        return torch.softmax(z.float(), dim=1)

    def at_chance(self, classes: int | None) -> float | None:
        return None if self.regression or self.fn is not None else at_chance(self.name, classes)
