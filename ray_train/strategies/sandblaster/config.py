"""The config section of --strategy sandblaster (YAML section ``sandblaster``)."""
from __future__ import annotations

from dataclasses import dataclass

from ray_train.fields import _choice, _integer, _positive

DISPATCH = ("queue", "static")


@dataclass(frozen=True)
class SandblasterConfig:
    """Sandblaster L-BFGS (``--strategy sandblaster``): a coordinator runs L-BFGS; each function
    evaluation (loss and gradient over a large batch) is cut into work units for the replicas."""

    lbfgs_batch: int | None = None
    """Examples per L-BFGS iteration's batch; None: the whole training set."""
    work_units: int = 32
    """Work units per function evaluation (many more than replicas: a fast replica takes more)."""
    history: int = 10
    """L-BFGS history size (curvature pairs kept)."""
    iterations: int = 10
    """L-BFGS iterations per epoch (what --epochs counts; evaluation and checkpoints between)."""
    dispatch: str = "queue"
    """queue (units to whichever replica is free, outstanding ones re-issued as backups when the
    queue is empty) or static (each replica an equal share up front, no backups: the baseline)."""

    def __post_init__(self) -> None:
        if self.lbfgs_batch is not None:
            _integer("sandblaster", "lbfgs_batch", self.lbfgs_batch)
            _positive("sandblaster", "lbfgs_batch", self.lbfgs_batch)
        for name in ("work_units", "history", "iterations"):
            _integer("sandblaster", name, getattr(self, name))
            _positive("sandblaster", name, getattr(self, name))
        _choice("sandblaster", "dispatch", self.dispatch, DISPATCH)
