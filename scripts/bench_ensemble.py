"""Ensemble section of the benchmark: two members on two CPUs trained at once against the same
two members one after the other, in the same run, through the strategy's own member runner
(ray_train.strategies.ensemble.runner.run_members with 2 slots, then 1 slot).

Members are independent, so the parallel run should approach 2x; what eats into it is actor
start-up, the driver, and Ray's own processes on a 2-core machine. Each member is net D, plain SGD,
batch 64, on MNIST-5k expanded by one-pixel shifts (20,000 images per epoch), one CPU (one torch
thread) each. The wall time counts each member's whole life: actor start, training, test-set
evaluation, checkpoint and weights on disk. (Net D rather than the core section's net B: with plain
SGD net B sits at chance for its first epochs, and a member that learns nothing proves little.)

``bench()`` runs inside an initialised Ray session (scripts/benchmark.py); standalone:

    python scripts/bench_ensemble.py [--epochs N]      # prints JSON
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODEL, LR, BATCH = "net_d", 0.05, 64


def _context(epochs: int, run_dir: str) -> dict:
    import ray

    from ray_train.config import build_config
    from ray_train.data.loaders import load_dataset
    from ray_train.metrics.sink import MetricsSink

    cfg = build_config({}, {"run": {"strategy": "ensemble", "epochs": epochs, "batch_size": BATCH, "log_every": 50,
                                    "storage": run_dir},
                            "data": {"dataset": "mnist5k", "expand": True}, "model": {"name": MODEL},
                            "optim": {"optimizer": "sgd", "lr": LR}, "ensemble": {"members": 2},
                            "resources": {"replicas": 1, "cpus_per_replica": 1}})
    data = load_dataset(cfg.data)
    sink = MetricsSink(out=io.StringIO(), progress=False)  # NullLogger: no event files, no epoch lines
    return {"cfg": cfg, "data": data, "data_ref": ray.put(data), "sink": sink, "run_dir": run_dir}, cfg


def _timed(ctx, specs, slots: int) -> dict:
    from ray_train.strategies.ensemble.runner import run_members

    t0 = time.perf_counter()
    results = run_members(ctx["cfg"], specs, slots, ctx["data"], ctx["data_ref"], None, ctx["sink"], ctx["run_dir"],
                          lambda: False)
    wall = time.perf_counter() - t0
    assert all(r.ok for r in results), [r.error for r in results]
    samples = sum(r.train_samples for r in results)
    return {"wall_s": wall, "samples": samples, "samples_per_s": samples / wall,
            "member_train_s": [r.train_s for r in results],
            "member_test_accuracy": [float((r.probs.argmax(1) == ctx["data"].y_test).mean()) for r in results],
            # different seeds must give different members, however close their accuracies
            "members_disagree": float((results[0].probs.argmax(1) != results[1].probs.argmax(1)).mean())}


def bench(epochs: int = 2) -> dict:
    """Parallel (2 members at once) vs sequential (one after the other) wall time and speed-up."""
    import ray

    from ray_train.strategies.ensemble.config import member_specs

    cpus = ray.cluster_resources().get("CPU", 0)
    with tempfile.TemporaryDirectory(prefix="bench-ensemble-") as tmp:
        ctx, cfg = _context(epochs, tmp)
        specs = member_specs(cfg)
        warm_ctx, _ = _context(1, os.path.join(tmp, "warm"))
        # Untimed: the first actors after ray.init pay for starting worker processes.
        _timed(warm_ctx, specs, 2)
        parallel = _timed(_with_dir(ctx, os.path.join(tmp, "parallel")), specs, 2)
        sequential = _timed(_with_dir(ctx, os.path.join(tmp, "sequential")), specs, 1)
    return {"model": MODEL, "members": len(specs), "cpus_per_member": 1, "cluster_cpus": cpus, "epochs": epochs,
            "train_images_per_epoch": int(len(ctx["data"].y_train)), "parallel": parallel, "sequential": sequential,
            "speedup": sequential["wall_s"] / parallel["wall_s"],
            # the epochs alone (no actor start-up, which costs ~2.5 s a member either way): both
            # parallel members start together, so the longer one spans the parallel training phase
            "train_phase_speedup": sum(sequential["member_train_s"]) / max(parallel["member_train_s"]),
            "same_accuracy": parallel["member_test_accuracy"] == sequential["member_test_accuracy"]}


def _with_dir(ctx, run_dir: str) -> dict:
    return {**ctx, "run_dir": run_dir}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=2, help="epochs per member (default 2)")
    args = p.parse_args()
    from ray_train.cluster import init_ray

    init_ray(num_cpus=2)
    print(json.dumps(bench(args.epochs), indent=2))


if __name__ == "__main__":
    main()
