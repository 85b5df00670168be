"""The flags every subcommand shares, in one table (COMMON_FLAGS, then each strategy's own flags
from the registry), so that the YAML keys and the flags cannot drift apart and train, compare and
search accept the same training and output flags. docs/cli.md is generated from here
(scripts/cli_reference.py; a test fails when it is out of date)."""
from __future__ import annotations

import argparse
import datetime as _dt

from ray_train import strategies
from ray_train.config import (ALLREDUCE, DATA_ON_DEVICE, DATASETS, INITS, LOSSES, PIPELINE_SCHEDULES, PLACEMENTS,
                              PRECISIONS, SCHEDULES, load_yaml)
from ray_train.errors import UserError
from ray_train.fields import OPTIMIZERS, did_you_mean
from ray_train.strategies.base import Flag

def replica_spec(text: str) -> str:
    """--replicas: N or MIN-MAX, handed to resources.replicas as written (which checks the numbers)."""
    import re

    if not re.fullmatch(r"\s*-?\d+\s*(-\s*\d+\s*)?", text):
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX (e.g. 2 or 2-4), got {text!r}")
    return text


# flag -> (section, field, type, help)
COMMON_FLAGS: list[Flag] = [
    ("--strategy", "run", "strategy", str, f"training strategy: {', '.join(strategies.names())} (default "
     f"{strategies.DEFAULT}; docs/strategies.md)"),
    ("--model", "model", "name", str, "network from models/ (mlp30, mlp100, net_a, net_b, net_c, net_d, net_d_maxout, net_h; default net_d) "
     "or package.module:function"),
    ("--dataset", "data", "dataset", str, f"{', '.join(DATASETS)} (default mnist5k, embedded), "
     "idx:DIR, npz:FILE, or streamed by Ray Data: images:DIR (DIR/train/<class>/*.png ...), parquet:PATH"),
    ("--data-dir", "data", "data_dir", str, "folder with the four MNIST IDX files (else downloaded to the cache)"),
    ("--replicas", "resources", "replicas", replica_spec, "replica actors: N, or MIN-MAX for an elastic count that starts with as "
     "many as fit, shrinks on a node loss and grows back at epoch ends (" + ", ".join(s.name for s in strategies.all_strategies() if s.resizes) + "; docs/cluster.md) (default 2)"),
    ("--cpus-per-replica", "resources", "cpus_per_replica", float, "CPUs per replica; fractions allowed (default 1)"),
    ("--gpus-per-replica", "resources", "gpus_per_replica", float, "GPUs per replica; fractions share a GPU (default 0)"),
    ("--placement", "resources", "placement", str, f"placement-group strategy: {', '.join(PLACEMENTS)} (default PACK)"),
    ("--epochs", "run", "epochs", int, "passes over the training set (default 12)"),
    ("--batch-size", "run", "batch_size", int, "examples per step per replica (default 64)"),
    ("--optimizer", "optim", "optimizer", str, f"{', '.join(OPTIMIZERS)} (default: the strategy's own: "
     + ", ".join(f"{s.optimizer} for {s.name}" for s in strategies.all_strategies()) + ")"),
    ("--lr", "optim", "lr", float, "initial learning rate (default: the optimizer's: 0.05 for sgd, momentum, nesterov; 0.01 adagrad; "
     "0.001 rmsprop, adam, amsgrad; 1.0 adadelta)"),
    ("--momentum", "optim", "momentum", float, "momentum mu for momentum/nesterov (default 0.9)"),
    ("--weight-decay", "optim", "weight_decay", float, "L2 per step on weights, not biases (default 0)"),
    ("--l2-lambda", "optim", "l2_lambda", float, "Nielsen's L2 lambda instead of --weight-decay: the per-step decay "
     "is derived from it and the training-set size (see --l2-cost)"),
    ("--l2-cost", "optim", "l2_cost", str, "how lambda enters the cost: network2 (ch. 3, decay lambda/n) or network3 "
     "(ch. 6 conv nets, decay lambda*m/n) (default network2)"),
    ("--l1", "optim", "l1", float, "L1 regularisation: gradient += L1 * sign(w) on weights (default 0)"),
    ("--max-norm", "optim", "max_norm", float, "max-norm constraint: after each step every unit's incoming weights "
     "are scaled to norm <= C (sync, ensemble; default off)"),
    ("--loss", "model", "loss", str, f"cost: {', '.join(LOSSES)} (mse, l1: float targets, regression), or your own "
     "package.module:function (outputs, targets) -> scalar (default log_likelihood: softmax outputs)"),
    ("--init", "model", "init", str, f"weight initialisation: {', '.join(INITS)} (scaled: N(0, 1/n_in), default; "
     "normal: N(0, 1))"),
    ("--schedule", "optim", "schedule", str, f"learning-rate schedule: {', '.join(SCHEDULES)} (default constant)"),
    ("--early-stop", "optim", "early_stop", int, "stop after N evaluations without a better validation accuracy (default 0: off)"),
    ("--dropout", "model", "dropout", float, "dropout on fully connected layers (default: the network's own)"),
    ("--seed", "run", "seed", int, "seed for initialisation and data order (default 0)"),
    ("--run-name", "run", "run_name", str, "run folder name (default <strategy>-<model>-<time>)"),
    ("--storage", "run", "storage", str, "where run folders go: a folder or a bucket, s3://BUCKET/PATH or gs://BUCKET/PATH (default runs)"),
    ("--eval-every", "run", "eval_every", int, "evaluate every N epochs (default 1)"),
    ("--log-every", "run", "log_every", int, "steps between streamed training metrics (default 10)"),
    ("--allreduce", "run", "allreduce", str, f"gradient averaging for sync: {', '.join(ALLREDUCE)} (default auto)"),
    # GPU readiness (docs/gpu.md)
    ("--precision", "run", "precision", str, f"arithmetic of forward and loss: {', '.join(PRECISIONS)} (autocast; fp16 "
     "with a loss scale; parameters, gradients and their averaging stay fp32; default fp32)"),
    ("--data-on-device", "resources", "data_on_device", str, f"keep the training set on the replica's device: "
     f"{', '.join(DATA_ON_DEVICE)} (auto: on a GPU when it takes at most 1/4 of the replica's share of its memory; "
     "default auto)"),
    ("--expand", "data", "expand", bool, "add Nielsen's 1-pixel shifted copies of the training data (5x)"),
    ("--validation", "data", "validation", float, "share of the training set held out for validation, which the "
     "schedule, early stopping, target accuracy and model.pt read (default: the dataset's own: mnist the last 10,000, "
     "mnist5k 500, others 0.1; 0: none)"),
    ("--standardize", "data", "standardize", bool, "standardise inputs with the training split's mean and std "
     "(kept in model.pt)"),
    # model parallelism: each replica a pipeline of stage actors (docs/pipeline.md)
    ("--stages", "pipeline", "stages", int, "stage actors per replica, each with --cpus-per-replica CPUs and "
     "consecutive layers (default 1: no pipeline; strategies that take it: " + ", ".join(s.name for s in strategies.all_strategies() if s.pipelined) + ")"),
    ("--micro-batches", "pipeline", "micro_batches", int, "micro-batches each replica's batch is cut into; must divide "
     "--batch-size (default 1)"),
    ("--pipeline-schedule", "pipeline", "schedule", str, f"{', '.join(PIPELINE_SCHEDULES)}: GPipe (all forwards, then all "
     "backwards) or 1F1B (at most S micro-batches held per stage) (default 1f1b)"),
    ("--split-at", "pipeline", "split_at", str, "NAME,...: layers where a new stage begins (default: balanced by "
     "parameter count)"),
    # streamed datasets (images:DIR, parquet:PATH; docs/data.md)
    ("--image-size", "data", "image_size", str, "H,W: resize every image of images:DIR (else all must be one size); "
     "for parquet, the shape of flat rows"),
    ("--feature-column", "data", "feature_column", str, "parquet input column (default: the first of image, x, "
     "features, pixels)"),
    ("--label-column", "data", "label_column", str, "parquet integer label column (default: the first of label, y, "
     "labels, target)"),
    ("--test-path", "data", "test_path", str, "parquet test split: a file, folder or URI"),
    ("--split-column", "data", "split_column", str, "parquet column whose values train, test, val pick each row's split"),
    ("--shuffle-buffer", "data", "shuffle_buffer", int, "rows in each replica's seeded shuffle buffer over its "
     "streamed shard (default 1000; 0: none)"),
    ("--stream-cache", "data", "stream_cache", float, "streamed splits that fit this share of the object store are "
     "read into it once and every epoch reads them from there (default 0.25; 0: from the files every epoch)"),
    # checkpoints, resume, failures, stop conditions (every strategy)
    ("--resume", "run", "resume", str, "continue the run in this folder (runs/<name>) from its last checkpoint"),
    ("--checkpoint-every", "run", "checkpoint_every", int, "epochs between checkpoints (default 1)"),
    ("--keep-checkpoints", "run", "keep_checkpoints", int, "most recent checkpoints kept (default 3)"),
    ("--max-failures", "run", "max_failures", int, "replica failures survived before giving up (default 3)"),
    ("--target-accuracy", "run", "target_accuracy", float, "stop once validation accuracy (test without a validation split) reaches this, 0-1 (default off)"),
    ("--target-loss", "run", "target_loss", float, "stop once validation loss (test without a validation split) is at "
     "or below this; any targets, the stop rule for regression (default off)"),
    ("--time-limit", "run", "time_limit", float, "stop after this many seconds of training (default off)"),
    ("--slow-replica", "run", "slow_replica", str, "RANK:FACTOR: replica RANK's steps take FACTOR times as long (it "
     "sleeps); a testing and benchmarking aid for straggler tolerance (default off)"),
]


# Flags the subcommands set themselves: the run folder, and a resume that means nothing there.
OWN_FLAGS = ("--run-name", "--resume")


def training_flags() -> list[Flag]:
    """Every flag that sets a config field: the common ones, then each strategy's, in registry order."""
    return COMMON_FLAGS + [f for s in strategies.all_strategies() for f in s.flags]


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (a UserError: exit 2) and no abbreviated long flags."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:  # one line, exit 2 (argparse would add the usage)
        if message.startswith("unrecognized arguments:"):
            known = [s for a in self._actions for s in a.option_strings]
            for word in message.split(":", 1)[1].split():
                if word.startswith("-"):
                    message += did_you_mean(word.split("=")[0], known)
                    break
        raise UserError(f"{message} (see --help)")


def add_training_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """--config and every training flag except ``skip``."""
    sections = ", ".join(["run", "data", "model", "optim", "resources"] + list(strategies.sections()))
    parser.add_argument("--config", metavar="FILE", help=f"YAML file with sections {sections} (see configs/)")
    for flag, _, _, typ, help_ in training_flags():
        if flag in skip:
            continue
        if typ is bool:
            parser.add_argument(flag, action="store_true", default=None, help=help_)
        else:
            parser.add_argument(flag, type=typ, default=None, help=help_)


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """What a run writes and shows: the same for train, compare and search."""
    parser.add_argument("--no-tensorboard", action="store_true", help="write no event files")
    bar = parser.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="show progress bars even when stdout is not a terminal")
    bar.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bars (by default they show only on a terminal)")


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    """Which Ray cluster, and whether Ray's own output shows: the same for train, compare and search."""
    from ray_train.cluster import ADDRESS_HELP

    parser.add_argument("--address", default=None, metavar="local|auto|HOST:PORT", help=ADDRESS_HELP)
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own output (its warnings, its workers' and raylet's messages) on the terminal "
                        "too; it always goes to the run folder's ray.log")


def overrides_of(args, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """The config fields the parsed flags set, as {section: {field: value}}."""
    overrides: dict[str, dict] = {}
    for flag, section, field, _, _ in training_flags():
        if flag in skip:
            continue
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            overrides.setdefault(section, {})[field] = value
    return overrides


def job_values(args, skip: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(the YAML file's sections, the flags' overrides) of a parsed command line."""
    return (load_yaml(args.config) if args.config else {}), overrides_of(args, skip)


def stamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
