"""Streamed data against in-memory data and against a plain PyTorch input pipeline (``make bench``
runs it as the ``data`` section; alone: ``python scripts/bench_data.py``).

(a) The default job (net D on MNIST-5k, sync, 2 replicas, batch 64) on the same split twice: in
    memory (mnist5k) and streamed by Ray Data from parquet files holding the same examples.
    Both runs give each replica 0.5 CPU on a 2-CPU cluster, so Ray Data's reading tasks have the
    CPU the replicas leave (what a streamed run needs). Reported: samples/s of each and the ratio
    streamed / in memory (target >= 0.85).
(b) MNIST-5k's training images as PNG files in a class-per-folder tree: ray-train (sync, 1
    replica x 1 CPU, Ray Data decoding on the other CPU) against a plain PyTorch loop over a
    ``torch.utils.data.DataLoader`` (1 worker process decoding with PIL, 1 training thread):
    2 CPUs in both. Same network (net D), batch 64, SGD, the same epochs.

Compare ratios within one run only: the machine is shared and noisy.
"""
from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

EPOCHS, BATCH, MODEL = 12, 64, "net_d"  # the default job (configs/default.yaml)


def _mnist5k():
    from ray_train.config import DataConfig
    from ray_train.data.loaders import load_dataset

    return load_dataset(DataConfig(dataset="mnist5k"))


def write_parquet(data, path: str) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = [("train", data.x_train, data.y_train), ("val", data.x_val, data.y_val), ("test", data.x_test, data.y_test)]
    x = np.concatenate([p[1].reshape(len(p[1]), -1) for p in parts])
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1]),
                      "y": np.concatenate([p[2] for p in parts]),
                      "split": sum(([name] * len(y) for name, _, y in parts), [])})
    pq.write_table(table, path, row_group_size=500)


def write_pngs(data, root: str) -> None:
    from PIL import Image

    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        for i, (img, c) in enumerate(zip(x, y)):
            folder = os.path.join(root, split, str(c))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(img[0]).save(os.path.join(folder, f"{i:05d}.png"))


def _fit(dataset: str, storage: str, replicas: int, cpus: float, extra: dict | None = None) -> dict:
    import ray_train

    cfg = {"run": {"epochs": EPOCHS, "batch_size": BATCH, "storage": storage, "seed": 0},
           "data": {"dataset": dataset, **(extra or {})}, "model": {"name": MODEL},
           "resources": {"replicas": replicas, "cpus_per_replica": cpus}}
    s = ray_train.fit(cfg, tensorboard=False, progress=False, out=io.StringIO())
    return {"samples_per_s": round(s["samples_per_s"], 1), "test_accuracy": s["test_accuracy"], "wall_s": round(s["wall_s"], 1)}


def plain_dataloader(root: str) -> dict:
    """net D over the PNG tree with torchvision-free PyTorch: ImageFolder's job by hand."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from models import build_model

    classes = sorted(os.listdir(os.path.join(root, "train")))
    files = [(os.path.join(root, "train", c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(root, "train", c)))]

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, k):
            path, label = files[k]
            with Image.open(path) as im:
                x = np.asarray(im.convert("L"), dtype=np.float32)[None] / 255
            return torch.from_numpy(x), label

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(MODEL)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(Files(), batch_size=BATCH, shuffle=True, num_workers=1, drop_last=True,
                                         generator=torch.Generator().manual_seed(0), persistent_workers=True)
    samples, t0 = 0, time.perf_counter()
    for _ in range(EPOCHS):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            samples += len(y)
    return {"samples_per_s": round(samples / (time.perf_counter() - t0), 1)}


def bench_parquet() -> dict:
    """(a) alone: streamed first, then in memory (docs/data.md, one split coordinator per group)."""
    data = _mnist5k()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        table = os.path.join(tmp, "mnist5k.parquet")
        write_parquet(data, table)
        streamed = _fit(f"parquet:{table}", os.path.join(tmp, "runs"), 2, 0.5, {"split_column": "split"})
        in_memory = _fit("mnist5k", os.path.join(tmp, "runs"), 2, 0.5)
    return {"job": f"{MODEL}, mnist5k, sync, batch {BATCH} per replica, {EPOCHS} epochs", "in_memory": in_memory,
            "streamed": streamed, "ratio": round(streamed["samples_per_s"] / in_memory["samples_per_s"], 3)}


def bench() -> dict:
    data = _mnist5k()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        table = os.path.join(tmp, "mnist5k.parquet")
        write_parquet(data, table)
        in_memory = _fit("mnist5k", os.path.join(tmp, "runs"), 2, 0.5)
        streamed = _fit(f"parquet:{table}", os.path.join(tmp, "runs"), 2, 0.5, {"split_column": "split"})
        pngs = os.path.join(tmp, "png")
        write_pngs(data, pngs)
        ours = _fit(f"images:{pngs}", os.path.join(tmp, "runs"), 1, 1.0)
        plain = plain_dataloader(pngs)
    return {
        "job": f"{MODEL}, mnist5k, sync, batch {BATCH} per replica, {EPOCHS} epochs",
        "parquet_vs_memory": {"in_memory": in_memory, "streamed": streamed,
                              "ratio": round(streamed["samples_per_s"] / in_memory["samples_per_s"], 3)},
        "png_folder": {"ray_train": ours, "torch_dataloader": plain,
                       "ratio": round(ours["samples_per_s"] / plain["samples_per_s"], 3)},
    }


if __name__ == "__main__":
    import argparse

    from ray_train.cluster import init_ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"epochs of every run (default {EPOCHS})")
    parser.add_argument("--parquet-only", action="store_true", help="only (a): streamed from parquet, then in memory")
    args = parser.parse_args()
    EPOCHS = args.epochs
    init_ray(num_cpus=2)
    print(json.dumps(bench_parquet() if args.parquet_only else bench(), indent=2))
