"""--strategy sandblaster: Sandblaster L-BFGS with work units and backup tasks (README.md beside this file)."""
from __future__ import annotations

from ray_train.errors import ConfigError
from ray_train.strategies.base import Strategy
from ray_train.strategies.sandblaster.config import DISPATCH, SandblasterConfig


class Sandblaster(Strategy):
    name = "sandblaster"
    summary = "Sandblaster L-BFGS: a coordinator runs L-BFGS, each evaluation cut into work units for the replicas"
    engine = "ray_train.strategies.sandblaster.engine:SandblasterEngine"
    section = SandblasterConfig
    optimizer = "lbfgs"
    optimizers = ("lbfgs",)
    compared = False
    streams = True  # work units as pieces of the blocks Ray Data reads for the iteration's batch (units.py)
    flags = (
        ("--lbfgs-batch", "sandblaster", "lbfgs_batch", int, "sandblaster: examples per L-BFGS batch (default: the "
         "whole training set)"),
        ("--work-units", "sandblaster", "work_units", int, "sandblaster: work units per loss-and-gradient evaluation, "
         "handed to whichever replica is free (default 32)"),
        ("--lbfgs-history", "sandblaster", "history", int, "sandblaster: L-BFGS history size (default 10)"),
        ("--lbfgs-iterations", "sandblaster", "iterations", int, "sandblaster: L-BFGS iterations per epoch (default 10)"),
        ("--dispatch", "sandblaster", "dispatch", str, f"sandblaster: {', '.join(DISPATCH)}: a work queue with backup "
         "units, or an equal split up front (the baseline) (default queue)"),
    )

    def check(self, cfg) -> None:
        if cfg.optim.optimizer != "lbfgs":
            raise ConfigError(f"optim.optimizer: {cfg.optim.optimizer!r} with run.strategy 'sandblaster'; L-BFGS is "
                              "Sandblaster's optimizer and its only one (leave optim.optimizer unset for it)")

    def epoch_shards(self, cfg) -> None:
        return None  # no SGD batches: the engine checks its units and batch when it starts

    def step_examples(self, cfg, n_train: int) -> int:
        return min(cfg.sandblaster.lbfgs_batch or n_train, n_train)  # one L-BFGS batch per step


STRATEGY = Sandblaster()
