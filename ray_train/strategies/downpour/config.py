"""The config section of --strategy async, Downpour SGD (YAML section ``async``)."""
from __future__ import annotations

from dataclasses import dataclass

from ray_train.fields import _choice, _integer, _positive

TRANSPORTS = ("auto", "shm", "ray")


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
