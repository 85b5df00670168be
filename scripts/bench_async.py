"""Async (Downpour) section of the benchmark, measured in one Ray session:

  (a) samples/s of async SGD vs sync SGD, 2 replicas x 1 CPU, net B, batch 64, plain SGD, same
      number of timed steps after a warm-up (async: 1 shard, fetch and push every n = 1, 4 and
      16 steps);
  (b) ps/updates_per_s a parameter server sustains on net H (1.67M parameters, AdaGrad as in
      DistBelief) with 1, 2 and 4 shards: full-model gradient pushes applied per second, the
      gradient put in the object store once and pushed back to back, so the shards are the
      bottleneck rather than the replicas' compute;
  (c) the transports, on the default job (net D, mnist5k, batch 64, 2 replicas x 1 CPU, each
      strategy's default optimizer: momentum for sync, AdaGrad on 2 shards for async): sync vs
      async with n_fetch = n_push = 1 through shared memory (async.transport shm) and through Ray
      actor calls (ray), the three side by side, taking turns for ``--rounds`` rounds in an
      alternating order; the medians, and every round's async/sync ratio (the CPUs may be shared
      with other work: read the spread); and the milliseconds per step the two transports
      themselves cost (a push of the whole gradient and a read of the new parameters, no compute).

``scripts/benchmark.py`` imports ``bench`` inside its Ray session; run alone, this prints JSON
(``--only transports`` for section (c) alone).
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


def _default_job(strategy: str, resources: dict, **asyncs):
    """What ``python -m ray_train --strategy STRATEGY`` runs, but for the resources and async
    settings given."""
    from ray_train.config import build_config

    return build_config(overrides={"run": {"strategy": strategy, "log_every": CHUNK}, "resources": resources,
                                   "async": asyncs})


def _factory(cfg):
    from ray_train.data.loaders import load_dataset
    from ray_train.network import model_factory

    return model_factory(cfg, load_dataset(cfg.data))


def _initial_model(cfg):
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(cfg.run.seed)
        return _factory(cfg)()


class SyncCase:
    """A live sync group that runs ``steps`` more steps per replica on request, every chunk
    queued at once (as the async replicas' are: no driver round trip between chunks)."""

    def __init__(self, data_ref, cfg) -> None:
        import ray

        from ray_train.worker.batches import steps_per_epoch
        from ray_train.worker.group import ReplicaGroup

        self.cfg, self.group = cfg, ReplicaGroup.create(cfg, data_ref, _factory(cfg))
        self.spe = steps_per_epoch(ray.get(data_ref).y_train.shape[0], cfg.resources.replicas, cfg.run.batch_size)
        self.epoch = self.pos = 0

    def run(self, steps: int) -> float:
        import ray

        t0, refs, n = time.perf_counter(), [], steps
        while n > 0:
            if self.pos == 0:
                refs += [a.set_epoch.remote(self.epoch, self.cfg.optim.lr) for a in self.group.actors]
            take = min(n, self.spe - self.pos, CHUNK)
            refs += [a.train_steps.remote(take) for a in self.group.actors]
            n, self.pos = n - take, self.pos + take
            if self.pos == self.spe:
                self.epoch, self.pos = self.epoch + 1, 0
        ray.get(refs)
        return len(self.group.actors) * steps * self.cfg.run.batch_size / (time.perf_counter() - t0)

    def close(self) -> None:
        self.group.shutdown()


class AsyncCase:
    """A live Downpour (shards and replicas) that runs ``steps`` more steps per replica on request:
    each replica its own queue of chunks, nobody waiting for anybody."""

    def __init__(self, data_ref, cfg) -> None:
        from ray_train.strategies.downpour.engine import Downpour

        self.cfg, self.dp, self.next = cfg, Downpour(cfg, data_ref, _factory(cfg), _initial_model(cfg)), 0
        self.transports = sorted({k for per in self.dp.transports for k in per})

    def run(self, steps: int) -> float:
        import ray

        v0 = ray.get(self.dp.shards[0].stats.remote())["version"]
        t0 = time.perf_counter()
        ray.get([r.run.remote(self.next + s, min(CHUNK, steps - s)) for s in range(0, steps, CHUNK)
                 for r in self.dp.replicas])
        elapsed = time.perf_counter() - t0
        self.next += steps
        self.updates_per_s = (ray.get(self.dp.shards[0].stats.remote())["version"] - v0) / elapsed
        return len(self.dp.replicas) * steps * self.cfg.run.batch_size / elapsed

    def close(self) -> None:
        self.dp.shutdown()


def _sync(data_ref, steps: int, warmup: int) -> float:
    case = SyncCase(data_ref, _cfg(2))
    try:
        case.run(warmup)
        return case.run(steps)
    finally:
        case.close()


def _async(data_ref, steps: int, warmup: int, n_fetch: int = 1, n_push: int = 1) -> dict:
    case = AsyncCase(data_ref, _cfg(2, ps_shards=1, n_fetch=n_fetch, n_push=n_push))
    try:
        case.run(warmup)
        return {"samples_per_s": case.run(steps), "updates_per_s": case.updates_per_s}
    finally:
        case.close()


def transports(data_ref, steps: int, warmup: int, rounds: int) -> dict:
    """Section (c): sync vs async n = 1 over each transport. The three setups live side by side
    and take turns, in an order that alternates every round, so that a change in the machine's
    load hits every case alike. Each holds a third of the cluster's logical CPUs, which changes
    nothing physical: a replica runs one torch thread either way, and only one setup runs at a
    time."""
    import statistics

    import ray

    load = [os.getloadavg()[0]]  # the machine's 1-minute load average, before and after
    share = min(1.0, ray.cluster_resources()["CPU"] / 6)
    resources = {"replicas": 2, "cpus_per_replica": share}
    cases = {"sync": SyncCase(data_ref, _default_job("sync", resources))}
    try:
        for t in ("shm", "ray"):
            case = cases[f"async_{t}"] = AsyncCase(data_ref, _default_job("async", resources, n_fetch=1, n_push=1,
                                                                          transport=t))
            assert case.transports == [t], case.transports  # the transport really used
        for case in cases.values():
            case.run(warmup)
        per_round = []
        for r in range(rounds):
            got = {}
            for name in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
                got[name] = cases[name].run(steps)
                print(f"[bench_async] round {r + 1}/{rounds} {name}: {got[name]:.0f} samples/s", file=sys.stderr,
                      flush=True)
            per_round.append(got)
    finally:
        for case in cases.values():
            case.close()
    load.append(os.getloadavg()[0])
    ratios = {f"{name}_vs_sync": [g[name] / g["sync"] for g in per_round] for name in cases if name != "sync"}
    cfg = _default_job("async", resources)
    return {"model": cfg.model.name, "dataset": cfg.data.dataset, "batch": cfg.run.batch_size, "replicas": 2,
            "threads_per_replica": 1, "ps_shards": cfg.async_.ps_shards, "n_fetch": 1, "n_push": 1,
            "steps": steps, "rounds": rounds, "load_average": load,
            "median_samples_per_s": {n: statistics.median(g[n] for g in per_round) for n in cases},
            **{f"median_{k}": statistics.median(v) for k, v in ratios.items()},
            **{f"range_{k}": [min(v), max(v)] for k, v in ratios.items()},
            "per_round": per_round, "ratios_per_round": ratios}


def round_trips(steps: int, rounds: int) -> dict:
    """Milliseconds one n = 1 step spends talking to the shards, without the compute: this
    process pushes the default job's gradient to its 2 shards and reads back the parameters the
    pushes produced, through each transport, taking turns for ``rounds`` rounds; the medians."""
    import statistics

    import numpy as np
    import ray

    from ray_train.cluster import actor_class
    from ray_train.strategies.downpour.engine import flat_params
    from ray_train.strategies.downpour.parameter_server import ParameterShard, split_bounds
    from ray_train.strategies.downpour.replica import Mailbox, RayChannel, ShmChannel

    cfg = _default_job("async", {"replicas": 1})
    flat = flat_params(_initial_model(cfg))
    bounds = split_bounds(len(flat), cfg.async_.ps_shards)
    shards = [actor_class(ParameterShard, num_cpus=0).remote(k, hi - lo, cfg.optim)
              for k, (lo, hi) in enumerate(bounds)]
    try:
        ray.get([s.assign.remote(flat[lo:hi]) for s, (lo, hi) in zip(shards, bounds)])
        box = Mailbox(len(flat))
        where = ray.get([s.endpoint.remote() for s in shards])
        channels = {"shm": [ShmChannel(w["address"], box, 0, lo, hi) for w, (lo, hi) in zip(where, bounds)],
                    "ray": [RayChannel(s) for s in shards]}
        grad = np.random.default_rng(0).standard_normal(len(flat)).astype(np.float32) * 1e-4
        got = np.empty_like(flat)
        versions = [0] * len(shards)

        def step(kind: str) -> None:
            for k, (ch, (lo, hi)) in enumerate(zip(channels[kind], bounds)):
                ch.push(grad[lo:hi], versions[k], 0, True)
            for k, (ch, (lo, hi)) in enumerate(zip(channels[kind], bounds)):
                versions[k] = ch.wait()
                ch.read(got[lo:hi])

        times: dict[str, list[float]] = {"shm": [], "ray": []}
        for r in range(rounds + 1):  # round 0 warms up
            for kind in (("shm", "ray") if r % 2 == 0 else ("ray", "shm")):
                t0 = time.perf_counter()
                for _ in range(steps):
                    step(kind)
                if r:
                    times[kind].append((time.perf_counter() - t0) / steps * 1e3)
        return {"shards": len(shards), "parameters": len(flat), "steps": steps, "rounds": rounds,
                **{f"{kind}_ms": statistics.median(t) for kind, t in times.items()},
                **{f"{kind}_ms_range": [min(t), max(t)] for kind, t in times.items()}}
    finally:
        for s in shards:
            ray.kill(s)


def _ps_capacity(shards: int, pushes: int) -> float:
    import numpy as np
    import ray

    from ray_train.cluster import actor_class
    from ray_train.config import OptimConfig, build_config
    from ray_train.strategies.downpour.parameter_server import ParameterShard, split_bounds

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


def bench(steps: int = 300, warmup: int = 20, rounds: int = 7, only: str | None = None) -> dict:
    import ray

    from ray_train.config import DataConfig
    from ray_train.data.loaders import load_dataset

    data_ref = ray.put(load_dataset(DataConfig(dataset="mnist5k")))
    if only == "transports":
        return {"transports": transports(data_ref, steps, warmup, rounds), "round_trips": round_trips(steps, rounds)}
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
        "transports": transports(data_ref, steps, warmup, rounds),
        "round_trips": round_trips(steps, rounds),
    }


if __name__ == "__main__":
    import argparse

    from ray_train.cluster import init_ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", choices=["transports"])
    args = parser.parse_args()
    init_ray(num_cpus=2)
    print(json.dumps(bench(args.steps, args.warmup, args.rounds, args.only), indent=2))
