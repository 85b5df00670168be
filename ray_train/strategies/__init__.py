"""Driver-side training loops, one per strategy, behind one signature: ``train(RunContext) -> dict``."""
from __future__ import annotations

import importlib

from ray_train.config import UserError

MODULES = {"sync": "sync_sgd", "async": "async_sgd", "ensemble": "ensemble"}
# Where --resume finds a strategy's checkpoints: the run's own (runs/<name>/checkpoints/, read by
# run.execute), or each member's (runs/<name>/members/member_<k>/, read by the strategy itself).
CHECKPOINTS = {"sync": "run", "async": "run", "ensemble": "members"}


def get_strategy(name: str):
    if name not in MODULES:
        raise UserError(f"run.strategy: unknown value {name!r}; allowed: {', '.join(MODULES)}")
    try:
        module = importlib.import_module(f"ray_train.strategies.{MODULES[name]}")
    except ModuleNotFoundError as exc:
        if exc.name != f"ray_train.strategies.{MODULES[name]}":
            raise
        raise UserError(f"run.strategy: {name!r} is not available in this version yet") from None
    return module.train
