"""``python -m ray_train compare``: every training regime on the same job, one after the other,
side by side. DistBelief's figure of accuracy against time (SGD, Downpour, Downpour + AdaGrad,
Sandblaster) is the model.

Writes under ``<storage>/compare-<time>/``: table.md and table.json (time and samples to a target
accuracy, final and best validation accuracy, comm bytes, samples/s per regime), accuracy.png
(validation accuracy against training seconds, samples seen and comm bytes) and one run folder per
regime, so ``tensorboard --logdir <storage>/compare-<time>`` overlays them. A regime that fails is
a row saying why; the others still run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from ray_train import strategies
from ray_train.cli import exit_status, fail
from ray_train.cli.flags import (OWN_FLAGS, Parser, add_cluster_flags, add_output_flags, add_training_flags, job_values,
                                 stamp)
from ray_train.config import build_config
from ray_train.errors import Interrupted, UserError
from ray_train.run.files import write_json

# Flags compare sets itself, besides OWN_FLAGS: each regime's strategy, and a target that only times.
SKIP = OWN_FLAGS + ("--strategy", "--target-accuracy")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m ray_train compare", description=(
        "Run each training regime on the same job, one after the other, and write a table (time and samples to "
        "a target accuracy, final and best validation accuracy, comm bytes, samples/s), plots of accuracy "
        "against time, samples and comm bytes, and one TensorBoard logdir with a run per regime."),
        epilog="Example: python -m ray_train compare --model mlp30 --epochs 5 --strategies sync,async,local")
    p.add_argument("--strategies", default=",".join(s.name for s in strategies.all_strategies() if s.compared),
                   help=f"comma-separated regimes to run, in this order: {', '.join(strategies.names())} (default "
                   + ",".join(s.name for s in strategies.all_strategies() if s.compared) + ")")
    p.add_argument("--target-accuracy", type=float, default=None,
                   help="validation accuracy (test without a validation split) the table times each regime to, 0-1 "
                   "(default: the lowest best accuracy among the regimes, which every one of them reached); "
                   "unlike in training it does not stop the runs")
    add_training_flags(p, skip=SKIP)
    add_output_flags(p)
    add_cluster_flags(p)
    return p


def parse_strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise UserError("--strategies: name at least one regime")
    for name in names:
        if name not in strategies.names():
            raise UserError(f"--strategies: unknown regime {name!r}; allowed: {', '.join(strategies.names())}")
    if len(set(names)) != len(names):
        raise UserError(f"--strategies: a regime is named twice in {text!r}")
    return names


# -- reading a run's history ----------------------------------------------------------------------
def watched_key(history: list[dict]) -> str:
    """The accuracy stop rules read: validation, or test where the data has no validation split."""
    return "val_accuracy" if any(r.get("val_accuracy") is not None for r in history) else "test_accuracy"


def curve(summary: dict) -> dict:
    """Per evaluated epoch: cumulative training seconds, samples and comm bytes, and the watched
    accuracy. An ensemble's history has no running totals: they are spread evenly over its epochs."""
    history = summary.get("history") or []
    key = watched_key(history)
    n = max(len(history), 1)
    out = {"train_s": [], "samples": [], "comm_bytes": [], "accuracy": [], "split": key.split("_")[0]}
    for i, r in enumerate(history):
        if r.get(key) is None:
            continue
        share = (i + 1) / n
        out["train_s"].append(r["train_s"] if "train_s" in r else summary.get("train_s", 0.0) * share)
        out["samples"].append(r["samples"] if "samples" in r else summary.get("train_samples", 0) * share)
        out["comm_bytes"].append(r.get("comm_bytes") or 0)
        out["accuracy"].append(r[key])
    return out


def to_target(c: dict, target: float) -> tuple[float | None, int | None]:
    """Training seconds and samples when the watched accuracy first reached ``target``."""
    for t, s, a in zip(c["train_s"], c["samples"], c["accuracy"]):
        if a >= target:
            return t, int(s)
    return None, None


def default_target(rows: list[dict]) -> float | None:
    bests = [r["best_accuracy"] for r in rows if r["status"] == "ok" and r["best_accuracy"] is not None]
    return min(bests) if bests else None


def regime_row(strategy: str, summary: dict, run_dir: str) -> dict:
    c = curve(summary)
    acc = c["accuracy"]
    return {"strategy": strategy, "status": "ok", "reason": None, "run_dir": run_dir, "split": c["split"],
            "epochs": summary.get("epochs"), "final_accuracy": acc[-1] if acc else None,
            "best_accuracy": max(acc) if acc else None, "test_accuracy": summary.get("test_accuracy"),
            "best_test_accuracy": summary.get("best_test_accuracy"), "comm_bytes": summary.get("comm_bytes"),
            "samples_per_s": summary.get("samples_per_s"), "train_s": summary.get("train_s"),
            "wall_s": summary.get("wall_s"), "curve": c}


def failed_row(strategy: str, reason: str, run_dir: str) -> dict:
    return {"strategy": strategy, "status": "failed", "reason": reason, "run_dir": run_dir, "curve": None}


def with_target(rows: list[dict], target: float | None) -> list[dict]:
    for r in rows:
        if r["status"] == "ok" and target is not None:
            r["time_to_target_s"], r["samples_to_target"] = to_target(r["curve"], target)
    return rows


# -- writing the table and the plots ----------------------------------------------------------------
def _num(value, fmt: str, none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def human_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def table_md(rows: list[dict], target: float | None, given: bool, title: str) -> str:
    split = next((r["split"] for r in rows if r["status"] == "ok"), "val")
    name = "validation" if split == "val" else "test"
    how = "given" if given else "the lowest best accuracy of the regimes"
    lines = [f"# {title}", "",
             f"Target: {name} accuracy {_num(target, '.4f')} ({how}). Times are training seconds (evaluation "
             "excluded); accuracies are the " + name + " split's.", "",
             "| regime | time to target (s) | samples to target | final acc | best acc | test acc | comm bytes "
             "| samples/s | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['strategy']} | failed: {r['reason']} |||||||||")
            continue
        reached = r.get("time_to_target_s")
        lines.append(
            f"| {r['strategy']} | {_num(reached, '.1f', 'not reached')} | {_num(r.get('samples_to_target'), ',', '-')} "
            f"| {_num(r['final_accuracy'], '.4f')} | {_num(r['best_accuracy'], '.4f')} "
            f"| {_num(r['test_accuracy'], '.4f')} "
            f"| {human_bytes(r['comm_bytes'])} | {_num(r['samples_per_s'], ',.0f')} | {_num(r['wall_s'], '.1f')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], target: float | None, path: str) -> None:
    """Accuracy against training seconds, samples seen and comm bytes, one line per regime."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = [r for r in rows if r["status"] == "ok" and r["curve"]["accuracy"]]
    fig = Figure(figsize=(15, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    split = "validation" if any(r["curve"]["split"] == "val" for r in ok) else "test"
    panels = (("train_s", "training seconds", 1.0), ("samples", "training samples seen", 1.0),
              ("comm_bytes", "bytes moved between processes (MB)", 1e-6))
    for i, (key, label, scale) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        for r in ok:
            c = r["curve"]
            if key == "comm_bytes" and not any(c["comm_bytes"]):
                ax.plot([], [], marker="o", label=f"{r['strategy']} (no comm)")
                continue
            ax.plot([x * scale for x in c[key]], c["accuracy"], marker="o", markersize=3, label=r["strategy"])
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=0.8, label=f"target {target:.4f}")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{split} accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{split} accuracy against time, samples and communication")
    fig.tight_layout()
    fig.savefig(path)


def write_outputs(out_dir: str, rows: list[dict], target_arg: float | None) -> tuple[float | None, str]:
    target = target_arg if target_arg is not None else default_target(rows)
    with_target(rows, target)
    title = f"compare {os.path.basename(out_dir)}"
    md = table_md(rows, target, target_arg is not None, title)
    with open(os.path.join(out_dir, "table.md"), "w", encoding="utf-8") as fh:
        fh.write(md)
    write_json(os.path.join(out_dir, "table.json"), {"target_accuracy": target, "target_given": target_arg is not None,
                                                     "regimes": rows})
    if any(r["status"] == "ok" for r in rows):
        plot(rows, target, os.path.join(out_dir, "accuracy.png"))
    return target, md


# -- the command --------------------------------------------------------------------------------------
def run_compare(values: dict, overrides: dict, regimes: list[str], target: float | None,
                out=None, tensorboard: bool = True, progress: bool | None = False, address: str | None = None,
                verbose: bool = False) -> tuple[str, list]:
    """Each regime via ray_train.fit on one Ray cluster; returns (the compare folder, the rows)."""
    storage = build_config(values, overrides).run.storage  # the job's own mistakes come before Ray and torch
    from ray_train.run.storage import local_only

    local_only(storage, "compare")
    from ray_train import raylog
    from ray_train.api import fit
    from ray_train.cluster import init_ray, local_resources
    from ray_train.errors import Diverged

    local = local_resources(address)
    if local is not None:  # a regime the local cluster cannot hold fails before it starts
        for strategy in regimes:
            over = {k: dict(v) for k, v in overrides.items()}
            over.setdefault("run", {}).update(strategy=strategy)
            strategies.get(strategy).check_resources(build_config(values, over), total=local)
    out = out or sys.stdout
    out_dir = os.path.join(storage, f"compare-{stamp()}")
    os.makedirs(out_dir, exist_ok=True)
    print(init_ray(address=address, verbose=verbose), file=out, flush=True)
    raylog.LOG.to_file(os.path.join(out_dir, "ray.log"))
    rows: list[dict] = []
    for i, strategy in enumerate(regimes):
        over = {k: dict(v) for k, v in overrides.items()}
        over.setdefault("run", {}).update(strategy=strategy, storage=out_dir, run_name=strategy)
        run_dir = os.path.join(out_dir, strategy)
        print(f"compare [{i + 1}/{len(regimes)}] {strategy}: starting, logs in {run_dir}", file=out, flush=True)
        t0 = time.perf_counter()
        try:
            summary = fit(build_config(values, over), out=out, progress=progress, tensorboard=tensorboard,
                          headers=False)
            rows.append(regime_row(strategy, summary, run_dir))
            r = rows[-1]
            print(f"compare [{i + 1}/{len(regimes)}] {strategy}: done in {time.perf_counter() - t0:.1f} s, best "
                  f"{r['split']} accuracy {_num(r['best_accuracy'], '.4f')}", file=out, flush=True)
        except Interrupted as exc:
            rows.append(failed_row(strategy, str(exc), run_dir))
            write_outputs(out_dir, rows, target)
            raise
        except Exception as exc:  # one regime's failure must not stop the others
            what = "diverged" if isinstance(exc, Diverged) else (
                "error" if isinstance(exc, UserError) else type(exc).__name__)
            reason = f"{what}: {' '.join(str(exc).split())}"[:300]
            rows.append(failed_row(strategy, reason, run_dir))
            print(f"compare [{i + 1}/{len(regimes)}] {strategy}: FAILED ({reason})", file=out, flush=True)
        write_outputs(out_dir, rows, target)
    return out_dir, rows


def main(argv: list[str]) -> int:
    def compare() -> int:
        args = build_parser().parse_args(argv)
        regimes = parse_strategies(args.strategies)
        if args.target_accuracy is not None and not 0 < args.target_accuracy <= 1:
            raise UserError(f"--target-accuracy: must be in (0, 1], got {args.target_accuracy!r}")
        values, overrides = job_values(args, skip=SKIP)
        build_config(values, overrides)  # the job's own mistakes, before torch loads
        t0 = time.perf_counter()
        # progress bars only when asked: the regimes' lines interleave with them otherwise
        out_dir, rows = run_compare(values, overrides, regimes, args.target_accuracy,
                                    tensorboard=not args.no_tensorboard, progress=bool(args.progress),
                                    address=args.address, verbose=args.verbose)
        with open(os.path.join(out_dir, "table.md"), encoding="utf-8") as fh:
            print("\n" + fh.read(), flush=True)
        print(f"compare: {len(rows)} regimes in {time.perf_counter() - t0:.0f} s; table in {out_dir}/table.md and "
              f"table.json, plots in {out_dir}/accuracy.png"
              + (f"; overlay the runs with: tensorboard --logdir {out_dir}" if not args.no_tensorboard else ""), flush=True)
        if not any(r["status"] == "ok" for r in rows):
            return fail("every regime failed (see the table)", 1)
        return 0

    return exit_status(compare)
