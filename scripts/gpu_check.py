"""GPU readiness in one command (``make gpu-check``): every GPU test, then one case per GPU path of
the project, printed as one table and written to ``--out``/gpu_check.json, whatever happens: a
case that fails is a row with its one-line reason, and the others still run.

GPUs are looked for where the replicas run: a Ray task that asks for a GPU reports the device
(submitted to a cluster with a CPU head, the driver itself has none). The cases (net D on MNIST-5k,
batch 64 per replica; samples/s of training steps only, and the ratio to the plain loop):

  plain loop            one process on the GPU, the data kept there (a Ray task on a GPU node)
  sync 1 replica        must reach 0.95x the plain loop (the "check" column)
  sync 1 replica, data from host   --data-on-device off: batches copied from pinned memory
  sync 1 replica bf16 / fp16       --precision
  sync 2 sharing 1 GPU  gloo; sync 2 on 2 GPUs: NCCL, bucketed during backward (2 GPUs only)
  async 2 sharing 1 GPU Downpour replicas on the GPU, parameter shards on the CPU
  local 2 sharing 1 GPU, sandblaster 2 sharing 1 GPU
  checkpoint without CUDA   the sync run's checkpoints and model.pt loaded by a process with
                            CUDA_VISIBLE_DEVICES="" (a CPU-only driver): every tensor on the CPU

Without a GPU where the replicas run, the table says so (and the script exits 0 after the tests);
``--cpu`` runs the same cases on the CPU instead (to try the script itself anywhere).
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
PLAIN = "plain loop, 1 process"
ONE = "sync, 1 replica"
MIN_RATIO = 0.95  # one replica against the plain loop (issue 24)


def plain_loop(device: str, epochs: int) -> dict:
    """The baseline: one process, the model and the whole training set on ``device``, momentum SGD."""
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
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(y), device=device)
        for s in range(steps):
            idx = order[s * BATCH:(s + 1) * BATCH]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {"samples_per_s": epochs * steps * BATCH / elapsed, "train_s": elapsed, "devices": [device]}


def ours(strategy: str, replicas: int, gpus: float, epochs: int, storage: str, name: str, **extra) -> dict:
    """One run through ray_train.fit; samples/s as the run loop measures it (training time only).
    ``extra``: more config sections or fields ({"run": {...}} merged into run, and so on)."""
    import ray_train

    config = {
        "run": {"strategy": strategy, "epochs": epochs, "batch_size": BATCH, "storage": storage, "seed": 0,
                "run_name": name},
        "model": {"name": MODEL},
        "resources": {"replicas": replicas, "cpus_per_replica": 1 if gpus else 0.5, "gpus_per_replica": gpus}}
    for section, values in extra.items():
        config[section] = {**config.get(section, {}), **values}
    t0 = time.perf_counter()
    summary = ray_train.fit(config, tensorboard=False, progress=False)
    return {"samples_per_s": summary["samples_per_s"], "train_s": summary["train_s"],
            "wall_s": time.perf_counter() - t0, "test_accuracy": summary["test_accuracy"],
            "allreduce": summary.get("allreduce"), "devices": summary.get("devices"),
            "run_dir": os.path.join(storage, name)}


LOAD_ON_CPU = r"""
import glob, sys, torch
paths = sorted(glob.glob(sys.argv[1] + "/**/*.pt", recursive=True))
assert not torch.cuda.is_available(), "CUDA is visible"
bad = []
def walk(o, where):
    if isinstance(o, torch.Tensor):
        if o.device.type != "cpu": bad.append(where)
    elif isinstance(o, dict):
        for k, v in o.items(): walk(v, f"{where}/{k}")
    elif isinstance(o, (list, tuple)):
        for i, v in enumerate(o): walk(v, f"{where}/{i}")
for p in paths:
    walk(torch.load(p, weights_only=True), p)
assert paths, "no .pt file"
assert not bad, f"tensors off the CPU: {bad[:3]}"
print(len(paths))
"""


def load_without_cuda(run_dir: str) -> dict:
    """Every .pt file of ``run_dir`` loaded by a process that sees no GPU (a CPU-only driver)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", LOAD_ON_CPU, run_dir], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise RuntimeError(lines[-1] if lines else f"exit status {proc.returncode}")
    return {"files": int(proc.stdout.strip().splitlines()[-1])}


def probe_gpus(timeout_s: float = 120.0) -> dict:
    """What the nodes the replicas run on have: the cluster's GPUs and, from a task holding one,
    torch's view of it. {"gpus": 0} where the cluster has none."""
    import ray

    total = ray.cluster_resources().get("GPU", 0.0)
    if total < 1:
        return {"gpus": total, "name": None}

    @ray.remote(num_gpus=1, num_cpus=0)
    def look() -> dict:
        import torch

        ok = torch.cuda.is_available()
        return {"cuda": ok, "name": torch.cuda.get_device_name(0) if ok else None,
                "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if ok else None,
                "torch": torch.__version__, "cuda_version": torch.version.cuda}

    return {"gpus": total, **ray.get(look.remote(), timeout=timeout_s)}


def reason(exc: BaseException) -> str:
    """One line: the exception's type and the first line of its message (Ray's wrapped cause's)."""
    cause = getattr(exc, "cause", None) or exc
    text = " ".join(str(cause).strip().splitlines()[:1]) or "(no message)"
    return f"{type(cause).__name__}: {text}"[:300]


def run_cases(cases: dict, log=print) -> dict:
    """Every case in order; a failing case is a row {"status": "failed", "reason": ...}."""
    results = {}
    for name, case in cases.items():
        log(f"gpu-check: {name} ...")
        try:
            results[name] = {"status": "ok", **case()}
        except Exception as exc:  # a failing case is a row of the table, not the end of the check
            results[name] = {"status": "failed", "reason": reason(exc)}
    return results


def table(results: dict) -> str:
    base = results.get(PLAIN, {}).get("samples_per_s")
    lines = [f"{'case':<40} {'samples/s':>10} {'vs plain':>9} {'test acc':>9}  notes"]
    for name, r in results.items():
        if r["status"] != "ok":
            lines.append(f"{name:<40} {'-':>10} {'-':>9} {'-':>9}  {r['status'].upper()}: {r.get('reason', '')}")
            continue
        sps = r.get("samples_per_s")
        ratio = f"{sps / base:.2f}x" if sps and base else "-"
        acc = f"{r['test_accuracy']:.4f}" if r.get("test_accuracy") is not None else "-"
        notes = " ".join(str(x) for x in (r.get("allreduce"), r.get("devices"), r.get("check")) if x)
        if "files" in r:
            notes = f"{r['files']} files loaded without CUDA, every tensor on the CPU"
        lines.append(f"{name:<40} {sps and f'{sps:>10.0f}' or '-':>10} {ratio:>9} {acc:>9}  {notes}")
    return "\n".join(lines)


def build_cases(args, gpus: float, storage: str) -> dict:
    one, half = (0, 0) if args.cpu else (1, 0.5)
    device = "cpu" if args.cpu else "cuda:0"
    e = args.epochs

    def plain():
        import ray

        if args.cpu:
            return plain_loop(device, e)
        return ray.get(ray.remote(num_gpus=1)(plain_loop).remote(device, e))

    def run(strategy, replicas, g, name, **extra):
        return lambda: ours(strategy, replicas, g, e, storage, name, **extra)

    cases = {PLAIN: plain, ONE: run("sync", 1, one, "sync-1"),
             "sync, 1 replica, data from host": run("sync", 1, one, "sync-1-host", resources={"data_on_device": "off"}),
             "sync, 1 replica, bf16": run("sync", 1, one, "sync-1-bf16", run={"precision": "bf16"}),
             "sync, 1 replica, fp16": run("sync", 1, one, "sync-1-fp16", run={"precision": "fp16"}),
             "sync, 2 replicas sharing 1 GPU": run("sync", 2, half, "sync-2-shared")}
    if gpus >= 2 and not args.cpu:
        cases["sync, 2 replicas on 2 GPUs (NCCL)"] = run("sync", 2, 1, "sync-2-nccl")
    cases["async, 2 replicas sharing 1 GPU"] = run("async", 2, half, "async-2-shared")
    cases["local, 2 replicas sharing 1 GPU"] = run("local", 2, half, "local-2-shared")
    cases["sandblaster, 2 replicas sharing 1 GPU"] = run("sandblaster", 2, half, "sandblaster-2-shared")
    cases["checkpoint loaded without CUDA"] = lambda: load_without_cuda(os.path.join(storage, "sync-2-shared"))
    return cases


def run_tests() -> int:
    """The GPU tests (they skip without CUDA), in a subprocess so that their Ray cluster is theirs."""
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_gpu.py"], cwd=ROOT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3, help="epochs per case (default 3)")
    p.add_argument("--cpu", action="store_true", help="run the cases on the CPU (tries the script without a GPU)")
    p.add_argument("--skip-tests", action="store_true", help="only the figures")
    p.add_argument("--out", default="bench", help="folder for gpu_check.json (default bench/)")
    args = p.parse_args(argv)

    import ray

    from ray_train.cluster import init_ray

    status = 0 if args.skip_tests else run_tests()
    started = not ray.is_initialized()
    init_ray(num_cpus=os.cpu_count())  # Ray finds the GPUs itself (or joins RAY_ADDRESS's cluster)
    storage = os.path.join(args.out, "gpu_check_runs")
    try:
        probe = {"gpus": 0, "name": None} if args.cpu else probe_gpus()
    except Exception as exc:
        probe = {"gpus": 0, "name": None, "error": reason(exc)}
    if args.cpu or (probe.get("gpus", 0) >= 1 and probe.get("cuda")):
        results = run_cases(build_cases(args, probe["gpus"], storage), log=lambda m: print(m, flush=True))
        ratio = None
        if results.get(PLAIN, {}).get("status") == "ok" and results.get(ONE, {}).get("status") == "ok":
            ratio = results[ONE]["samples_per_s"] / results[PLAIN]["samples_per_s"]
            results[ONE]["check"] = f"{ratio:.2f}x >= {MIN_RATIO}x: {'ok' if ratio >= MIN_RATIO else 'BELOW'}"
    else:
        why = probe.get("error") or "no CUDA device where the replicas run (a Ray task asking for a GPU found none)"
        results, ratio = {"GPU cases": {"status": "skipped", "reason": why}}, None
    if started:
        ray.shutdown()
    print()
    print(table(results))
    os.makedirs(args.out, exist_ok=True)
    report = {"device": "cpu" if args.cpu else probe.get("name"), "probe": probe, "epochs": args.epochs,
              "model": MODEL, "batch_per_replica": BATCH, "cases": results, "tests_status": status,
              "one_replica_vs_plain": ratio, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    with open(os.path.join(args.out, "gpu_check.json"), "w") as fh:
        json.dump(report, fh, indent=2, default=str)
    failed = [n for n, r in results.items() if r["status"] == "failed"]
    return status or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
