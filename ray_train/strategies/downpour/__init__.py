"""--strategy async: Downpour SGD with a sharded parameter server (README.md beside this file)."""
from __future__ import annotations

from ray_train.errors import ConfigError
from ray_train.strategies.base import Strategy
from ray_train.strategies.downpour.config import AsyncConfig


class Downpour(Strategy):
    name = "async"
    summary = "asynchronous Downpour SGD: replicas push gradients to and fetch parameters from a sharded parameter server"
    engine = "ray_train.strategies.downpour.engine:DownpourEngine"
    section = AsyncConfig
    # DistBelief paired Downpour with AdaGrad on the parameter server; momentum SGD there stays at
    # chance on the default async job.
    optimizer = "adagrad"
    pipelined = True
    streams = True  # each replica reads its own share of every epoch's stream (docs/data.md)
    flags = (
        ("--ps-shards", "async", "ps_shards", int, "async: parameter-server shards (default 2)"),
        ("--n-fetch", "async", "n_fetch", int, "async: steps between parameter fetches (default 1)"),
        ("--n-push", "async", "n_push", int, "async: steps between gradient pushes (default 1)"),
        ("--max-staleness", "async", "max_staleness", int, "async: bound on pushes ahead of the slowest replica (default off)"),
        ("--staleness-lr", "async", "staleness_lr", bool, "async: scale each update by 1/max(1, staleness)"),
        ("--warm-start-steps", "async", "warm_start_steps", int, "async: steps one replica trains alone first (default: "
         "one epoch-equivalent; 0: none)"),
        ("--snapshot-every", "async", "snapshot_every_s", float, "async: seconds between shard snapshots (default 10)"),
        ("--ps-cpus", "async", "ps_cpus", float, "async: CPUs reserved per parameter shard (default 0)"),
        ("--transport", "async", "transport", str, "async: how replicas reach the shards: auto (shared memory on the "
         "same node, Ray calls across nodes), shm (one node required) or ray (default auto)"),
    )

    def check(self, cfg) -> None:
        super().check(cfg)
        if cfg.optim.max_norm is not None:
            raise ConfigError("optim.max_norm: the parameter server applies async updates; max-norm is for sync "
                              "and ensemble")
        if cfg.pipeline.stages > 1 and cfg.async_.max_staleness is not None:
            raise ConfigError("async.max_staleness: the staleness gate counts whole replicas; it does not take "
                              "pipelined replicas (--stages)")

    def check_resources(self, cfg, total: dict | None = None) -> None:
        from ray_train.cluster import check_resources

        check_resources(cfg.resources, shards=cfg.async_.ps_shards, shard_cpus=cfg.async_.ps_cpus, total=total)

    def epoch_shards(self, cfg) -> int:
        return 1  # every replica draws its own batches from the whole training set

    def bundles(self, cfg) -> list[dict]:
        shards = cfg.async_.ps_shards if cfg.async_.ps_cpus else 0
        return super().bundles(cfg) + [{"CPU": cfg.async_.ps_cpus} for _ in range(shards)]


STRATEGY = Downpour()
