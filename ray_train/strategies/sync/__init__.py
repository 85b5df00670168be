"""--strategy sync: synchronous data-parallel SGD (README.md beside this file)."""
from __future__ import annotations

from ray_train.strategies.base import Strategy


class Sync(Strategy):
    name = "sync"
    streams = True
    summary = "synchronous data-parallel SGD: gradients averaged among the replicas every step"
    engine = "ray_train.strategies.sync.engine:SyncEngine"
    pipelined = True
    resizes = True


STRATEGY = Sync()
