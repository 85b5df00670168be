"""How many replicas a run has, after Ray Train v2's ScalingPolicy: a fixed count (``--replicas
N``), or an elastic one (``--replicas MIN-MAX``) that starts with as many replicas as fit, goes on
with fewer after a node loss and grows back at an epoch end once there is room. The run loop asks
``start_count`` each time it (re)starts the engine and ``grow_to`` after each epoch; the
engine is then started with ``resources.replicas`` set to the count (docs/cluster.md, "Elastic
replica counts", says what stays fixed when it changes)."""
from __future__ import annotations

import dataclasses

from ray_train.config import TrainConfig

# How long a placement for more than MIN replicas may take before fewer are tried. A feasible
# placement group was ready in 0.0-1.0 s on the loaded 2-core development VM (the 1.0 s while the
# group just shut down handed its CPUs back); one Ray cannot place waits for ever. Right after a
# node is lost, Ray still counts its resources for a while (its health check has not failed yet),
# so the count before the loss is tried and this is what a shrink waits. Too short a wait only
# costs a replica until the next epoch end, which grows the group back.
PROBE_S = 5.0


def scaling_policy(cfg: TrainConfig, strategy) -> "FixedScaling":
    """Elastic where the config asks for it and the strategy resizes; else fixed. Inside a Ray
    Tune trial the count is fixed at MAX: the trial's placement group holds MAX replicas."""
    from ray_train.cluster import trial_placement_group

    if cfg.resources.elastic and strategy.resizes and trial_placement_group() is None:
        return ElasticScaling(cfg)
    return FixedScaling(cfg)


def with_replicas(cfg: TrainConfig, count: int) -> TrainConfig:
    """``cfg`` with ``count`` replicas (what the engine reads); a --slow-replica rank that the
    smaller group lacks is dropped with it."""
    from ray_train.config import slow_replica

    run = cfg.run
    if run.slow_replica is not None and slow_replica(run.slow_replica)[0] >= count:
        run = dataclasses.replace(run, slow_replica=None)
    return dataclasses.replace(cfg, run=run, resources=dataclasses.replace(cfg.resources, replicas=count))


class FixedScaling:
    """``resources.replicas`` replicas, always."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.res, self.stages = cfg.resources, cfg.pipeline.stages
        self.least, self.most = self.res.fewest, self.res.replicas

    def start_count(self, hint: int | None = None) -> int:
        return self.most

    def grow_to(self, current: int) -> int | None:
        """The larger count to restart with now, or None."""
        return None


class ElasticScaling(FixedScaling):
    """Between ``min_replicas`` and ``replicas``."""

    def start_count(self, hint: int | None = None) -> int:
        """As many as fit, up to MAX, trying ``hint`` first when it is more (the count before a
        restart: the group just shut down may not have handed its resources back yet); MIN when
        fewer fit (the engine's placement then waits for them, cluster.PLACEMENT_TIMEOUT_S, as
        for a fixed count). The free resources Ray sums up may still count a node that has just
        died: each count above MIN is placed before it is taken."""
        from ray_train.cluster import placeable, room_for

        hint = min(hint or 0, room_for(self.res, self.stages, in_all=True))  # not past the nodes still alive
        count = min(self.most, max(self.least, room_for(self.res, self.stages), hint))
        while count > self.least and not placeable(self.res, count * self.stages, PROBE_S):
            count -= 1
        return count

    def grow_to(self, current: int) -> int | None:
        """``current`` plus the replicas the free resources hold beside the ``current`` ones
        (which hold theirs), when at least one more can be placed; else None."""
        from ray_train.cluster import placeable, room_for

        more = min(self.most - current, room_for(self.res, self.stages))
        if more < 1 or not placeable(self.res, self.stages, PROBE_S):
            return None
        return current + more
