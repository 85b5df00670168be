"""The one atomic writer: a temporary file in the same folder, fsync, rename. A reader (TensorBoard,
--resume, a user's script) never sees half a file, and a failed or interrupted write leaves the
previous file and no debris. Checkpoints, model files, summary.json and run.json all go through it.
A URI (remote --storage, ray_train.run.storage) is written in one upload of the bytes instead,
which object stores make atomic too."""
from __future__ import annotations

import io
import json
import os
from typing import Any, BinaryIO, Callable

import numpy as np

from ray_train.run import storage


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> str:
    if storage.is_uri(path):
        buf = io.BytesIO()
        write(buf)
        return storage.write_bytes(path, buf.getvalue())
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_atomic(path: str, obj: Any) -> str:
    """torch.save, atomically."""
    import torch

    return atomic_write(path, lambda fh: torch.save(obj, fh))


def write_json(path: str, payload: dict) -> str:
    """JSON (numpy scalars and arrays converted), atomically."""
    data = (json.dumps(payload, indent=2, default=_jsonable) + "\n").encode()
    return atomic_write(path, lambda fh: fh.write(data))


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
