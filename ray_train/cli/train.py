"""``python -m ray_train`` (and ``ray-train``, ``python scripts/train.py``): train one run.

Flags override the YAML file given with --config, which overrides the defaults. A user mistake
prints one line on stderr and exits with status 2.
"""
from __future__ import annotations

import argparse

from ray_train import strategies
from ray_train.cli import exit_status
from ray_train.cli.flags import Parser, add_cluster_flags, add_output_flags, add_training_flags, job_values
from ray_train.config import build_config
from ray_train.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m ray_train", description=(
        "Train a PyTorch model on Ray actors with one of these strategies: "
        + "; ".join(f"{s.name}: {s.summary}" for s in strategies.all_strategies()) + ". Runs on the cluster --address "
        "names, else the one RAY_ADDRESS names, else starts a local one of its own; the first line says which. Streams "
        "metrics to TensorBoard under <storage>/<run-name>/ and writes summary.json; Ray's own output goes to "
        "<storage>/<run-name>/ray.log."),
        epilog="Example: python -m ray_train --model net_c --replicas 2 --epochs 5 --lr 0.1. Subcommands: "
        "python -m ray_train compare (every regime on one job, side by side), python -m ray_train search "
        "(random search on Ray Tune) and python -m ray_train predict (use a finished run); each takes --help.")
    add_training_flags(p)
    add_output_flags(p)
    add_cluster_flags(p)
    p.add_argument("--overfit-check", action="store_true",
                   help="instead of training: fit ~100 training examples without regularisation on one replica and "
                   "report whether the training error goes to ~0 (exit 0 if it does, 4 if not)")
    return p


def parse_config(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    values, overrides = job_values(args)
    if args.resume:
        values = _resume_values(args.resume, values, overrides)
    return build_config(values, overrides), args


def _resume_values(run_dir: str, values: dict, overrides: dict) -> dict:
    """``--resume runs/<name>``: the run's stored config, then the YAML, then the flags; the run
    folder and name stay those of the resumed run, and its strategy cannot change."""
    import os

    from ray_train.run import storage
    from ray_train.run.checkpoint import read_run_file

    stored = read_run_file(run_dir)
    asked = overrides.get("run", {}).get("strategy") or values.get("run", {}).get("strategy")
    if asked and asked != stored["strategy"]:
        raise UserError(f"--resume: {run_dir} holds a {stored['strategy']!r} run, not {asked!r}")
    merged = {name: {**(section or {}), **(values.get(name) or {})} for name, section in stored["config"].items()}
    for name in values:
        merged.setdefault(name, values[name])
    path = storage.normpath(run_dir)
    overrides.setdefault("run", {}).update(
        run_name=os.path.basename(path), storage=os.path.dirname(path) or ".", resume=path)
    return merged


def main(argv: list[str]) -> int:
    def train() -> int:
        cfg, args = parse_config(argv)
        if args.overfit_check:
            from ray_train.api import overfit_check

            return 0 if overfit_check(cfg, progress=args.progress, address=args.address,
                                      verbose=args.verbose)["passed"] else 4
        from ray_train.api import fit

        fit(cfg, tensorboard=not args.no_tensorboard, progress=args.progress, address=args.address,
            verbose=args.verbose)
        return 0

    return exit_status(train)
