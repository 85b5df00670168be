"""--strategy ensemble: K members trained independently, then a majority vote (README.md beside this file)."""
from __future__ import annotations

from ray_train.strategies.base import Strategy
from ray_train.strategies.ensemble.config import EnsembleConfig, member_config, member_specs


class Ensemble(Strategy):
    name = "ensemble"
    streams = True
    summary = "a voting ensemble: K members (each a sync group) trained side by side, combined by majority vote"
    runner = "ray_train.strategies.ensemble.runner:run_ensemble"
    section = EnsembleConfig
    compared = False
    resumes_itself = True
    pipelined = True
    flags = (
        ("--members", "ensemble", "members", int, "ensemble: K members, seeds seed..seed+K-1 (default 5)"),
        ("--replicas-per-member", "ensemble", "replicas_per_member", int, "ensemble: each member a sync group of R "
         "replicas (default 1)"),
        ("--bagging", "ensemble", "bagging", bool, "ensemble: each member trains on its own bootstrap sample"),
    )

    def model_configs(self, cfg) -> list:
        return [member_config(cfg, s) for s in member_specs(cfg)]

    def epoch_shards(self, cfg) -> int:
        return cfg.ensemble.replicas_per_member

    def step_examples(self, cfg, n_train: int) -> int:
        return cfg.run.batch_size * cfg.ensemble.replicas_per_member

    def bundles(self, cfg) -> list[dict]:
        return [self.replica_bundle(cfg) for _ in range(cfg.ensemble.replicas_per_member * cfg.pipeline.stages)]

    def check_resources(self, cfg, total: dict | None = None) -> None:
        # the runner checks one member's group against the cluster (members queue for slots);
        # before a local cluster starts, the same check against what it will hold
        if total is not None:
            import dataclasses

            from ray_train.cluster import check_resources

            check_resources(dataclasses.replace(cfg.resources, replicas=cfg.ensemble.replicas_per_member), total=total)


STRATEGY = Ensemble()
