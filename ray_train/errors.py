"""Every exception a user of ray-train sees, in one place. UserError and its subclasses are
mistakes the user can fix: the CLI prints the message as one line on stderr and exits with status
2. The others end a run for a reason the CLI maps to its own exit status (docs/summary.md: exit statuses):
ReplicaFailure 1, Diverged 3, Interrupted 128 + the signal."""
from __future__ import annotations

import signal


class UserError(Exception):
    """A mistake the user can fix (bad input, missing file, offline): the CLI prints the message
    as one line on stderr and exits with status 2, without a traceback."""


class ConfigError(UserError, ValueError):
    """A user mistake in the configuration: the message names the field and the allowed values."""


class DataError(UserError):
    """Offline, corrupt or truncated data files; the message names the file and what to do."""


class StorageError(UserError, OSError):
    """A --storage URI that cannot be used: unknown scheme, no such bucket, credentials refused, a
    failed upload; an OSError too, as the local file errors it stands beside."""


class ResourceError(UserError):
    """The cluster cannot place what the run asks for."""


class CheckpointError(UserError):
    """A checkpoint file that cannot be read; the message names the file."""


class ModelFactoryError(UserError):
    """The model factory built the network on the driver but failed inside a replica (a path,
    a module, a device that only the driver has); the message names the replica and the
    factory's own error."""


class ReplicaFailure(RuntimeError):
    """Replicas (or parameter shards) died more often than run.max_failures allows."""


class Diverged(Exception):
    """The loss turned non-finite: the run stopped without checkpointing the broken state."""


class Interrupted(Exception):
    """A signal stopped the run; the checkpoint at the stopping point is written."""

    def __init__(self, signum: int, run_dir: str) -> None:
        self.signum, self.run_dir = signum, run_dir
        what = "terminated" if signum == signal.SIGTERM else "interrupted"
        super().__init__(f"{what}; continue with --resume {run_dir}")
