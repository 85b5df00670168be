"""Every training regime on one job, side by side (``make bench`` runs it; alone:
``python scripts/bench_regimes.py``).

The job: the default one (configs/default.yaml: Nielsen's net D on MNIST-5k, 2 replicas x 1 CPU),
``--epochs`` epochs per SGD regime (sync, async, local, hogwild) and one epoch (``sandblaster.iterations``
L-BFGS iterations over the whole training set) of Sandblaster, every regime with its defaults.
Reported per regime: samples/s (Sandblaster: examples evaluated per second), comm bytes (the
summary's ``comm_bytes``: what crossed process boundaries), bytes per sample, test accuracy.

Straggler table: each SGD regime again with ``--slow-replica 1:3`` (replica 1's steps take 3x as
long), as the slowed run's samples/s over the unslowed one's. Every case runs once per round,
``--rounds`` rounds alternating (default 2); medians reported.

Sandblaster's straggler table (``sandblaster_stragglers``): four engines (queue / static dispatch,
even / ``--slow-replica 1:3``) exist at once and take one L-BFGS iteration each in turn, so load
changes hit every case alike; all four follow the same path (the units' sum does not depend on who
evaluated them), so iteration i is the same work in every case: the ratio is per iteration, then
the median. With two replicas and one 3x slower, a perfect queue needs 2 / (1 + 1/3) = 1.5x the
time; a static equal split waits for the straggler's whole share: 3x.

Hogwild against two independent single-replica loops (``hogwild_vs_independent``): both exist at
once and take turns, the same steps per replica, batch and optimizer, median over rounds.

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


def _run(strategy: str, epochs: int, storage: str, slow: bool = False) -> dict:
    from ray_train.api import fit
    from ray_train.config import load_yaml

    cfg = load_yaml(os.path.join(ROOT, "configs", "default.yaml"))
    cfg["run"].update(strategy=strategy, epochs=1 if strategy == "sandblaster" else epochs, storage=storage,
                      run_name=f"{strategy}-{'slow' if slow else 'even'}-{time.time_ns()}",
                      checkpoint_every=100, slow_replica=SLOW if slow else None)
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

    from ray_train import strategies

    return strategy in strategies.names() and all(importlib.util.find_spec(m) for m in strategies.get(strategy).modules())


def _median(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def regimes_table(epochs: int = 3, rounds: int = 2, regimes=REGIMES) -> dict:
    import tempfile

    regimes = [r for r in regimes if _available(r)]
    cases = [(r, False) for r in regimes] + [(r, True) for r in regimes if r != "sandblaster"]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-regimes-") as storage:
        for rnd in range(rounds):
            for strategy, slow in cases:
                key = f"{strategy}{' slowed' if slow else ''}"
                print(f"[bench regimes] round {rnd + 1}/{rounds}: {key}", file=sys.stderr, flush=True)
                results.setdefault(key, []).append(_run(strategy, epochs, storage, slow))
    median = {k: _median(v) for k, v in results.items()}
    table = {r: {**median[r], "bytes_per_sample": median[r]["comm_bytes"] / max(median[r]["samples"], 1)}
             for r in regimes}
    straggler = {r: median[f"{r} slowed"]["samples_per_s"] / median[r]["samples_per_s"]
                 for r in regimes if f"{r} slowed" in median}
    report = {"job": f"configs/default.yaml (net D, MNIST-5k, 2 replicas x 1 CPU), {epochs} epochs; "
                     "sandblaster 1 epoch", "rounds": rounds, "regimes": table,
              "slowed_over_even_samples_per_s": straggler, "runs": results}
    return report


def _drive(actors, steps: int, chunk: int, lr: float, epoch0: int) -> float:
    """Queue ``steps`` steps on every actor (a new epoch whenever one runs out); seconds until all are done."""
    import ray

    spe = ray.get([a.set_epoch.remote(epoch0, lr) for a in actors])
    refs = []
    for a, per in zip(actors, spe):
        left, epoch, n = per, epoch0, steps
        while n > 0:
            if left == 0:
                epoch, left = epoch + 1, per
                refs.append(a.set_epoch.remote(epoch, lr))
            take = min(n, left, chunk)
            refs.append(a.train_steps.remote(take))
            n, left = n - take, left - take
    t0 = time.perf_counter()
    ray.get(refs)
    return time.perf_counter() - t0


def _job(**sections):
    from ray_train.config import build_config

    return build_config(overrides={"model": {"name": "net_d"}, **sections})


def hogwild_vs_independent(data, data_ref, steps: int = 200, warmup: int = 20, rounds: int = 5, chunk: int = 10) -> dict:
    """samples/s of a 2-replica Hogwild group over two 1-replica groups driven at once (4 actors of
    0.5 CPU, one torch thread each, all alive throughout), net D, momentum 0.05, batch 64."""
    from ray_train.network import model_factory
    from ray_train.strategies.hogwild.engine import HogwildGroup, HogwildReplica
    from ray_train.worker.group import ReplicaGroup

    def cfg(strategy, replicas):
        return _job(run={"strategy": strategy}, resources={"replicas": replicas, "cpus_per_replica": 0.5})

    hog_cfg, solo_cfg = cfg("hogwild", 2), cfg("sync", 1)
    hog = HogwildGroup.create(hog_cfg, data_ref, model_factory(hog_cfg, data), HogwildReplica)
    solo = [ReplicaGroup.create(solo_cfg, data_ref, model_factory(solo_cfg, data)) for _ in range(2)]
    both, lr, batch = [g.actors[0] for g in solo], hog_cfg.optim.lr, hog_cfg.run.batch_size
    try:
        _drive(hog.actors, warmup, chunk, lr, 0)
        _drive(both, warmup, chunk, lr, 0)
        hs, ins = [], []
        for r in range(rounds):
            hs.append(2 * steps * batch / _drive(hog.actors, steps, chunk, lr, 1 + r))
            ins.append(2 * steps * batch / _drive(both, steps, chunk, lr, 1 + r))
        ratios = [h / i for h, i in zip(hs, ins)]
        return {"steps_per_replica": steps, "rounds": rounds, "hogwild_samples_per_s": hs,
                "independent_samples_per_s": ins, "ratio_per_round": ratios,
                "ratio_median": statistics.median(ratios), "ratio_total": sum(hs) / sum(ins)}
    finally:
        hog.shutdown()
        for g in solo:
            g.shutdown()


def sandblaster_stragglers(data, data_ref, replicas: int = 2, iterations: int = 8, slow: str = SLOW) -> dict:
    """Mean seconds per L-BFGS iteration, queue and static dispatch, with and without ``slow``
    (net D, the whole training set per evaluation, 32 units). Each engine's replicas reserve
    1/(4 replicas) CPU: only one engine computes at a time."""
    import numpy as np

    from ray_train.engine import EngineContext
    from ray_train.metrics.sink import MetricsSink
    from ray_train.metrics.tensorboard import NullLogger
    from ray_train.network import model_factory
    from ray_train.run.failure import FailurePolicy
    from ray_train.strategies.sandblaster.engine import SandblasterEngine

    cases = [(d, s) for d in ("queue", "static") for s in (None, slow)]
    engines = {}
    try:
        for dispatch, sl in cases:
            cfg = _job(run={"strategy": "sandblaster", "slow_replica": sl},
                       resources={"replicas": replicas, "cpus_per_replica": 0.5 / replicas},
                       sandblaster={"iterations": 1, "dispatch": dispatch})
            sink = MetricsSink(NullLogger(), out=io.StringIO(), progress=False)
            engine = SandblasterEngine(EngineContext(cfg, data, data_ref, model_factory(cfg, data), sink, "",
                                                     FailurePolicy(3)))
            engines[(dispatch, sl)] = engine
            engine.start(None)
        for i in range(iterations):
            for case in cases[i % 4:] + cases[: i % 4]:
                engines[case].train_epoch(i, 1.0, 0, lambda chunk: None, lambda: False)
            print(f"[bench regimes] sandblaster iteration {i + 1}/{iterations}", file=sys.stderr, flush=True)
        out = {}
        for d in ("queue", "static"):
            even, slowed = (np.array(engines[(d, s)].iteration_s) for s in (None, slow))
            out[d] = {"iteration_s": float(np.median(even)), "iteration_s_slowed": float(np.median(slowed)),
                      "ratio_median": float(np.median(slowed / even)), "ratio_of_sums": float(slowed.sum() / even.sum()),
                      "units_per_replica_slowed": engines[(d, slow)].counts["units_per_replica"],
                      "backup_units": engines[(d, slow)].counts["backup_units"]}
        return {"replicas": replicas, "iterations": iterations, "slow_replica": slow, **out}
    finally:
        for engine in engines.values():
            engine.shutdown()


def bench(epochs: int = 3, rounds: int = 2, regimes=REGIMES, only=("regimes", "sandblaster", "hogwild")) -> dict:
    """All three sections (``make bench`` calls this on its Ray cluster)."""
    import ray

    from ray_train.config import DataConfig
    from ray_train.data.loaders import load_dataset

    data = load_dataset(DataConfig(dataset="mnist5k"))
    data_ref = ray.put(data)
    report = {}
    if "regimes" in only:
        report["regimes"] = regimes_table(epochs, rounds, regimes)
    if "sandblaster" in only:
        report["sandblaster_stragglers"] = sandblaster_stragglers(data, data_ref)
    if "hogwild" in only:
        report["hogwild_vs_independent"] = hogwild_vs_independent(data, data_ref)
    return report


def main() -> None:
    import argparse

    from ray_train.cluster import init_ray

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3, help="epochs per SGD regime (default 3)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; medians reported (default 2)")
    p.add_argument("--regimes", default=",".join(REGIMES), help=f"comma-separated subset of {','.join(REGIMES)}")
    p.add_argument("--only", nargs="+", default=["regimes", "sandblaster", "hogwild"],
                   choices=["regimes", "sandblaster", "hogwild"], help="sections (default all)")
    args = p.parse_args()
    init_ray(num_cpus=2)
    print(json.dumps(bench(args.epochs, args.rounds, args.regimes.split(","), args.only), indent=1))


if __name__ == "__main__":
    main()
