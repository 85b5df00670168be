"""Where runs live: ``--storage`` is a local folder or a URI (``s3://bucket/path``,
``gs://bucket/path``, any file system ``pyarrow.fs.FileSystem.from_uri`` knows, as Ray Train's
``storage_path``). Every file of a run goes through here: checkpoints, parameter-shard snapshots,
run.json, summary.json, model.pt; the driver and every actor on every node reach the same place,
so a shard restarted on another node finds its snapshot and ``--resume`` works from any machine.

Paths stay strings: a local path is handled by ``os`` exactly as before, a URI by pyarrow (one
file system per bucket and process, built from the environment: credentials as the cloud's SDK
finds them, and ``AWS_ENDPOINT_URL`` for an S3-compatible server). ``os.path.join``,
``basename`` and ``dirname`` work on URIs as they are; ``normpath`` here keeps the ``//``.

Object stores have no rename: a file goes up in one PUT from memory (``write_bytes``), which a
reader sees whole or not at all, as the local atomic writer's rename gives. Event files and
ray.log, which grow, are written to a local folder on the driver and uploaded as they grow
(``Mirror``)."""
from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import sys
import tempfile
import threading
from urllib.parse import urlsplit

from ray_train.errors import StorageError

UPLOAD_SECS = 5  # a growing event file reaches the bucket within about this (plus the writer's flush)
_FILESYSTEMS: dict[tuple, tuple[object, str]] = {}  # (scheme://netloc, env) -> (pyarrow file system, netloc's path)
_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_")
_LOCK = threading.Lock()


def is_uri(path: str) -> bool:
    return "://" in str(path)


def normpath(path: str) -> str:
    if not is_uri(path):
        return os.path.normpath(path)
    parts = urlsplit(path)
    return f"{parts.scheme}://{parts.netloc}{posixpath.normpath(parts.path or '/').rstrip('/')}"


def _resolve(uri: str):
    """(file system, path on it) of a URI; the file system is built once per bucket."""
    parts = urlsplit(uri)
    if parts.query or parts.fragment:
        raise StorageError(f"run.storage: {uri}: a storage URI takes no '?' options; give an S3-compatible "
                           "server's address in AWS_ENDPOINT_URL")
    root = f"{parts.scheme}://{parts.netloc}"
    if not parts.netloc:  # file:///path and the like: nothing to cache per bucket
        return _from_uri(uri)
    # the environment's credentials and endpoint are part of the key: a process that changes them
    # (new credentials, another server) gets a file system that uses them
    key = (root, *sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)))
    with _LOCK:
        if key not in _FILESYSTEMS:
            _FILESYSTEMS[key] = _from_uri(root, uri)
        fs, base = _FILESYSTEMS[key]
    return fs, posixpath.join(base.rstrip("/"), parts.path.lstrip("/")).rstrip("/") or base


def _from_uri(uri: str, shown: str | None = None):
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow: ArrowInvalid (unknown scheme), OSError (no credentials, no library)
        if "Unrecognized filesystem type" in str(exc):
            raise StorageError(f"run.storage: unknown scheme {urlsplit(uri).scheme}:// in {shown or uri}; use a local "
                               "path, s3://BUCKET/PATH or gs://BUCKET/PATH") from None
        raise StorageError(f"run.storage: cannot open {shown or uri}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check(storage: str) -> None:
    """Before Ray starts: a URI's scheme is known, its bucket exists and the credentials reach it.
    A StorageError (one line, exit 2) otherwise. Local folders are checked where the run folder is
    made (run/outputs.py)."""
    if not is_uri(storage):
        return
    import pyarrow.fs

    fs, path = _resolve(storage)
    bucket = urlsplit(storage).netloc
    try:
        if _is_bucket_store(fs) and fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
            raise StorageError(f"run.storage: {storage}: bucket {bucket} does not exist (create it first, or check "
                               "the name and AWS_ENDPOINT_URL)")
        kind = fs.get_file_info(path).type
    except OSError as exc:
        if any(s in str(exc) for s in _DENIED):
            raise StorageError(f"run.storage: {storage}: access to bucket {bucket} denied (check the credentials: "
                               "AWS_ACCESS_KEY_ID / AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS)") from None
        raise StorageError(f"run.storage: cannot reach {storage}: {_first_line(exc)}") from None
    if kind == pyarrow.fs.FileType.File:
        raise StorageError(f"run.storage: {storage} is a file; --storage needs a folder")


_DENIED = ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden",
           "HTTP status 403", "credentials")


def _is_bucket_store(fs) -> bool:
    return type(fs).__name__ in ("S3FileSystem", "GcsFileSystem")


@contextlib.contextmanager
def _reported(path: str, doing: str):
    """An error of the remote file system as a StorageError (one line, and still an OSError)."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        denied = " (access denied: check the credentials)" if any(s in str(exc) for s in _DENIED) else ""
        raise StorageError(f"run.storage: cannot {doing} {path}{denied}: {_first_line(exc)}") from None


def _type(path: str):
    import pyarrow.fs

    fs, inner = _resolve(path)
    with _reported(path, "read"):
        return fs.get_file_info(inner).type, pyarrow.fs.FileType


def exists(path: str) -> bool:
    if not is_uri(path):
        return os.path.exists(path)
    kind, types = _type(path)
    return kind != types.NotFound


def isdir(path: str) -> bool:
    """A URI is a folder when objects lie under it (object stores have no empty folders)."""
    if not is_uri(path):
        return os.path.isdir(path)
    kind, types = _type(path)
    return kind == types.Directory


def isfile(path: str) -> bool:
    if not is_uri(path):
        return os.path.isfile(path)
    kind, types = _type(path)
    return kind == types.File


def listdir(path: str) -> list[str]:
    """The names in a folder; [] when there is none."""
    if not is_uri(path):
        return os.listdir(path) if os.path.isdir(path) else []
    import pyarrow.fs

    fs, inner = _resolve(path)
    with _reported(path, "list"):
        infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, allow_not_found=True))
    return [posixpath.basename(i.path) for i in infos]


def makedirs(path: str) -> None:
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)
    # object stores: a folder appears with its first file


def remove(path: str) -> None:
    if not is_uri(path):
        os.remove(path)
        return
    fs, inner = _resolve(path)
    with _reported(path, "remove"):
        fs.delete_file(inner)


def read_bytes(path: str) -> bytes:
    if not is_uri(path):
        with open(path, "rb") as fh:
            return fh.read()
    fs, inner = _resolve(path)
    with _reported(path, "read"), fs.open_input_stream(inner) as fh:
        return fh.read()


def write_bytes(path: str, data: bytes) -> str:
    """A URI's file in one upload of bytes already in memory: readers see the old file or the new
    one, never part of it (local files: run/files.atomic_write)."""
    assert is_uri(path), path
    fs, inner = _resolve(path)
    with _reported(path, "write"), fs.open_output_stream(inner) as fh:
        fh.write(data)
    return path


def download(folder: str, prefix: str, into: str) -> list[str]:
    """Copy the files of ``folder`` whose names start with ``prefix`` into the local ``into``."""
    names = [n for n in listdir(folder) if n.startswith(prefix)]
    for name in names:
        with open(os.path.join(into, name), "wb") as fh:
            fh.write(read_bytes(os.path.join(folder, name)))
    return names


class Mirror:
    """A local folder on the driver whose files are uploaded to ``remote`` as they grow (every
    UPLOAD_SECS, from a thread, and at ``close``): the event files, which TensorBoard's writer
    appends to, and ray.log, for a run whose storage is a URI. Each changed file goes up whole
    (object stores cannot append); unchanged ones are left alone."""

    def __init__(self, remote: str, every_s: float = UPLOAD_SECS) -> None:
        self.remote, self.every_s = remote, every_s
        self.local = tempfile.mkdtemp(prefix="ray_train-upload-")
        self.sent: dict[str, tuple[int, int]] = {}
        self.lock = threading.Lock()
        self.warned = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="ray_train-upload", daemon=True)
        self.thread.start()

    def sync(self) -> int:
        """Upload every file changed since the last sync; returns how many went up."""
        sent = 0
        with self.lock:
            for name in sorted(os.listdir(self.local)):
                full = os.path.join(self.local, name)
                try:
                    st = os.stat(full)
                    if not os.path.isfile(full) or self.sent.get(name) == (st.st_size, st.st_mtime_ns):
                        continue
                    with open(full, "rb") as fh:
                        data = fh.read()
                except FileNotFoundError:
                    continue
                write_bytes(os.path.join(self.remote, name), data)
                self.sent[name] = (st.st_size, st.st_mtime_ns)
                sent += 1
        return sent

    def _loop(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                self.sync()
            except Exception as exc:  # noqa: BLE001 - the run goes on; the next sync and close() try again
                if not self.warned:
                    self.warned = True
                    print(f"warning: uploading event files to {self.remote} failed ({_first_line(exc)}); "
                          "retrying", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Stop the thread, upload what changed, remove the local folder (kept, and named in a
        warning, when the last upload fails)."""
        self.stop.set()
        self.thread.join()
        try:
            self.sync()
        except Exception as exc:  # noqa: BLE001 - never hide what ended the run behind an upload error
            print(f"warning: uploading event files to {self.remote} failed ({_first_line(exc)}); they stay in "
                  f"{self.local}", file=sys.stderr, flush=True)
            return
        shutil.rmtree(self.local, ignore_errors=True)


@contextlib.contextmanager
def driver_folder(run_dir: str, keep: tuple[str, ...] = ("ray.log",)):
    """For a URI: a Mirror whose local folder takes the run's growing files (event files,
    ray.log), uploaded as they grow and once more on the way out; the ``keep`` files a resumed
    run already has are fetched first, so they go on growing. None for a local run folder: they
    are written there directly."""
    if not is_uri(run_dir):
        yield None
        return
    from ray_train import raylog

    mirror = Mirror(run_dir)
    try:
        for name in keep:
            path = os.path.join(run_dir, name)
            if exists(path):
                with open(os.path.join(mirror.local, name), "wb") as fh:
                    fh.write(read_bytes(path))
        yield mirror
    finally:
        raylog.LOG.to_file(None)  # Ray's lines after the run wait in raylog's buffer, as between runs
        mirror.close()


def local_only(path: str, command: str) -> None:
    """compare and search write tables and per-trial logs with plain file calls: local folders only."""
    if is_uri(path):
        raise StorageError(f"run.storage: {command} writes to a local folder (or one every node mounts), not "
                           f"{path}; a URI is for training runs (python -m ray_train --storage {path})")
