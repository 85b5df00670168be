"""The config section of --strategy local (YAML section ``local``)."""
from __future__ import annotations

from dataclasses import dataclass

from ray_train.errors import ConfigError
from ray_train.fields import _choice, _integer, _positive

OUTER_OPTIMIZERS = ("average", "sgd", "nesterov")


@dataclass(frozen=True)
class LocalConfig:
    """Model averaging (``--strategy local``): replicas train alone and average parameters."""

    average_every: int = 8
    """Steps between averages H (also at the end of every epoch); H = 1 with plain SGD is sync SGD."""
    outer_optimizer: str = "average"
    """average (the replicas take the mean: local SGD, Jubatus-style mixing); sgd or nesterov
    (DiLoCo: the mean's difference from the last average is an outer gradient, applied with
    outer_lr and, for nesterov, outer_momentum)."""
    outer_lr: float = 0.7
    """Outer learning rate (DiLoCo's 0.7); outer sgd with 1.0 is plain averaging."""
    outer_momentum: float = 0.9
    """Outer Nesterov momentum (DiLoCo's 0.9)."""
    elastic_alpha: float | None = None
    """EASGD: at every average each replica moves alpha of the way toward a centre variable,
    which moves by alpha times the sum of the replicas' differences; None: off."""

    def __post_init__(self) -> None:
        _integer("local", "average_every", self.average_every)
        _positive("local", "average_every", self.average_every)
        _choice("local", "outer_optimizer", self.outer_optimizer, OUTER_OPTIMIZERS)
        _positive("local", "outer_lr", self.outer_lr)
        _positive("local", "outer_momentum", self.outer_momentum, zero_ok=True)
        if self.outer_momentum >= 1:
            raise ConfigError(f"local.outer_momentum: must be < 1, got {self.outer_momentum!r}")
        if self.elastic_alpha is not None:
            _positive("local", "elastic_alpha", self.elastic_alpha)
            if self.elastic_alpha >= 1:
                raise ConfigError(f"local.elastic_alpha: must be in (0, 1), got {self.elastic_alpha!r}")
            if self.outer_optimizer != "average":
                raise ConfigError("local.elastic_alpha: EASGD's elastic pull replaces the outer optimizer; "
                                  "give elastic_alpha or outer_optimizer, not both")
