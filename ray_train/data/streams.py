"""Training data that Ray Data streams to the replicas instead of one array the driver loads whole
(docs/data.md). ``StreamData`` holds the lazy ray.data Datasets of each split and what the driver
may know without reading the inputs: the labels (small, read from file names or one column), the
classes, the input shape and two test inputs for the model check.

Every epoch the driver cuts the training split afresh: its blocks in a seeded random order
(``randomize_block_order``), then ``streaming_split(n, equal=True)`` into one shard per replica
(equal rows, so equal steps), with the replicas' nodes as locality hints. The replica iterates
its shard with a seeded local shuffle buffer and prefetching (ray_train/worker/stream.py). With
``preserve_order`` set, blocks reach the splitter in the same order every time, so the shards and
batches of an epoch depend only on the seed and the epoch: a run is repeatable and a resumed run
continues with the same shuffles. A stored stream (``cached``: small data read once into the
object store) is cut with ``split`` instead, and each replica gets its piece as block references
(``StoredShard``) that it takes whole and batches itself.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ray_train.errors import DataError
from ray_train.worker.stream import StoredShard, epoch_seed, inputs_of

# Ray Data reads this at import (driver) and in every worker the local cluster starts from this
# environment: its INFO lines ("Starting execution of Dataset ...") are no output the user asked for.
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")

def quiet_context():
    """Ray Data's context for every run: no progress bars, blocks in a repeatable order."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = True
    ctx.execution_options.verbose_progress = False
    return ctx


@dataclass(frozen=True)
class Streams:
    """Ray Data datasets handed to ``ray_train.fit(data=...)``: ``train``, ``test`` and optionally
    ``val``, each with a ``feature`` column (an image [H, W, C] / [H, W] / [C, H, W], or numbers of
    any shape) and an integer ``label`` column. ``transform`` (every split) and ``train_transform``
    (training batches only, after ``transform``: augmentation) take and return a batch as a dict
    of numpy arrays, as Ray Data's ``map_batches`` gives it; they run in the replicas."""

    train: Any
    test: Any
    val: Any = None
    feature: str = "x"
    label: str = "y"
    transform: Callable | None = None
    train_transform: Callable | None = None
    classes: tuple[str, ...] | None = None
    name: str = "ray.data"


@dataclass
class StreamData:
    """A dataset Ray Data streams; it answers the questions the run asks of an in-memory
    ``Dataset`` (labels, classes, input shape) without holding the inputs."""

    name: str
    splits: dict  # "train", "test" and maybe "val": lazy ray.data Datasets
    feature: str
    label: str | None  # None: the label comes from the image's folder (``path`` column)
    y_train: np.ndarray
    y_test: np.ndarray
    y_val: np.ndarray | None
    input_shape: tuple[int, ...]
    head: np.ndarray  # two test inputs as the replicas see them before transforms, [2, ...]
    num_classes: int
    classes: tuple[str, ...] | None = None
    layout: str = "array"  # "hwc": images as read ([H, W, C] or [H, W]) go to [C, H, W]
    transform: Callable | None = None
    train_transform: Callable | None = None
    standardize: dict | None = None
    expand: bool = False
    shuffle_buffer: int = 1000
    cache_share: float = 0.25  # data.stream_cache: the object store's share a cached stream may take
    stored: bool = False  # every split read into the object store (``cached``): shards cut on the driver
    streamed: bool = field(default=True, init=False)
    # a stream's labels are integer classes (regression takes in-memory arrays: docs/data.md)
    regression: bool = field(default=False, init=False)
    target_shape: tuple = field(default=(), init=False)

    @property
    def has_validation(self) -> bool:
        return self.y_val is not None

    @property
    def class_names(self) -> tuple[str, ...] | None:
        return self.classes

    def head_inputs(self) -> np.ndarray:
        return self.head

    # -- the driver cuts, the replicas read -------------------------------------------------
    def cached(self, out=None) -> "StreamData":
        """This stream with every split read once into the object store (Ray Data's
        ``materialize``, before training) when its rows fit ``cache_share`` of the cluster's object
        store; every epoch and evaluation then reads the stored blocks, cut on the driver, not the
        files. A small set's streamed epoch is otherwise mostly a new execution's start (read
        tasks, decoding, the filter on a split column, the split coordinator): 1.2 s of a 1.8 s
        epoch of the default job from parquet on the development VM. Data larger than that share
        stays streamed from the files, every epoch."""
        import dataclasses
        import time

        import ray

        budget = self.cache_share * ray.cluster_resources().get("object_store_memory", 0.0)
        row = int(np.prod(self.input_shape)) * (1 if self.head.dtype == np.uint8 else 4) + ROW_OVERHEAD
        rows = {"train": len(self.y_train), "test": len(self.y_test),
                **({"val": len(self.y_val)} if "val" in self.splits else {})}
        size = sum(rows.values()) * row
        if not size or size > budget:
            return self
        t0 = time.perf_counter()
        quiet_context()
        # at least STORED_BLOCKS blocks (of at most STORED_BLOCK_ROWS rows): each epoch's seeded
        # block order then deals every replica a different share (one parquet file of a few MB
        # reads as one block, which would give each replica the same rows every epoch)
        stored = {split: ds.repartition(min(rows[split], max(STORED_BLOCKS, rows[split] // STORED_BLOCK_ROWS)))
                  .materialize() for split, ds in self.splits.items()}
        if out is not None:
            print(f"streamed data: {', '.join(stored)} read into the object store once ({size / 2**20:,.0f} MB, "
                  f"{time.perf_counter() - t0:.1f} s); every epoch reads it from there (--stream-cache 0: from the "
                  "files)", file=out, flush=True)
        return dataclasses.replace(self, splits=stored, stored=True)

    def epoch_plan(self, seed: int, epoch: int):
        """The training split with this epoch's seeded block order (a lazy ray.data Dataset; for a
        stored stream, its blocks in that order as one ``StoredShard``)."""
        from ray.data import RandomSeedConfig

        quiet_context()
        if self.stored:
            return StoredShard(self.splits["train"].randomize_block_order(seed=epoch_seed(seed, epoch)).materialize())
        return self.splits["train"].randomize_block_order(
            seed=RandomSeedConfig(seed=epoch_seed(seed, epoch), reseed_after_execution=False))

    def train_shards(self, seed: int, epoch: int, n: int, hints: list[str] | None) -> list:
        """The training split's shard for each of ``n`` replicas (DataIterators), from ``epoch`` on:
        iterated again, each gives the next epoch's shard (one split coordinator for the run).

        Ray Data reseeds the block order of every execution from the base seed and its context's
        execution count (``RandomSeedConfig(reseed_after_execution=True)``); the split's copy of the
        context starts that count at ``epoch``, and every epoch is one execution (Ray Data counts a
        partly read one too), so epoch e's order is the same whichever epoch the split began at:
        a resumed run or a rebuilt group continues with the same shuffles."""
        from ray.data import RandomSeedConfig

        quiet_context()
        if self.stored:  # this epoch's shards only, cut on the driver from the stored blocks (no reading)
            ordered = self.splits["train"].randomize_block_order(seed=epoch_seed(seed, epoch))
            return [StoredShard(p) for p in ordered.split(n, equal=True, locality_hints=_hints(hints, n))]
        ds = self.splits["train"].randomize_block_order(
            seed=RandomSeedConfig(seed=epoch_seed(seed, 0), reseed_after_execution=True))
        ds.context._execution_idx = epoch  # private in Ray Data 2.60: what reseeds each execution
        return ds.streaming_split(n, equal=True, locality_hints=_hints(hints, n))

    def eval_shards(self, split: str, n: int, hints: list[str] | None) -> list:
        """``split`` cut among ``n`` replicas (every row once); the iterators can be read again."""
        quiet_context()
        if n == 1:
            return [StoredShard(self.splits[split]) if self.stored else self.splits[split].iterator()]
        if self.stored:
            return [StoredShard(p) for p in self.splits[split].split(n, equal=False, locality_hints=_hints(hints, n))]
        return self.splits[split].streaming_split(n, equal=False, locality_hints=_hints(hints, n))


STORED_BLOCKS, STORED_BLOCK_ROWS = 16, 256  # blocks of a stream read into the object store: at least, rows at most
ROW_OVERHEAD = 64  # bytes a stored row takes besides its inputs (label, path, Arrow offsets): an estimate
DATA_CPUS = 1.0  # what a streamed run leaves free for Ray Data's reading and decoding tasks
LEAST_REPLICA_CPUS = 0.1  # below this a replica's share is too small to train at all


def replica_cpus(total: float, fixed: float, bundles: int, per: float) -> float:
    """The CPUs each of ``bundles`` replica bundles may take so that Ray Data keeps DATA_CPUS of the
    cluster's ``total`` (``fixed``: what other bundles take, parameter shards): ``per`` when that
    leaves them already, else less, rounded down to 0.01; a ResourceError when not even
    LEAST_REPLICA_CPUS each would fit."""
    from ray_train.errors import ResourceError

    if total - fixed - bundles * per >= DATA_CPUS - 1e-9:
        return per
    share = math.floor((total - fixed - DATA_CPUS) / bundles * 100 + 1e-6) / 100
    if share < LEAST_REPLICA_CPUS:
        raise ResourceError(f"data.dataset: a streamed dataset needs {DATA_CPUS:g} CPU free for Ray Data's reading "
                            f"tasks besides {bundles} replica(s) of at least {LEAST_REPLICA_CPUS:g} CPU; the cluster has "
                            f"{total:g} CPUs: lower --replicas or add CPUs")
    return share


def _hints(hints: list[str] | None, n: int) -> list[str] | None:
    return list(hints) if hints and len(hints) == n and len(set(hints)) > 1 else None


def labels_array(name: str, values) -> np.ndarray:
    """Integer class labels or a DataError naming where they came from."""
    y = np.asarray(values)
    if y.dtype == object or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)) \
            or y.dtype == np.bool_:
        raise DataError(f"{name}: labels must be integers 0 .. classes - 1, got {y.dtype} values")
    if np.issubdtype(y.dtype, np.floating):
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise DataError(f"{name}: labels must be integers 0 .. classes - 1, got non-integer floats")
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise DataError(f"{name}: label {int(y.min())} is negative; labels are 0 .. classes - 1")
    return y


def standardized(data: StreamData) -> StreamData:
    """Mean and deviation per input element from one pass over the training split (streamed
    through the driver, never held whole), as the in-memory ``standardized`` computes them."""
    import dataclasses

    quiet_context()
    total, squares, n = None, None, 0
    for batch in data.splits["train"].iter_batches(batch_size=1024, batch_format="numpy"):
        raw = inputs_of(data, batch)
        x = raw.astype(np.float64) / (255.0 if raw.dtype == np.uint8 else 1.0)
        total = x.sum(0) if total is None else total + x.sum(0)
        squares = (x * x).sum(0) if squares is None else squares + (x * x).sum(0)
        n += len(x)
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0)).astype(np.float32)
    std[std < 1e-6] = 1.0
    return dataclasses.replace(data, standardize={"mean": mean.astype(np.float32), "std": std})
