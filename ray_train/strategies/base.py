"""What a strategy folder declares: a ``Strategy`` subclass, instantiated once as ``STRATEGY`` in
the folder's ``__init__.py`` and listed in the registry (strategies/__init__.py).

The attributes describe the strategy (its engine, its config section, its defaults, its flags);
the methods are the questions the run, the CLI, compare and search ask about it, so that none of
them tests a strategy's name. The defaults fit a strategy whose replicas each train on a shard of
every epoch with SGD (sync); a strategy overrides what differs. This module imports no torch and
no Ray: ``--help`` reads every strategy's flags from here.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from ray_train.errors import ConfigError
from ray_train.fields import OPTIMIZERS

SGD_OPTIMIZERS = tuple(o for o in OPTIMIZERS if o != "lbfgs")
# A flag: (flag, section, field, type, help); the section is a config section name.
Flag = tuple[str, str, str, type, str]


def _load(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


class Strategy:
    name: str = ""
    """What --strategy and run.strategy say."""
    summary: str = ""
    """One line for --help and docs/strategies.md."""
    engine: str | None = None
    """"module:Class" of its Engine (ray_train/engine.py), imported when a run starts."""
    runner: str = "ray_train.run.job:run_loop"
    """"module:function" that trains one run given a run.job.Job and returns summary.json's keys;
    the default drives ``engine`` with the run loop. The ensemble runs K loops and votes."""
    section: type | None = None
    """Its config dataclass (YAML section ``name``, attribute ``cfg.<name>``, or ``cfg.<name>_``
    where the name is a Python keyword), or None when it has no settings of its own."""
    optimizer: str = "momentum"
    """The optimizer a run gets when the config names none (its rate: fields.DEFAULT_LR)."""
    optimizers: tuple[str, ...] = SGD_OPTIMIZERS
    """The optimizers it accepts."""
    flags: tuple[Flag, ...] = ()
    """Its command-line flags, each setting one field (usually of its own section)."""
    compared: bool = True
    """``python -m ray_train compare`` runs it when --strategies is not given."""
    pipelined: bool = False
    """It takes --stages, --micro-batches and --split-at (docs/pipeline.md): its replicas may be
    pipelines of stage actors (ray_train/worker/pipeline.py)."""
    streams: bool = False
    """It trains on a dataset Ray Data streams (images:DIR, parquet:PATH, fit's Streams): its
    replicas read the stream themselves (docs/data.md: a shard per epoch through
    worker.group.ReplicaGroup, or each its own share as async replicas do)."""
    resizes: bool = False
    """Its run loop may restart it from a checkpoint with another replica count (--replicas
    MIN-MAX, an elastic count: docs/cluster.md); its engine reads the count from the config it is
    started with, and its state loads into any count."""
    resumes_itself: bool = False
    """Its runner resumes its parts from their own checkpoints (an ensemble's members); the run
    then loads no checkpoint for it and keeps the points the interrupted run already logged."""

    # -- checks ------------------------------------------------------------------------------
    def check(self, cfg) -> None:
        """Checks across sections, once the config is complete; a ConfigError naming the field."""
        optimizer = cfg.optim.optimizer
        if optimizer not in self.optimizers:
            from ray_train import strategies

            takers = [s.name for s in strategies.all_strategies() if optimizer in s.optimizers]
            raise ConfigError(f"optim.optimizer: {optimizer!r} with run.strategy {self.name!r}; {self.name} takes "
                              f"{', '.join(self.optimizers)}" + (f" ({optimizer} is for {', '.join(takers)})" if takers
                                                                 else "")
                              + "; leave optim.optimizer unset for the strategy's own")

    def model_configs(self, cfg) -> list:
        """The configs whose networks the run builds (checked on the data before Ray starts)."""
        return [cfg]

    def epoch_shards(self, cfg) -> int | None:
        """How many ranks share the training set each epoch (each needs a batch); None: no SGD batches."""
        return cfg.resources.replicas

    def step_examples(self, cfg, n_train: int) -> int:
        """Examples one step of the run learns from: the m of Nielsen's lambda * m / n."""
        return cfg.run.batch_size * cfg.resources.replicas

    # -- resources ---------------------------------------------------------------------------
    def replica_bundle(self, cfg) -> dict:
        res = cfg.resources
        return {"CPU": res.cpus_per_replica, **({"GPU": res.gpus_per_replica} if res.gpus_per_replica else {})}

    def bundles(self, cfg) -> list[dict]:
        """The resource bundles one run holds at once (a Tune trial's placement group: search.py)."""
        return [self.replica_bundle(cfg) for _ in range(cfg.resources.replicas * cfg.pipeline.stages)]

    def check_resources(self, cfg, total: dict | None = None) -> None:
        """Fail fast, before any actor starts, when the cluster cannot hold the run; ``total``:
        the local cluster's resources before it starts (cluster.local_resources)."""
        from ray_train.cluster import check_resources

        check_resources(cfg.resources, total=total, stages=cfg.pipeline.stages)

    # -- running -----------------------------------------------------------------------------
    def engine_class(self):
        return _load(self.engine)

    def run(self, job) -> dict:
        """Train one run (ray_train.run.job.Job) and return summary.json's strategy keys."""
        runner: Callable[[Any], dict] = _load(self.runner)
        return runner(job)

    def modules(self) -> tuple[str, ...]:
        """Modules to import while Ray starts (torch and the engine load meanwhile)."""
        return tuple(spec.partition(":")[0] for spec in (self.engine, self.runner) if spec)
