"""Every training regime on one job, side by side (``make bench`` runs it; alone:
``python scripts/bench_regimes.py``).

The job: the default one (configs/default.yaml: Nielsen's net D on MNIST-5k, 2 replicas x 1 CPU),
``--epochs`` epochs per SGD regime (sync, async, local, hogwild) and one epoch (``sandblaster.iterations``
L-BFGS iterations over the whole training set) of Sandblaster, every regime with its defaults.
Reported per regime: samples/s (Sandblaster: examples evaluated per second), comm bytes (the
summary's ``comm_bytes``: what crossed process boundaries), bytes per sample, test accuracy.

Straggler table: each regime again with ``--slow-replica 1:3`` (replica 1's steps take 3x as
long), as the slowed run's samples/s over the unslowed one's; for Sandblaster the mean iteration
time, with the work queue and with a static equal split (``--dispatch static``): the queue keeps an
iteration near the fast replica's pace, the static split waits for the straggler's share.

Every case runs once per round, ``--rounds`` rounds alternating (default 2); medians reported.
Compare ratios within one run only: the machines are shared and noisy.
"""
from __future__ import annotations

import io
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

REGIMES = ("sync", "async", "local", "hogwild", "sandblaster")
SLOW = "1:3"


def _run(strategy: str, epochs: int, storage: str, slow: bool = False, dispatch: str = "queue") -> dict:
    from ray_train.api import fit
    from ray_train.config import load_yaml

    cfg = load_yaml(os.path.join(ROOT, "configs", "default.yaml"))
    cfg["run"].update(strategy=strategy, epochs=1 if strategy == "sandblaster" else epochs, storage=storage,
                      run_name=f"{strategy}-{dispatch}-{'slow' if slow else 'even'}-{time.time_ns()}",
                      checkpoint_every=100, slow_replica=SLOW if slow else None)
    if strategy == "sandblaster":
        cfg["sandblaster"] = {"dispatch": dispatch}
    t0 = time.perf_counter()
    s = fit(cfg, tensorboard=False, progress=False, out=io.StringIO())
    out = {"samples_per_s": s["samples_per_s"], "comm_bytes": s["comm_bytes"], "test_accuracy": s["test_accuracy"],
           "train_s": s["train_s"], "samples": s["train_samples"], "wall_s": time.perf_counter() - t0}
    if strategy == "sandblaster":
        out["iterations"] = s["iterations"]
        out["iteration_s"] = s["train_s"] / max(s["iterations"], 1)
    return out


def _available(strategy: str) -> bool:
    import importlib.util

    from ray_train.engines import ENGINES

    return importlib.util.find_spec(ENGINES[strategy][0]) is not None


def _median(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def bench(epochs: int = 3, rounds: int = 2, regimes=REGIMES) -> dict:
    import tempfile

    regimes = [r for r in regimes if _available(r)]
    cases = [(r, "queue", False) for r in regimes] + [(r, "queue", True) for r in regimes]
    if "sandblaster" in regimes:
        cases += [("sandblaster", "static", False), ("sandblaster", "static", True)]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-regimes-") as storage:
        for rnd in range(rounds):
            for strategy, dispatch, slow in cases:
                key = f"{strategy}{'/static' if dispatch == 'static' else ''}{' slowed' if slow else ''}"
                print(f"[bench regimes] round {rnd + 1}/{rounds}: {key}", file=sys.stderr, flush=True)
                results.setdefault(key, []).append(_run(strategy, epochs, storage, slow, dispatch))
    median = {k: _median(v) for k, v in results.items()}
    table = {r: {**median[r], "bytes_per_sample": median[r]["comm_bytes"] / max(median[r]["samples"], 1)}
             for r in regimes}
    straggler = {r: median[f"{r} slowed"]["samples_per_s"] / median[r]["samples_per_s"] for r in regimes}
    report = {"job": f"configs/default.yaml (net D, MNIST-5k, 2 replicas x 1 CPU), {epochs} epochs; "
                     "sandblaster 1 epoch", "rounds": rounds, "regimes": table,
              "slowed_over_even_samples_per_s": straggler, "runs": results}
    if "sandblaster" in regimes:
        iteration = {k: median[k]["iteration_s"] for k in median if k.startswith("sandblaster")}
        report["sandblaster_iteration_s"] = iteration
        report["sandblaster_slowed_over_even_iteration_s"] = {
            "queue": iteration["sandblaster slowed"] / iteration["sandblaster"],
            "static": iteration["sandblaster/static slowed"] / iteration["sandblaster/static"]}
    return report


def main() -> None:
    import argparse

    from ray_train.cluster import init_ray

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3, help="epochs per SGD regime (default 3)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; medians reported (default 2)")
    p.add_argument("--regimes", default=",".join(REGIMES), help=f"comma-separated subset of {','.join(REGIMES)}")
    args = p.parse_args()
    init_ray(num_cpus=2)
    print(json.dumps(bench(args.epochs, args.rounds, args.regimes.split(",")), indent=1))


if __name__ == "__main__":
    main()
