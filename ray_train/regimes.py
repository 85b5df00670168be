"""The sections of the configuration that belong to one strategy each: local (model averaging),
async (Downpour), sandblaster (L-BFGS) and ensemble. ray_train/config.py assembles them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ray_train.checks import OPTIMIZERS, ConfigError, _choice, _integer, _model_name, _positive

OUTER_OPTIMIZERS = ("average", "sgd", "nesterov")
DISPATCH = ("queue", "static")
TRANSPORTS = ("auto", "shm", "ray")


@dataclass(frozen=True)
class LocalConfig:
    """Model averaging (``--strategy local``): replicas train alone and average parameters."""

    average_every: int = 8
    """Steps between averages H (also at the end of every epoch); H = 1 with plain SGD is sync SGD."""
    outer_optimizer: str = "average"
    """average (the replicas take the mean: local SGD, Jubatus-style mixing); sgd or nesterov
    (DiLoCo: the mean's difference from the last average is an outer gradient, applied with
    outer_lr and, for nesterov, outer_momentum)."""
    outer_lr: float = 0.7
    """Outer learning rate (DiLoCo's 0.7); outer sgd with 1.0 is plain averaging."""
    outer_momentum: float = 0.9
    """Outer Nesterov momentum (DiLoCo's 0.9)."""
    elastic_alpha: float | None = None
    """EASGD: at every average each replica moves alpha of the way toward a centre variable,
    which moves by alpha times the sum of the replicas' differences; None: off."""

    def __post_init__(self) -> None:
        _integer("local", "average_every", self.average_every)
        _positive("local", "average_every", self.average_every)
        _choice("local", "outer_optimizer", self.outer_optimizer, OUTER_OPTIMIZERS)
        _positive("local", "outer_lr", self.outer_lr)
        _positive("local", "outer_momentum", self.outer_momentum, zero_ok=True)
        if self.outer_momentum >= 1:
            raise ConfigError(f"local.outer_momentum: must be < 1, got {self.outer_momentum!r}")
        if self.elastic_alpha is not None:
            _positive("local", "elastic_alpha", self.elastic_alpha)
            if self.elastic_alpha >= 1:
                raise ConfigError(f"local.elastic_alpha: must be in (0, 1), got {self.elastic_alpha!r}")
            if self.outer_optimizer != "average":
                raise ConfigError("local.elastic_alpha: EASGD's elastic pull replaces the outer optimizer; "
                                  "give elastic_alpha or outer_optimizer, not both")


@dataclass(frozen=True)
class SandblasterConfig:
    """Sandblaster L-BFGS (``--strategy sandblaster``): a coordinator runs L-BFGS; each function
    evaluation (loss and gradient over a large batch) is cut into work units for the replicas."""

    lbfgs_batch: int | None = None
    """Examples per L-BFGS iteration's batch; None: the whole training set."""
    work_units: int = 32
    """Work units per function evaluation (many more than replicas: a fast replica takes more)."""
    history: int = 10
    """L-BFGS history size (curvature pairs kept)."""
    iterations: int = 10
    """L-BFGS iterations per epoch (what --epochs counts; evaluation and checkpoints between)."""
    dispatch: str = "queue"
    """queue (units to whichever replica is free, outstanding ones re-issued as backups when the
    queue is empty) or static (each replica an equal share up front, no backups: the baseline)."""

    def __post_init__(self) -> None:
        if self.lbfgs_batch is not None:
            _integer("sandblaster", "lbfgs_batch", self.lbfgs_batch)
            _positive("sandblaster", "lbfgs_batch", self.lbfgs_batch)
        for name in ("work_units", "history", "iterations"):
            _integer("sandblaster", name, getattr(self, name))
            _positive("sandblaster", name, getattr(self, name))
        _choice("sandblaster", "dispatch", self.dispatch, DISPATCH)


@dataclass(frozen=True)
class AsyncConfig:
    """Downpour SGD (``--strategy async``); the server-side optimizer comes from ``optim``."""

    ps_shards: int = 2
    """ParameterShard actors; the flat parameter vector is cut into this many near-equal slices."""
    n_fetch: int = 1
    """A replica pulls fresh parameters from every shard each n_fetch steps."""
    n_push: int = 1
    """A replica pushes its mean gradient since the last push each n_push steps."""
    max_staleness: int | None = None
    """Bounded staleness: a replica more than this many pushes ahead of the slowest waits."""
    staleness_lr: bool = False
    """Scale each update by 1 / max(1, staleness)."""
    warm_start_steps: int | None = None
    """One replica trains alone for this many steps before the others start (DistBelief's
    warmstarting); None: one epoch-equivalent; 0: none. From a random start, replicas pushing
    stale gradients at once can stall AdaGrad for epochs (the default job, seed 1: 93.5% with
    none, 96.6% with one epoch, against sync's 96.4%)."""
    snapshot_every_s: float = 10.0
    """Seconds between each shard's atomic snapshot of its slice, optimizer state and version."""
    ps_cpus: float = 0.0
    """CPUs Ray reserves per parameter shard. 0 by default, like the driver: the replicas take the
    CPUs and the shards, which only apply updates, run beside them, so ``--strategy async`` fits
    wherever the same replicas fit; reserve some on a cluster with CPUs to spare."""
    transport: str = "auto"
    """How replicas reach the shards: auto (shared memory with a shard on the replica's node, Ray
    actor calls with one elsewhere), shm (the same, but every replica and shard must share one
    node) or ray (actor calls and the object store everywhere)."""

    def __post_init__(self) -> None:
        _choice("async", "transport", self.transport, TRANSPORTS)
        for name in ("ps_shards", "n_fetch", "n_push") + (("warm_start_steps",) if self.warm_start_steps is not None else ()):
            _integer("async", name, getattr(self, name))
        for name in ("ps_shards", "n_fetch", "n_push"):
            _positive("async", name, getattr(self, name))
        if self.warm_start_steps is not None:
            _positive("async", "warm_start_steps", self.warm_start_steps, zero_ok=True)
        if self.max_staleness is not None:
            _integer("async", "max_staleness", self.max_staleness)
            _positive("async", "max_staleness", self.max_staleness, zero_ok=True)
        _positive("async", "snapshot_every_s", self.snapshot_every_s)
        _positive("async", "ps_cpus", self.ps_cpus, zero_ok=True)


MEMBER_KEYS = ("model", "seed", "optimizer", "lr", "bagging", "dropout", "weight")


@dataclass(frozen=True)
class EnsembleConfig:
    """Voting ensembles (``--strategy ensemble``)."""

    members: Any = 5
    """K (K copies of model.name with seeds seed, seed+1, ...) or a list of member mappings with
    keys model, seed, optimizer, lr, bagging, dropout, weight (missing keys take the run's)."""
    replicas_per_member: int = 1
    """Each member is a sync group of this many replicas."""
    bagging: bool = False
    """Every member trains on its own seeded bootstrap sample of the training set."""
    weights: list | None = None
    """Optional vote weight per member (same length as the members)."""

    def __post_init__(self) -> None:
        _integer("ensemble", "replicas_per_member", self.replicas_per_member)
        _positive("ensemble", "replicas_per_member", self.replicas_per_member)
        if isinstance(self.members, list):
            if not self.members:
                raise ConfigError("ensemble.members: the member list is empty; give at least one member")
            for i, m in enumerate(self.members):
                if not isinstance(m, Mapping):
                    raise ConfigError(f"ensemble.members[{i}]: expected a mapping, got {m!r}")
                unknown = sorted(set(m) - set(MEMBER_KEYS))
                if unknown:
                    raise ConfigError(f"ensemble.members[{i}]: unknown key {unknown[0]!r}; "
                                      f"allowed: {', '.join(MEMBER_KEYS)}")
                if "model" in m:
                    _model_name(f"ensemble.members[{i}].model", m["model"])
                if "optimizer" in m:
                    _choice(f"ensemble.members[{i}]", "optimizer", m["optimizer"], OPTIMIZERS)
                if "lr" in m:
                    _positive(f"ensemble.members[{i}]", "lr", m["lr"])
            count = len(self.members)
        else:
            _integer("ensemble", "members", self.members)
            _positive("ensemble", "members", self.members)
            count = self.members
        if self.weights is not None:
            if not isinstance(self.weights, list) or len(self.weights) != count:
                raise ConfigError(f"ensemble.weights: expected a list of {count} numbers (one per member), "
                                  f"got {self.weights!r}")
            for w in self.weights:
                _positive("ensemble", "weights", w, zero_ok=True)

    @property
    def count(self) -> int:
        return len(self.members) if isinstance(self.members, list) else int(self.members)
