"""Driver-side training loops, one per strategy, behind one signature: ``train(RunContext) -> dict``."""
from __future__ import annotations

from ray_train.config import UserError


def get_strategy(name: str):
    if name == "sync":
        from ray_train.strategies.sync_sgd import train
        return train
    raise UserError(f"run.strategy: {name!r} is not available in this version yet (available: sync)")
