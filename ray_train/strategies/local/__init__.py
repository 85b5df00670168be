"""--strategy local: model averaging, DiLoCo and EASGD (README.md beside this file)."""
from __future__ import annotations

from ray_train.errors import ConfigError
from ray_train.strategies.base import Strategy
from ray_train.strategies.local.config import OUTER_OPTIMIZERS, LocalConfig


class Local(Strategy):
    name = "local"
    streams = True
    summary = "model averaging: replicas train alone and mix parameters every H steps (local SGD, DiLoCo, EASGD)"
    engine = "ray_train.strategies.local.engine:LocalEngine"
    section = LocalConfig
    resizes = True
    flags = (
        ("--average-every", "local", "average_every", int, "local: steps between parameter averages H (default 8)"),
        ("--outer-optimizer", "local", "outer_optimizer", str, f"local: {', '.join(OUTER_OPTIMIZERS)}; sgd/nesterov apply "
         "the average as an outer step (DiLoCo) (default average)"),
        ("--outer-lr", "local", "outer_lr", float, "local: outer learning rate of sgd/nesterov (default 0.7)"),
        ("--outer-momentum", "local", "outer_momentum", float, "local: outer Nesterov momentum (default 0.9)"),
        ("--elastic-alpha", "local", "elastic_alpha", float, "local: EASGD's elastic pull toward a centre variable, "
         "0 < A < 1, instead of averaging (default off)"),
    )

    def check(self, cfg) -> None:
        super().check(cfg)
        alpha = cfg.local.elastic_alpha
        if alpha is not None and alpha * cfg.resources.replicas > 1:
            raise ConfigError(f"local.elastic_alpha: alpha x replicas (EASGD's beta) must be <= 1 for the centre to "
                              f"settle, got {alpha:g} x {cfg.resources.replicas}; the EASGD paper uses beta = 0.9")


STRATEGY = Local()
