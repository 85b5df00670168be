"""Command line: ``python -m ray_train`` and ``python scripts/train.py``.

Flags override the YAML file given with --config, which overrides the defaults. A user mistake
prints one line on stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys

from ray_train.config import (ALLREDUCE, DATASETS, DISPATCH, INITS, LOSSES, OPTIMIZERS, OUTER_OPTIMIZERS, PLACEMENTS,
                              SCHEDULES, STRATEGIES, UserError, build_config, load_yaml)

# flag -> (section, field, type, help); one table, so the YAML keys and the flags cannot drift apart.
FLAGS: list[tuple[str, str, str, type, str]] = [
    ("--strategy", "run", "strategy", str, f"training strategy: {', '.join(STRATEGIES)} (default sync)"),
    ("--model", "model", "name", str, "network from models/ (mlp30, mlp100, net_a, net_b, net_c, net_d, net_d_maxout, net_h; default net_d) "
     "or package.module:function"),
    ("--dataset", "data", "dataset", str, f"{', '.join(DATASETS)} (default mnist5k, embedded)"),
    ("--data-dir", "data", "data_dir", str, "folder with the four MNIST IDX files (else downloaded to the cache)"),
    ("--replicas", "resources", "replicas", int, "replica actors (default 2)"),
    ("--cpus-per-replica", "resources", "cpus_per_replica", float, "CPUs per replica; fractions allowed (default 1)"),
    ("--gpus-per-replica", "resources", "gpus_per_replica", float, "GPUs per replica; fractions share a GPU (default 0)"),
    ("--placement", "resources", "placement", str, f"placement-group strategy: {', '.join(PLACEMENTS)} (default PACK)"),
    ("--epochs", "run", "epochs", int, "passes over the training set (default 12)"),
    ("--batch-size", "run", "batch_size", int, "examples per step per replica (default 64)"),
    ("--optimizer", "optim", "optimizer", str, f"{', '.join(OPTIMIZERS)} (default: momentum for sync, ensemble, local and hogwild, adagrad for async, "
     "lbfgs (only) for sandblaster)"),
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
    ("--loss", "model", "loss", str, f"cost: {', '.join(LOSSES)} (default log_likelihood: softmax outputs)"),
    ("--init", "model", "init", str, f"weight initialisation: {', '.join(INITS)} (scaled: N(0, 1/n_in), default; "
     "normal: N(0, 1))"),
    ("--schedule", "optim", "schedule", str, f"learning-rate schedule: {', '.join(SCHEDULES)} (default constant)"),
    ("--early-stop", "optim", "early_stop", int, "stop after N evaluations without a better validation accuracy (default 0: off)"),
    ("--dropout", "model", "dropout", float, "dropout on fully connected layers (default: the network's own)"),
    ("--seed", "run", "seed", int, "seed for initialisation and data order (default 0)"),
    ("--run-name", "run", "run_name", str, "run folder name (default <strategy>-<model>-<time>)"),
    ("--storage", "run", "storage", str, "where run folders go (default runs)"),
    ("--eval-every", "run", "eval_every", int, "evaluate every N epochs (default 1)"),
    ("--log-every", "run", "log_every", int, "steps between streamed training metrics (default 10)"),
    ("--allreduce", "run", "allreduce", str, f"gradient averaging for sync: {', '.join(ALLREDUCE)} (default auto)"),
    ("--expand", "data", "expand", bool, "add Nielsen's 1-pixel shifted copies of the training data (5x)"),
    ("--validation", "data", "validation", float, "share of the training set held out for validation, which the "
     "schedule, early stopping, target accuracy and model.pt read (default: the dataset's own: mnist the last 10,000, "
     "mnist5k 500, others 0.1; 0: none)"),
    ("--standardize", "data", "standardize", bool, "standardise inputs with the training split's mean and std "
     "(kept in model.pt)"),
    # checkpoints, resume, failures, stop conditions (every strategy)
    ("--resume", "run", "resume", str, "continue the run in this folder (runs/<name>) from its last checkpoint"),
    ("--checkpoint-every", "run", "checkpoint_every", int, "epochs between checkpoints (default 1)"),
    ("--keep-checkpoints", "run", "keep_checkpoints", int, "most recent checkpoints kept (default 3)"),
    ("--max-failures", "run", "max_failures", int, "replica failures survived before giving up (default 3)"),
    ("--target-accuracy", "run", "target_accuracy", float, "stop once validation accuracy (test without a validation split) reaches this, 0-1 (default off)"),
    ("--time-limit", "run", "time_limit", float, "stop after this many seconds of training (default off)"),
    ("--slow-replica", "run", "slow_replica", str, "RANK:FACTOR: replica RANK's steps take FACTOR times as long (it "
     "sleeps); a testing and benchmarking aid for straggler tolerance (default off)"),
    # async (Downpour SGD)
    ("--ps-shards", "async", "ps_shards", int, "async: parameter-server shards (default 2)"),
    ("--n-fetch", "async", "n_fetch", int, "async: steps between parameter fetches (default 1)"),
    ("--n-push", "async", "n_push", int, "async: steps between gradient pushes (default 1)"),
    ("--max-staleness", "async", "max_staleness", int, "async: bound on pushes ahead of the slowest replica (default off)"),
    ("--staleness-lr", "async", "staleness_lr", bool, "async: scale each update by 1/max(1, staleness)"),
    ("--warm-start-steps", "async", "warm_start_steps", int, "async: steps one replica trains alone first (default: one epoch-equivalent; 0: none)"),
    ("--snapshot-every", "async", "snapshot_every_s", float, "async: seconds between shard snapshots (default 10)"),
    ("--ps-cpus", "async", "ps_cpus", float, "async: CPUs reserved per parameter shard (default 0)"),
    ("--transport", "async", "transport", str, "async: how replicas reach the shards: auto (shared memory on the "
     "same node, Ray calls across nodes), shm (one node required) or ray (default auto)"),
    # model averaging
    ("--average-every", "local", "average_every", int, "local: steps between parameter averages H (default 8)"),
    ("--outer-optimizer", "local", "outer_optimizer", str, f"local: {', '.join(OUTER_OPTIMIZERS)}; sgd/nesterov apply "
     "the average as an outer step (DiLoCo) (default average)"),
    ("--outer-lr", "local", "outer_lr", float, "local: outer learning rate of sgd/nesterov (default 0.7)"),
    ("--outer-momentum", "local", "outer_momentum", float, "local: outer Nesterov momentum (default 0.9)"),
    ("--elastic-alpha", "local", "elastic_alpha", float, "local: EASGD's elastic pull toward a centre variable, "
     "0 < A < 1, instead of averaging (default off)"),
    # Sandblaster L-BFGS
    ("--lbfgs-batch", "sandblaster", "lbfgs_batch", int, "sandblaster: examples per L-BFGS batch (default: the whole "
     "training set)"),
    ("--work-units", "sandblaster", "work_units", int, "sandblaster: work units per loss-and-gradient evaluation, "
     "handed to whichever replica is free (default 32)"),
    ("--lbfgs-history", "sandblaster", "history", int, "sandblaster: L-BFGS history size (default 10)"),
    ("--lbfgs-iterations", "sandblaster", "iterations", int, "sandblaster: L-BFGS iterations per epoch (default 10)"),
    ("--dispatch", "sandblaster", "dispatch", str, f"sandblaster: {', '.join(DISPATCH)}: a work queue with backup "
     "units, or an equal split up front (the baseline) (default queue)"),
    # ensembles
    ("--members", "ensemble", "members", int, "ensemble: K members, seeds seed..seed+K-1 (default 5)"),
    ("--replicas-per-member", "ensemble", "replicas_per_member", int, "ensemble: each member a sync group of R replicas (default 1)"),
    ("--bagging", "ensemble", "bagging", bool, "ensemble: each member trains on its own bootstrap sample"),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would add the usage)
        raise UserError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m ray_train", description=(
        "Train a PyTorch model on Ray actors: synchronous data-parallel SGD (gradients averaged every "
        "step), asynchronous Downpour SGD with a sharded parameter server, a voting ensemble, model averaging (local SGD, "
        "DiLoCo, EASGD), Sandblaster L-BFGS or Hogwild. Joins the cluster named by RAY_ADDRESS, else starts a local one. Streams metrics to TensorBoard under <storage>/<run-name>/ and writes summary.json."),
        epilog="Example: python -m ray_train --model net_c --replicas 2 --epochs 5 --lr 0.1. Subcommands: "
        "python -m ray_train compare (every regime on one job, side by side) and python -m ray_train search "
        "(random search on Ray Tune); each takes --help.")
    p.add_argument("--config", metavar="FILE", help="YAML file with sections run, data, model, optim, resources, "
                   "async, ensemble, local, sandblaster (see configs/)")
    for flag, _, _, typ, help_ in FLAGS:
        if typ is bool:
            p.add_argument(flag, action="store_true", default=None, help=help_)
        else:
            p.add_argument(flag, type=typ, default=None, help=help_)
    p.add_argument("--no-tensorboard", action="store_true", help="write no event files")
    p.add_argument("--overfit-check", action="store_true",
                   help="instead of training: fit ~100 training examples without regularisation on one replica and "
                   "report whether the training error goes to ~0 (exit 0 if it does, 4 if not)")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="show progress bars even when stdout is not a terminal")
    bar.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bars (by default they show only on a terminal)")
    return p


def parse_config(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    overrides: dict[str, dict] = {}
    for flag, section, field, _, _ in FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            overrides.setdefault(section, {})[field] = value
    values = load_yaml(args.config) if args.config else {}
    if args.resume:
        values = _resume_values(args.resume, values, overrides)
    return build_config(values, overrides), args


def _resume_values(run_dir: str, values: dict, overrides: dict) -> dict:
    """``--resume runs/<name>``: the run's stored config, then the YAML, then the flags; the run
    folder and name stay those of the resumed run, and its strategy cannot change."""
    import os

    from ray_train.checkpoint import read_run_file

    stored = read_run_file(run_dir)
    asked = overrides.get("run", {}).get("strategy") or values.get("run", {}).get("strategy")
    if asked and asked != stored["strategy"]:
        raise UserError(f"--resume: {run_dir} holds a {stored['strategy']!r} run, not {asked!r}")
    merged = {name: {**(section or {}), **(values.get(name) or {})} for name, section in stored["config"].items()}
    for name in values:
        merged.setdefault(name, values[name])
    path = os.path.normpath(run_dir)
    overrides.setdefault("run", {}).update(
        run_name=os.path.basename(path), storage=os.path.dirname(path) or ".", resume=path)
    return merged


# Exit statuses (README): 0 done, 1 replicas died too often, 2 user error, 3 diverged,
# 4 the overfit check failed, 130 interrupted (SIGINT), 143 terminated (SIGTERM).
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("compare", "search"):  # subcommands, each with its own parser
        import importlib

        return importlib.import_module(f"ray_train.{argv[0]}").main(argv[1:])
    try:
        cfg, args = parse_config(argv)
        from ray_train.api import fit
        from ray_train.failure import ReplicaFailure
        from ray_train.loop import Diverged, Interrupted

        try:
            if args.overfit_check:
                from ray_train.api import overfit_check

                return 0 if overfit_check(cfg, progress=args.progress)["passed"] else 4
            fit(cfg, tensorboard=not args.no_tensorboard, progress=args.progress)
        except Diverged as exc:
            return _fail(f"diverged: {exc}", 3)
        except Interrupted as exc:
            return _fail(str(exc), 128 + exc.signum)
        except ReplicaFailure as exc:
            return _fail(f"error: {exc}", 1)
    except UserError as exc:
        return _fail(f"error: {exc}", 2)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run started
        return _fail("interrupted", 130)
    return 0


def _fail(message: str, status: int) -> int:
    print(f"ray_train: {message}", file=sys.stderr, flush=True)
    return status
