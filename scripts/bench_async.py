"""Async (Downpour) section of the benchmark, measured in one Ray session:

  (a) samples/s of async SGD vs sync SGD, 2 replicas x 1 CPU, net B, batch 64, plain SGD, same
      number of timed steps after a warm-up (async: 1 shard, fetch and push every n = 1, 4 and
      16 steps);
  (b) ps/updates_per_s a parameter server sustains on net H (1.67M parameters, AdaGrad as in
      DistBelief) with 1, 2 and 4 shards: full-model gradient pushes applied per second, the
      gradient put in the object store once and pushed back to back, so the shards are the
      bottleneck rather than the replicas' compute.

``scripts/benchmark.py`` imports ``bench`` inside its Ray session; run alone, this prints JSON.
"""
from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MODEL, LR, BATCH, CHUNK = "net_b", 0.05, 64, 10
INTERVALS = (1, 4, 16)  # n_fetch = n_push = n


def _cfg(replicas: int, **asyncs):
    from ray_train.config import build_config

    return build_config(overrides={
        "run": {"batch_size": BATCH, "log_every": CHUNK}, "model": {"name": MODEL},
        "optim": {"optimizer": "sgd", "lr": LR}, "resources": {"replicas": replicas, "cpus_per_replica": 1},
        "async": {"ps_cpus": 0, **asyncs}})


def _factory(cfg):
    from ray_train.api import model_factory
    from ray_train.data import load_dataset

    return model_factory(cfg, load_dataset(cfg.data))


def _initial_model(cfg):
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(cfg.run.seed)
        return _factory(cfg)()


def _sync(data_ref, steps: int, warmup: int) -> float:
    import ray

    from ray_train.group import ReplicaGroup

    group = ReplicaGroup.create(_cfg(2), data_ref, _factory(_cfg(2)))
    try:
        # mnist5k: 31 steps per replica per epoch; queue chunks as the sync strategy does.
        def run(n: int, epoch: int) -> int:
            left = 0
            while n > 0:
                if left == 0:
                    left = ray.get([a.set_epoch.remote(epoch, LR) for a in group.actors])[0]
                    epoch += 1
                take = min(n, left, CHUNK)
                ray.get([a.train_steps.remote(take) for a in group.actors])
                n, left = n - take, left - take
            return epoch

        epoch = run(warmup, 0)
        t0 = time.perf_counter()
        run(steps, epoch)
        return 2 * steps * BATCH / (time.perf_counter() - t0)
    finally:
        group.shutdown()


def _async(data_ref, steps: int, warmup: int, n_fetch: int = 1, n_push: int = 1) -> dict:
    import ray

    from ray_train.engines.downpour import Downpour

    cfg = _cfg(2, ps_shards=1, n_fetch=n_fetch, n_push=n_push)
    dp = Downpour(cfg, data_ref, _factory(cfg), _initial_model(cfg))
    try:
        ray.get([r.run.remote(0, warmup) for r in dp.replicas])
        v0 = ray.get(dp.shards[0].stats.remote())["version"]
        t0 = time.perf_counter()
        # Each replica runs its own queue of chunks; nobody waits for anybody.
        refs = [r.run.remote(warmup + s, min(CHUNK, steps - s)) for s in range(0, steps, CHUNK) for r in dp.replicas]
        ray.get(refs)
        elapsed = time.perf_counter() - t0
        v1 = ray.get(dp.shards[0].stats.remote())["version"]
        return {"samples_per_s": 2 * steps * BATCH / elapsed, "updates_per_s": (v1 - v0) / elapsed}
    finally:
        dp.shutdown()


def _ps_capacity(shards: int, pushes: int) -> float:
    import numpy as np
    import ray

    from ray_train.cluster import actor_class
    from ray_train.config import OptimConfig, build_config
    from ray_train.parameter_server import ParameterShard, split_bounds

    model = _initial_model(build_config(overrides={"model": {"name": "net_h"}}))
    flat = np.concatenate([p.detach().reshape(-1).numpy() for p in model.parameters()])
    grad = np.random.default_rng(0).standard_normal(len(flat)).astype(np.float32) * 1e-3
    bounds = split_bounds(len(flat), shards)
    actors = [actor_class(ParameterShard, num_cpus=2 / shards).remote(k, hi - lo, OptimConfig(optimizer="adagrad", lr=0.01))
              for k, (lo, hi) in enumerate(bounds)]
    ray.get([a.assign.remote(flat[lo:hi]) for a, (lo, hi) in zip(actors, bounds)])
    try:
        grads = [ray.put(grad[lo:hi]) for lo, hi in bounds]  # one copy, read by every push
        ray.get([a.push.remote(g, 0) for a, g in zip(actors, grads)])  # warm-up
        t0 = time.perf_counter()
        ray.get([a.push.remote(g, 0) for _ in range(pushes) for a, g in zip(actors, grads)])
        return pushes / (time.perf_counter() - t0)
    finally:
        for a in actors:
            ray.kill(a)


def bench(steps: int = 300, warmup: int = 20) -> dict:
    import ray

    from ray_train.config import DataConfig
    from ray_train.data import load_dataset

    data_ref = ray.put(load_dataset(DataConfig(dataset="mnist5k")))
    sync = _sync(data_ref, steps, warmup)
    every = {n: _async(data_ref, steps, warmup, n_fetch=n, n_push=n) for n in INTERVALS}
    capacity = {f"{k}_shards": _ps_capacity(k, steps) for k in (1, 2, 4)}
    return {
        "throughput": {"model": MODEL, "batch": BATCH, "replicas": 2, "steps": steps, "ps_shards": 1,
                       "sync_samples_per_s": sync,
                       **{f"async_n{n}_samples_per_s": a["samples_per_s"] for n, a in every.items()},
                       **{f"async_n{n}_vs_sync": a["samples_per_s"] / sync for n, a in every.items()},
                       **{f"async_n{n}_ps_updates_per_s": a["updates_per_s"] for n, a in every.items()}},
        "ps_updates_per_s": {"model": "net_h", "parameters": 1672570, "optimizer": "adagrad",
                             "pushes": steps, **capacity},
    }


if __name__ == "__main__":
    from ray_train.cluster import init_ray

    init_ray(num_cpus=2)
    print(json.dumps(bench(), indent=2))
