"""--strategy hogwild: lock-free updates of one shared parameter vector (README.md beside this file)."""
from __future__ import annotations

from ray_train.strategies.base import Strategy


class Hogwild(Strategy):
    name = "hogwild"
    streams = True
    summary = "Hogwild: replicas on one node update one shared-memory parameter vector without locks"
    engine = "ray_train.strategies.hogwild.engine:HogwildEngine"
    compared = False


STRATEGY = Hogwild()
