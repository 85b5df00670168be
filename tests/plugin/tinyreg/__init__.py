"""A strategy defined outside ray_train, as a user would write one: this file (the description)
and engine.py. tests/test_layout.py registers it and trains it through fit and the CLI."""
from ray_train.strategies.base import Strategy


class Tiny(Strategy):
    name = "tiny"
    summary = "one replica, plain SGD steps, no communication (a test strategy)"
    engine = "tinyreg.engine:TinyEngine"
    optimizer = "sgd"
    compared = False

    def epoch_shards(self, cfg) -> int:
        return 1

    def bundles(self, cfg) -> list[dict]:
        return [self.replica_bundle(cfg)]


STRATEGY = Tiny()
