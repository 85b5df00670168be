"""Memory of a streamed run against the in-memory path on the same data (docs/data.md, issue 20):
a generated training set several times the object store (default 1.2 GB of parquet, object
store 300 MB) trained for one epoch, each path in its own subprocess; peak RSS (VmHWM) of the
driver and of every replica actor, read from /proc while the run goes.

    python scripts/data_memory.py --folder /tmp/rt-memory            # writes the data once, runs both
    python scripts/data_memory.py --folder /tmp/rt-memory --gb 0.3   # smaller

Not a test (minutes of I/O); prints one JSON document."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIDE, ROW_BYTES = 32, 3 * 32 * 32  # 32x32 RGB uint8 rows
PART_ROWS = 20_000


def make(folder: str, gb: float) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = int(gb * 1e9 / ROW_BYTES)
    os.makedirs(os.path.join(folder, "train"), exist_ok=True)
    rng = np.random.default_rng(0)
    protos = rng.integers(0, 256, (10, ROW_BYTES), dtype=np.uint8)
    xs, ys = [], []
    for start in range(0, rows, PART_ROWS):
        n = min(PART_ROWS, rows - start)
        y = rng.integers(0, 10, n)
        x = np.where(rng.random((n, ROW_BYTES)) < 0.7, protos[y], rng.integers(0, 256, (n, ROW_BYTES), dtype=np.uint8))
        x = x.astype(np.uint8)
        col = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), ROW_BYTES)
        pq.write_table(pa.table({"x": col, "y": y}), os.path.join(folder, "train", f"part-{start // PART_ROWS:04d}.parquet"),
                       compression="none")
        xs.append(x)
        ys.append(y)
    x, y = np.concatenate(xs), np.concatenate(ys)
    test = rng.integers(0, len(y), 2000)
    col = pa.FixedSizeListArray.from_arrays(pa.array(x[test].ravel()), ROW_BYTES)
    pq.write_table(pa.table({"x": col, "y": y[test]}), os.path.join(folder, "test.parquet"))
    np.savez(os.path.join(folder, "same.npz"), x_train=x.reshape(-1, 3, SIDE, SIDE), y_train=y,
             x_test=x[test].reshape(-1, 3, SIDE, SIDE), y_test=y[test])


def _ancestors(pid: str) -> set[int]:
    seen = set()
    while pid not in ("0", "1") and len(seen) < 64:
        with open(f"/proc/{pid}/stat") as fh:
            pid = fh.read().rsplit(")", 1)[1].split()[1]
        seen.add(int(pid))
    return seen


def watch(peaks: dict, stop: threading.Event) -> None:
    """Peak RSS (MB) of every replica actor process of this run's cluster (the local cluster's
    processes descend from this one; other clusters on the machine are not counted), by pid."""
    me = os.getpid()
    while not stop.is_set():
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                if me not in _ancestors(pid):
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    cmd = fh.read().split(b"\0")[0].decode(errors="replace")
                if not cmd.startswith(("ray::Replica", "ray::SplitCoordinator")):
                    continue
                with open(f"/proc/{pid}/status") as fh:
                    hwm = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM"))
                key = f"{cmd.split('.')[0]}:{pid}"
                peaks[key] = max(peaks.get(key, 0), hwm // 1024)
            except (OSError, StopIteration, ValueError):
                continue
        stop.wait(0.5)


def case(folder: str, streamed: bool, store_mb: int, epochs: int) -> dict:
    import ray

    from ray_train.data import streams  # noqa: F401  (Ray Data stays quiet in every process)

    ray.init(address="local", num_cpus=2, object_store_memory=store_mb * 2**20, include_dashboard=False)
    import ray_train

    dataset = (f"parquet:{folder}/train" if streamed else f"npz:{folder}/same.npz")
    cfg = {"run": {"epochs": epochs, "batch_size": 256, "storage": os.path.join(folder, "runs"), "eval_every": epochs},
           "data": {"dataset": dataset, "validation": 0, **({"test_path": f"{folder}/test.parquet"} if streamed else {})},
           "resources": {"replicas": 2, "cpus_per_replica": 0.5}, "model": {"name": "mlp30"}}
    peaks, stop = {}, threading.Event()
    threading.Thread(target=watch, args=(peaks, stop), daemon=True).start()
    t0 = time.perf_counter()
    try:
        summary = ray_train.fit(cfg, tensorboard=False, progress=False, out=open(os.devnull, "w"))
        result = {"test_accuracy": summary["test_accuracy"], "samples_per_s": summary["samples_per_s"],
                  "samples": summary["steps"] * 256 * 2}
    except Exception as exc:  # the in-memory path may not fit: its error is the figure
        result = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    stop.set()
    # VmHWM, not getrusage's ru_maxrss: that one carries the parent's peak across fork and exec
    with open("/proc/self/status") as fh:
        hwm = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM"))
    result.update({"wall_s": round(time.perf_counter() - t0, 1), "driver_peak_rss_mb": hwm // 1024,
                   "actor_peak_rss_mb": peaks})
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default="/tmp/rt-memory")
    p.add_argument("--gb", type=float, default=1.2, help="training data on disk (default 1.2)")
    p.add_argument("--store-mb", type=int, default=300, help="object store size (default 300)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--case", choices=["streamed", "memory"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(case(args.folder, args.case == "streamed", args.store_mb, args.epochs)), flush=True)
        return
    if not os.path.exists(os.path.join(args.folder, "same.npz")):
        make(args.folder, args.gb)
    report = {"command": "python " + " ".join(sys.argv), "gb": args.gb, "store_mb": args.store_mb}
    for name in ("streamed", "memory"):
        out = subprocess.run([sys.executable, __file__, "--folder", args.folder, "--store-mb", str(args.store_mb),
                              "--epochs", str(args.epochs), "--case", name], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": ROOT})
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        report[name] = json.loads(lines[-1]) if lines else {"error": f"exit {out.returncode}: {out.stderr[-400:]}"}
        print(f"[memory] {name}: {report[name]}", file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
