"""Multi-node section of the benchmark (``make bench``, section ``multinode``): on one cluster of
fake Ray nodes on this machine (``ray.cluster_utils.Cluster``, as tests/test_multinode.py: a head
with no CPUs for the drivers and two 1-CPU worker nodes), side by side, interleaved over rounds:

  across    this project's sync SGD, 2 replicas on the 2 nodes (gloo between them: GradBuckets);
  single    the same job with its 2 replicas on one node (shared memory): a 2-CPU node added to
            the same cluster for this case and removed after it, so that the other cases cannot
            land there;
  raytrain  Ray Train's TorchTrainer (DDP over gloo), ScalingConfig(num_workers=2), on the same two
            1-CPU nodes.

With ``--four``, two more cases per round put 4 replicas of half a CPU on the same two nodes, 2 on
each: ``across4_hier`` (auto: shared memory inside each node, gloo between the nodes' leaders,
ray_train/worker/hier.py) against ``across4_gloo`` (``--allreduce gloo``: one flat allreduce among all
4). Four replicas on two cores measure the averaging's cost, not a speed-up.

The same job as scripts/benchmark.py's core cases: Nielsen's net B, MNIST-5k, plain SGD 0.05,
batch 64 per worker. Ours runs through the CLI, as a user runs it (``python -m ray_train --address
<the fake cluster>``, a fresh driver process per case; evaluation, checkpoints and TensorBoard each
epoch; samples/s from its summary.json: training time only, which includes epoch boundaries and the
first epoch's warm-up), as many epochs as cover warm-up + steps. Ray Train's figure is its workers'
own timed loop (``steps`` steps after ``warmup``), as in scripts/benchmark.py: nothing between
steps, so the comparison leans Ray Train's way.

Every fake node runs on this machine's cores: "across nodes" changes the transport (TCP loopback
between processes instead of shared memory), not the hardware. The figures bound what a second
node costs in software; a real network adds its own latency and bandwidth.

Standalone (prints one JSON document):

    python scripts/bench_multinode.py [--repeat 3] [--steps 300] [--warmup 10]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODEL, LR, BATCH, WORKERS = "net_b", 0.05, 64, 2
TRAIN = 3500  # mnist5k's training split (less its validation)
CASES = ("across", "single", "raytrain")
FOUR = ("across4_hier", "across4_gloo")


# -- Ray Train, in a driver process of its own (this file run with --raytrain) --------------------
def raytrain(address: str, steps: int, warmup: int) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    import scripts.benchmark
    from scripts.benchmark import _raytrain_loop

    ray.cloudpickle.register_pickle_by_value(scripts.benchmark)  # the workers need not import scripts/
    ray.init(address=address, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="raytrain-multinode-")
    out = os.path.join(storage, "figures.json")
    trainer = TorchTrainer(
        _raytrain_loop, train_loop_config={"batch": BATCH, "steps": steps, "warmup": warmup, "out": out},
        scaling_config=ScalingConfig(num_workers=WORKERS, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=storage, name="bench"))
    trainer.fit()
    figures = []
    for r in range(WORKERS):
        with open(f"{out}.{r}") as fh:
            figures.append(json.load(fh))
    shutil.rmtree(storage, ignore_errors=True)
    return {**figures[0], "nodes": [f["node"] for f in figures],
            "step_ms": max(f["timed_s"] for f in figures) * 1e3 / steps}


# -- the cases ----------------------------------------------------------------------------------
def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def ours(address: str, placement: str, steps: int, warmup: int, replicas: int = WORKERS, cpus: float = 1.0,
         allreduce: str = "auto") -> dict:
    """``python -m ray_train --address ...``, a driver process of its own; figures from summary.json."""
    spe = TRAIN // replicas // BATCH
    epochs = -(-(steps + warmup) // spe)
    storage = tempfile.mkdtemp(prefix="multinode-bench-")
    argv = [sys.executable, "-m", "ray_train", "--address", address, "--model", MODEL, "--optimizer", "sgd",
            "--lr", str(LR), "--batch-size", str(BATCH), "--replicas", str(replicas), "--cpus-per-replica", f"{cpus:g}",
            "--allreduce", allreduce, "--placement", placement,
            "--epochs", str(epochs), "--no-progress", "--storage", storage, "--run-name", "bench"]
    proc = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the CLI run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    with open(os.path.join(storage, "bench", "summary.json")) as fh:
        summary = json.load(fh)
    step_ms = slowest_step_ms(os.path.join(storage, "bench"), replicas)
    shutil.rmtree(storage, ignore_errors=True)
    return {"samples_per_s": summary["samples_per_s"], "timed_s": summary["train_s"], "steps": summary["steps"],
            "step_ms": step_ms, "allreduce": summary.get("allreduce"), "nodes": summary["nodes"]["replicas"],
            "first_line": next((ln for ln in proc.stdout.splitlines() if "gradient averaging" in ln), "")}


def slowest_step_ms(run_dir: str, replicas: int) -> float:
    """A step's milliseconds, averaging included, at the slowest replica's pace (each chunk's
    slowest mean step time, weighted by its steps; the run's TensorBoard scalars)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    chunks = [acc.Scalars(f"time/step_ms/replica_{r}") for r in range(replicas)]
    steps = [p.step for p in chunks[0]]
    sizes = [b - a for a, b in zip([0] + steps[:-1], steps)]
    return sum(max(c[i].value for c in chunks) * n for i, n in enumerate(sizes)) / sum(sizes)


def run_raytrain(address: str, steps: int, warmup: int) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--raytrain", address, "--steps", str(steps),
            "--warmup", str(warmup)]
    proc = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the Ray Train run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def _load() -> float:
    return os.getloadavg()[0]


def bench(steps: int = 300, warmup: int = 10, repeat: int = 3, four: bool = False) -> dict:
    """Every case once per round, ``repeat`` rounds, the order rotated each round; medians and
    per-round ratios. Starts and stops its own cluster of fake nodes."""
    from ray.cluster_utils import Cluster

    from ray_train.cluster import QUIET_LOCAL_CLUSTER

    for name, value in QUIET_LOCAL_CLUSTER.items():  # the background settings a run's own cluster has
        os.environ.setdefault(name, value)
    os.environ["PYTHONPATH"] = _env()["PYTHONPATH"]  # the fake nodes' workers import this checkout
    loads = [_load()]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    rounds: list[dict] = []
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(WORKERS)]
        cluster.wait_for_nodes()
        pair = {w.node_id for w in workers}
        address = cluster.address
        cases = CASES + (FOUR if four else ())
        for k in range(repeat):
            results = {}
            for case in cases[k % len(cases):] + cases[: k % len(cases)]:
                print(f"[bench multinode] round {k + 1}/{repeat} {case} ...", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                if case == "single":
                    big = cluster.add_node(num_cpus=WORKERS)
                    cluster.wait_for_nodes()
                    try:
                        results[case] = ours(address, "PACK", steps, warmup)
                    finally:
                        cluster.remove_node(big)
                    assert results[case]["nodes"] == [big.node_id] * WORKERS, results[case]["nodes"]
                elif case == "across":
                    results[case] = ours(address, "SPREAD", steps, warmup)
                    assert set(results[case]["nodes"]) == pair, results[case]["nodes"]
                elif case in FOUR:
                    results[case] = ours(address, "SPREAD", steps, warmup, 2 * WORKERS, 0.5, case.split("_")[1])
                    assert sorted(results[case]["nodes"]) == sorted(list(pair) * 2), results[case]["nodes"]
                else:
                    results[case] = run_raytrain(address, steps, warmup)
                    assert set(results[case]["nodes"]) == pair, results[case]["nodes"]
                results[case]["wall_s"] = time.perf_counter() - t0
                loads.append(_load())
                print(f"[bench multinode] round {k + 1}/{repeat} {case}: {results[case]['samples_per_s']:,.0f} "
                      f"samples/s (load {loads[-1]:.1f})", file=sys.stderr, flush=True)
            rounds.append(results)
    finally:
        cluster.shutdown()
    median = {c: statistics.median(r[c]["samples_per_s"] for r in rounds) for c in cases}

    def ratios(f: dict) -> dict:
        out = {"across_vs_single": f["across"] / f["single"], "across_vs_raytrain": f["across"] / f["raytrain"]}
        if four:
            out["across4_hier_vs_gloo"] = f["across4_hier"] / f["across4_gloo"]
        return out

    cores = os.cpu_count() or 1
    return {"samples_per_s": median, "ratios": ratios(median),
            "step_ms": {c: statistics.median(r[c]["step_ms"] for r in rounds) for c in cases},
            "ratios_per_round": [ratios({c: r[c]["samples_per_s"] for c in cases}) for r in rounds],
            "targets": {"across_vs_single": 0.85, "across_vs_raytrain": 1.3, "across4_hier_vs_gloo": None},
            "allreduce": {c: rounds[0][c].get("allreduce") for c in cases if c != "raytrain"},
            "load_average": {"min": min(loads), "max": max(loads), "cores": cores},
            "loaded": max(loads) > 2 * cores, "rounds": rounds}  # beyond what its own processes make


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="timed steps per worker (default 300)")
    p.add_argument("--warmup", type=int, default=10, help="untimed warm-up steps (default 10)")
    p.add_argument("--repeat", type=int, default=3, help="rounds, the case order rotated each (default 3)")
    p.add_argument("--four", action="store_true", help="add 4 replicas on the 2 nodes: hierarchical against flat gloo")
    p.add_argument("--raytrain", metavar="ADDRESS", help=argparse.SUPPRESS)  # a Ray Train driver of its own
    args = p.parse_args()
    if args.raytrain:
        print(json.dumps(raytrain(args.raytrain, args.steps, args.warmup)), flush=True)
        return
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"),
              "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, {platform.system()}",
              "command": "python " + " ".join(sys.argv), "steps": args.steps, "warmup": args.warmup,
              "repeat": args.repeat, "model": MODEL, **bench(args.steps, args.warmup, args.repeat, args.four)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
