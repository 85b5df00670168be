"""The command line: ``python -m ray_train`` (or ``ray-train``) trains (cli/train.py); the
subcommands ``compare``, ``search`` and ``predict`` have modules of their own. The flags they share are in
cli/flags.py.

Exit statuses (docs/summary.md): 0 done, 1 replicas died too often, 2 user error, 3 diverged,
4 the overfit check failed, 130 interrupted (SIGINT), 143 terminated (SIGTERM).
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable

from ray_train.errors import Diverged, Interrupted, ReplicaFailure, UserError

SUBCOMMANDS = ("compare", "search", "predict")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "train"
    module = importlib.import_module(f"ray_train.cli.{command}")
    return module.main(argv[1:] if command != "train" else argv)


def fail(message: str, status: int) -> int:
    print(f"ray_train: {message}", file=sys.stderr, flush=True)
    return status


def exit_status(work: Callable[[], int]) -> int:
    """Run a command, turning what ended it into one line on stderr and its exit status."""
    try:
        return work()
    except Diverged as exc:
        return fail(f"diverged: {exc}", 3)
    except Interrupted as exc:
        return fail(str(exc), 128 + exc.signum)
    except ReplicaFailure as exc:
        return fail(f"error: {exc}", 1)
    except UserError as exc:
        return fail(f"error: {exc}", 2)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run started
        return fail("interrupted", 130)
