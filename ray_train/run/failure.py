"""One failure policy for every engine, after Ray Train v2's FailurePolicy: each death of a replica
or parameter shard is recorded; RESTART while the count is within ``run.max_failures``, RAISE (one
error type, ReplicaFailure) after. The loop rebuilds a sync group from its last checkpoint; Ray
restarts Downpour's actors in place."""
from __future__ import annotations

import enum

from ray_train.errors import ReplicaFailure


class ReplicaDied(Exception):
    """Raised by an engine whose replica died in a way only a restart from a checkpoint can heal
    (sync: the collective lost a member). ``info`` describes the failure: rank, pid, error."""

    def __init__(self, info: dict) -> None:
        super().__init__(info)
        self.info = info


def actor_died(exc: BaseException) -> bool:
    """Whether ``exc`` is Ray's word that an actor died (its process or its node), not that its
    constructor raised (a user's factory failing in the replica: a user error, reported as such),
    without importing Ray where no Ray is loaded (the loop runs without it in tests)."""
    import sys

    exceptions = sys.modules.get("ray.exceptions")
    return (exceptions is not None and isinstance(exc, exceptions.RayActorError)
            and not getattr(exc, "actor_init_failed", False))


class Decision(enum.Enum):
    RESTART = "restart"
    RAISE = "raise"


class FailurePolicy:
    def __init__(self, max_failures: int, failures: list[dict] | None = None) -> None:
        self.max_failures = max_failures
        self.failures: list[dict] = list(failures or [])

    def decide(self, failure: dict) -> Decision:
        """Record ``failure`` and say what to do about it."""
        self.failures.append(failure)
        return Decision.RAISE if len(self.failures) > self.max_failures else Decision.RESTART

    def give_up(self, what: str, resume_hint: str | None = None) -> ReplicaFailure:
        """The error to raise after a RAISE decision; ``what`` says who died, and where."""
        hint = f"; continue with --resume {resume_hint}" if resume_hint else ""
        return ReplicaFailure(f"{what}; giving up after {len(self.failures)} failure(s) "
                              f"(run.max_failures is {self.max_failures}){hint}")
