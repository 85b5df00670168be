"""Checkpoints of every engine: atomic writes (ray_train.run.files), the last N kept,
loading with ``torch.load(weights_only=True)``, and a fallback to the previous checkpoint, with a
warning that names the bad file, when the newest one is corrupt or truncated.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts (no numpy arrays, no
pickled objects: weights_only refuses them). The run loop (ray_train/run/loop.py) writes its counters,
schedule and history, and the engine's own state under ``engine``.
"""
from __future__ import annotations

import json
import os
import re
import sys

from ray_train.errors import CheckpointError, UserError
from ray_train.run import storage
from ray_train.run.files import atomic_write, save_atomic

CKPT_DIR = "checkpoints"
RUN_FILE = "run.json"
# ckpt-<epochs completed>.pt, or ckpt-<epochs completed>-step<steps into the next>.pt for a run
# stopped mid-epoch (signal, time limit)
_NAME = re.compile(r"^ckpt-(\d{6})(?:-step(\d{6}))?\.pt$")


def load_checked(path: str) -> dict:
    """torch.load(weights_only=True); any failure becomes a CheckpointError naming the file."""
    import io

    import torch

    source = io.BytesIO(storage.read_bytes(path)) if storage.is_uri(path) else path
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad magic, unpickling refused: all the same to a user
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict")
    return state


class CheckpointStore:
    """``<run_dir>/checkpoints/ckpt-<index>.pt``, newest last; keeps the ``keep`` most recent."""

    def __init__(self, run_dir: str, keep: int = 3, warn=None) -> None:
        self.dir = os.path.join(run_dir, CKPT_DIR)
        self.keep = keep
        self.warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))

    def paths(self) -> list[str]:
        """Oldest first."""
        found = [(m, n) for n in storage.listdir(self.dir) if (m := _NAME.match(n))]
        found.sort(key=lambda mn: (int(mn[0][1]), int(mn[0][2] or 0)))
        return [os.path.join(self.dir, n) for _, n in found]

    def path(self, epoch: int, in_epoch: int = 0) -> str:
        name = f"ckpt-{epoch:06d}.pt" if not in_epoch else f"ckpt-{epoch:06d}-step{in_epoch:06d}.pt"
        return os.path.join(self.dir, name)

    def save(self, epoch: int, state: dict, in_epoch: int = 0) -> str:
        """Write the checkpoint after ``epoch`` epochs (and ``in_epoch`` steps into the next)
        atomically, then prune."""
        path = save_atomic(self.path(epoch, in_epoch), state)
        for old in self.paths()[: -self.keep]:
            storage.remove(old)
        return path

    def load_latest(self) -> tuple[dict, str] | None:
        """The newest readable checkpoint and its path, or None when there is none. A corrupt
        newer file is reported (warning naming it) and the previous one is used."""
        for path in reversed(self.paths()):
            try:
                return load_checked(path), path
            except CheckpointError as exc:
                self.warn(f"{exc}; falling back to the previous checkpoint")
        return None


def write_run_file(run_dir: str, strategy: str, config: dict) -> None:
    """run.json: what ``--resume`` needs to know before any checkpoint exists."""
    path = os.path.join(run_dir, RUN_FILE)
    data = json.dumps({"strategy": strategy, "config": config}, indent=2).encode()
    atomic_write(path, lambda fh: fh.write(data))


def read_run_file(run_dir: str) -> dict:
    """The stored strategy and config of a run folder, for ``--resume``; UserError if it is not one."""
    storage.check(run_dir)
    if not storage.isdir(run_dir):
        raise UserError(f"--resume: no such run folder: {run_dir}")
    path = os.path.join(run_dir, RUN_FILE)
    if not storage.isfile(path):
        raise UserError(f"--resume: {run_dir} is not a ray_train run folder (no {RUN_FILE})")
    try:
        info = json.loads(storage.read_bytes(path))
        return {"strategy": info["strategy"], "config": dict(info["config"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--resume: {path} is unreadable ({exc})") from None
