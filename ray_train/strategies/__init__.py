"""The registry of strategies: one line per strategy folder below. Everything else (the run, the
CLI, compare, search, the config) asks this registry about a strategy instead of naming it.

A strategy outside this tree is registered with ``register("package.module")`` (a module whose
``STRATEGY`` is a strategies.base.Strategy) or, for the command line and before any import of
ray_train.config, with the environment variable RAY_TRAIN_STRATEGIES=package.module,...
"""
from __future__ import annotations

import importlib
import os
import sys

REGISTRY = [
    "ray_train.strategies.sync",
    "ray_train.strategies.downpour",
    "ray_train.strategies.ensemble",
    "ray_train.strategies.local",
    "ray_train.strategies.sandblaster",
    "ray_train.strategies.hogwild",
]
DEFAULT = "sync"
PLUGINS_ENV = "RAY_TRAIN_STRATEGIES"

_loaded: dict = {}


def _add(module: str) -> None:
    strategy = importlib.import_module(module).STRATEGY
    if strategy.name in _loaded and _loaded[strategy.name] is not strategy:
        raise ValueError(f"strategy {strategy.name!r} of {module} is registered already")
    _loaded[strategy.name] = strategy


def _all() -> dict:
    if not _loaded:
        plugins = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
        for module in REGISTRY + plugins:
            _add(module)
    return _loaded


def register(module: str):
    """Add the strategy that ``module`` defines (as STRATEGY) and return it. A strategy with a
    config section must be registered before ray_train.config is imported (RAY_TRAIN_STRATEGIES),
    as TrainConfig is assembled from the sections then."""
    _all()
    strategy = importlib.import_module(module).STRATEGY
    if strategy.section is not None and strategy.name not in _loaded and "ray_train.config" in sys.modules:
        raise ValueError(f"strategy {strategy.name!r} has a config section: register it with "
                         f"{PLUGINS_ENV}={module} before ray_train.config is imported")
    _add(module)
    return strategy


def get(name: str):
    return _all()[name]


def names() -> tuple[str, ...]:
    return tuple(_all())


def all_strategies() -> list:
    return list(_all().values())


def sections() -> dict[str, type]:
    """Config section name -> dataclass of every strategy with settings of its own."""
    return {s.name: s.section for s in _all().values() if s.section is not None}
