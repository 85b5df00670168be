"""Engines: one Engine subclass (engines/base.py) per training regime, registered here. The
ensemble is K run loops over sync engines, then the vote (ensemble.py)."""
from __future__ import annotations

import importlib

# strategy name -> (module, class); imported on first use, so that the CLI starts without torch
ENGINES: dict[str, tuple[str, str]] = {
    "sync": ("ray_train.engines.sync", "SyncEngine"),
    "async": ("ray_train.engines.downpour", "DownpourEngine"),
    "local": ("ray_train.engines.local", "LocalEngine"),
    "sandblaster": ("ray_train.engines.sandblaster", "SandblasterEngine"),
    "hogwild": ("ray_train.engines.hogwild", "HogwildEngine"),
}


def engine_class(strategy: str):
    module, name = ENGINES[strategy]
    return getattr(importlib.import_module(module), name)
