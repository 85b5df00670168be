"""GPU readiness in one command (``make gpu-check``): every GPU test, then the GPU figures the
docs/gpu.md owes, printed as one table and written to ``--out``/gpu_check.json.

  1. a plain single-process PyTorch loop on the GPU against one sync replica on the same GPU;
  2. two sync replicas sharing one GPU (``gpus_per_replica`` 0.5: gradients averaged over gloo);
  3. two sync replicas on a GPU each (NCCL), when the machine has two;
  4. async (Downpour) replicas sharing one GPU.

Each figure is samples/s of training steps only (the whole run's wall time besides), net D on
MNIST-5k, batch 64 per replica. Without CUDA the script says so and exits 0 after the CPU-only
tests; ``--cpu`` runs the same cases on the CPU instead (to try the script itself anywhere).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODEL, BATCH, LR = "net_d", 64, 0.05


def plain_loop(device: str, epochs: int) -> dict:
    """The baseline: one process, the model and each batch on ``device``, momentum SGD."""
    import torch
    import torch.nn.functional as F

    from models import build_model
    from ray_train.config import DataConfig
    from ray_train.data.loaders import load_dataset
    from ray_train.worker.batches import to_tensor

    data = load_dataset(DataConfig(dataset="mnist5k"))
    torch.manual_seed(0)
    model = build_model(MODEL).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    x, y = to_tensor(data.x_train).to(device), torch.from_numpy(data.y_train).long().to(device)
    steps = len(y) // BATCH
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(y), device=device)
        for s in range(steps):
            idx = order[s * BATCH:(s + 1) * BATCH]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {"samples_per_s": epochs * steps * BATCH / elapsed, "train_s": elapsed}


def ours(strategy: str, replicas: int, gpus: float, epochs: int, storage: str) -> dict:
    """One run through ray_train.fit; samples/s as the run loop measures it (training time only)."""
    import ray_train

    t0 = time.perf_counter()
    summary = ray_train.fit({
        "run": {"strategy": strategy, "epochs": epochs, "batch_size": BATCH, "storage": storage, "seed": 0,
                "run_name": f"{strategy}-{replicas}x{gpus:g}"},
        "model": {"name": MODEL},
        "resources": {"replicas": replicas, "cpus_per_replica": 1 if gpus else 0.5, "gpus_per_replica": gpus}},
        tensorboard=False, progress=False)
    return {"samples_per_s": summary["samples_per_s"], "train_s": summary["train_s"],
            "wall_s": time.perf_counter() - t0, "test_accuracy": summary["test_accuracy"],
            "allreduce": summary.get("allreduce"), "devices": summary.get("devices")}


def run_tests() -> int:
    """The GPU tests (they skip without CUDA), in a subprocess so that their Ray cluster is theirs."""
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_gpu.py"], cwd=ROOT)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3, help="epochs per case (default 3)")
    p.add_argument("--cpu", action="store_true", help="run the cases on the CPU (tries the script without a GPU)")
    p.add_argument("--skip-tests", action="store_true", help="only the figures")
    p.add_argument("--out", default="bench", help="folder for gpu_check.json (default bench/)")
    args = p.parse_args()

    import torch

    status = 0 if args.skip_tests else run_tests()
    gpus = torch.cuda.device_count()
    if not gpus and not args.cpu:
        print("gpu-check: no CUDA device here; the GPU tests above were skipped and there are no GPU figures "
              "(--cpu runs the cases on the CPU)")
        return status
    import ray

    from ray_train.cluster import init_ray

    init_ray(num_cpus=os.cpu_count())  # Ray finds the GPUs itself
    one, half = (0, 0) if args.cpu else (1, 0.5)
    device = "cpu" if args.cpu else "cuda:0"
    storage = os.path.join(args.out, "gpu_check_runs")
    cases = {"plain loop, 1 process": lambda: plain_loop(device, args.epochs),
             "sync, 1 replica": lambda: ours("sync", 1, one, args.epochs, storage),
             "sync, 2 replicas sharing 1 GPU": lambda: ours("sync", 2, half, args.epochs, storage),
             "async, 2 replicas sharing 1 GPU": lambda: ours("async", 2, half, args.epochs, storage)}
    if gpus >= 2 and not args.cpu:
        cases["sync, 2 replicas on 2 GPUs"] = lambda: ours("sync", 2, 1, args.epochs, storage)
    results = {}
    for name, case in cases.items():
        print(f"gpu-check: {name} ...", flush=True)
        results[name] = case()
    ray.shutdown()
    base = results["plain loop, 1 process"]["samples_per_s"]
    print(f"\n{'case':<34} {'samples/s':>10} {'vs plain':>9} {'test acc':>9}  allreduce / devices")
    for name, r in results.items():
        acc = f"{r['test_accuracy']:.4f}" if "test_accuracy" in r else "-"
        print(f"{name:<34} {r['samples_per_s']:>10.0f} {r['samples_per_s'] / base:>8.2f}x {acc:>9}  "
              f"{r.get('allreduce') or ''} {r.get('devices') or ''}")
    os.makedirs(args.out, exist_ok=True)
    report = {"device": "cpu" if args.cpu else torch.cuda.get_device_name(0), "gpus": gpus, "epochs": args.epochs,
              "model": MODEL, "batch_per_replica": BATCH, "cases": results, "tests_status": status}
    with open(os.path.join(args.out, "gpu_check.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    return status


if __name__ == "__main__":
    sys.exit(main())
