"""Pipeline section of ``make bench`` (docs/pipeline.md), side by side in one run:

  (a) throughput: one replica of S = 2 stage actors x 1 CPU on a compute-bound fully connected
      network (784-1024x10-10, 10.3M parameters, batch 2048, M = 8 micro-batches of 256 rows: large
      enough that single-thread matrix products cost only 3-5% more per sample than the whole batch's;
      at batch 256 the 32-row micro-batches alone cost 1.1-1.9x), GPipe and 1F1B,
      against one process on 1 CPU (the same network and batch, plain PyTorch, 1 thread) and
      against the pipeline bound S*M/(M+S-1), and one process that runs the batch as the same M
      micro-batches one after the other (what micro-batching alone costs);
  (b) beside it, torch.distributed.pipelining (ScheduleGPipe / Schedule1F1B, two processes over
      gloo on the same split), the anchor to beat;
  (c) memory: four fully connected layers of width 4,096 (784-4096x4-10, 53.5M parameters,
      momentum SGD): what each stage actor holds (parameters, optimizer state, the peak of
      activations held for backward, resident set) for S = 1, 2 and 4, and 1F1B against GPipe
      at M = 8.

Run alone: ``python scripts/bench_pipeline.py [--steps N] [--only a c] [--profile]``; prints JSON.
``--profile`` adds where each stage actor's step goes (cProfile: forward, backward, waiting for a
receive, posting sends and receives, the optimizer, ms per step).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Ten layers of width 1024: the cut, balanced by parameter count at layer granularity, gives the stages
# 47% and 53% of the step's compute (the first layer computes no input gradient); with six layers it
# was 43/57, which alone held a pipeline to 0.88 of the bound.
WIDTH, DEPTH, BATCH, MICRO, STAGES = 1024, 10, 2048, 8, 2


def compute_net():
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(784, WIDTH), nn.ReLU()]
    for _ in range(DEPTH - 1):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 10))


def memory_net():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                         nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))


def _cfg(stages: int, schedule: str, cpus: float, batch: int, micro: int, n_train: int):
    from ray_train.config import build_config

    return build_config(overrides={
        "run": {"batch_size": batch, "seed": 0},
        "data": {"dataset": "synthetic", "synthetic_train": n_train, "synthetic_test": 16},
        "model": {"name": "mlp30"},  # replaced by the factory given to the group
        "optim": {"optimizer": "momentum", "lr": 0.01},
        "resources": {"replicas": 1, "cpus_per_replica": cpus},
        "pipeline": {"stages": stages, "micro_batches": micro, "schedule": schedule},
    })


def one_process(steps: int, warmup: int, micro: int = 1, batch: int = BATCH) -> float:
    """Samples/s of plain PyTorch on 1 thread: the same network, batch and optimizer; with
    ``micro`` > 1 the batch goes through as that many micro-batches one after the other (what a
    pipeline's stages compute, without the pipeline: smaller matrix products cost more per
    sample, a loss no schedule recovers)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    net = compute_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            (F.cross_entropy(net(xs), ys) / micro).backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


# Where a stage's step goes (--profile): cProfile's cumulative seconds of these calls, per step.
PROFILED = {"forward": "_wrapped_call_impl", "backward": "backward", "isend": "isend", "irecv": "irecv",
            "optimizer": "_sgd", "batch": "to_tensor"}


def _profiled_stage():
    from ray_train.worker.pipeline import Stage

    class ProfiledStage(Stage):
        def profile_steps(self, n: int) -> dict:
            """train_steps(n) under cProfile: per step, the milliseconds in PROFILED's calls, and
            the time waiting for a neighbour's message (the stage's own wait_ms)."""
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            res = self.train_steps(n)
            prof.disable()
            stats = pstats.Stats(prof).stats
            out = {"step": float(res["step_ms"].mean()), "receive wait": float(res["wait_ms"].mean())}
            for label, needle in PROFILED.items():
                # the outermost call of each: nested calls of the same function are in its cumulative time
                out[label] = max((ct for (_, _, fn), (_, _, _, ct, _) in stats.items() if needle in fn),
                                 default=0.0) * 1e3 / n
            return {**res, "profile": out}

    return ProfiledStage


def stage_actors(schedule: str, steps: int, warmup: int, net=compute_net, stages=STAGES, cpus=1.0,
                 batch=BATCH, micro=MICRO, profile: bool = False) -> dict:
    """One replica of ``stages`` stage actors: samples/s from the last stage's median step time,
    the measured bubble, each stage's memory, and with ``profile`` where each stage's step went
    (a second run of ``steps`` steps under cProfile, after the timed one)."""
    import ray

    from ray_train.data.loaders import load_dataset
    from ray_train.worker.pipeline_group import PipelineGroup

    cfg = _cfg(stages, schedule, cpus, batch, micro, batch * (2 * steps + warmup))
    data = load_dataset(cfg.data, seed=0)
    group = PipelineGroup.create(cfg, ray.put(data), net, _profiled_stage())
    try:
        ray.get([a.set_epoch.remote(0, cfg.optim.lr) for a in group.actors])
        ray.get([a.train_steps.remote(warmup) for a in group.actors])
        results = ray.get([a.train_steps.remote(steps) for a in group.actors])
        memory = ray.get([a.memory.remote() for a in group.actors])
        profiles = ([r["profile"] for r in ray.get([a.profile_steps.remote(steps) for a in group.actors])]
                    if profile else None)
    finally:
        group.shutdown()
    step_s = statistics.median(results[-1]["step_ms"].tolist()) / 1e3
    waited = sum(float(r["wait_ms"].sum()) for r in results)
    busy = sum(float(r["step_ms"].sum()) for r in results)
    out = {"samples_per_s": batch / step_s, "bubble": waited / busy, "memory": memory}
    return out | ({"profile_ms_per_step": profiles} if profile else {})


# -- torch.distributed.pipelining, two processes over gloo --------------------------------------------
def _torch_stage(rank: int, world: int, port: int, schedule: str, steps: int, warmup: int, batch: int, out) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from ray_train.worker.stages import split

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    part = split(compute_net(), world)[rank]  # the same cut as the stage actors
    stage = PipelineStage(part, rank, world, torch.device("cpu"))
    kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    sched = kind(stage, n_microbatches=MICRO, loss_fn=lambda out, y: F.cross_entropy(out, y))
    opt = torch.optim.SGD(part.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        if rank == 0:
            sched.step(x)
        elif rank == world - 1:
            sched.step(target=y, losses=[])
        else:
            sched.step()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out.put((rank, batch / statistics.median(times)))
    dist.destroy_process_group()


def torch_pipelining(schedule: str, steps: int, warmup: int, batch: int = BATCH) -> float | str:
    import multiprocessing as mp

    from ray_train.cluster import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_torch_stage, args=(r, STAGES, port, schedule, steps, warmup, batch, out)) for r in range(STAGES)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    if any(p.exitcode != 0 for p in procs):
        return f"failed (exit codes {[p.exitcode for p in procs]})"
    rates = dict(out.get() for _ in procs)
    return rates[STAGES - 1]


# -- the section ------------------------------------------------------------------------------------------
def throughput(steps: int = 60, warmup: int = 5, profile: bool = False, batch: int = BATCH) -> dict:
    bound = STAGES * MICRO / (MICRO + STAGES - 1)
    single = one_process(steps, warmup, batch=batch)
    micro = one_process(steps, warmup, MICRO, batch=batch)
    out = {"network": f"784-{WIDTH}x{DEPTH}-10", "batch": batch, "micro_batches": MICRO, "stages": STAGES,
           "one_process_1cpu": single, "one_process_1cpu_micro": micro, "bound_speedup": bound,
           # the best a pipeline of these micro-batches can do, in the bound's terms
           "micro_bound_of_bound": micro / single}
    for schedule in ("gpipe", "1f1b"):
        ours = stage_actors(schedule, steps, warmup, profile=profile, batch=batch)
        theirs = torch_pipelining(schedule, steps, warmup, batch)
        out[schedule] = {"stage_actors": ours["samples_per_s"], "speedup": ours["samples_per_s"] / single,
                         "of_bound": ours["samples_per_s"] / single / bound, "bubble_measured": ours["bubble"],
                         "of_micro_bound": ours["samples_per_s"] / micro / bound,
                         "torch_pipelining": theirs,
                         "torch_speedup": theirs / single if isinstance(theirs, float) else None,
                         "torch_of_bound": theirs / single / bound if isinstance(theirs, float) else None,
                         "torch_of_micro_bound": theirs / micro / bound if isinstance(theirs, float) else None,
                         **({"profile_ms_per_step": ours["profile_ms_per_step"]} if profile else {})}
        _progress(schedule, out[schedule])
    return out


def _progress(label: str, value) -> None:
    print(f"[bench_pipeline] {label}: {json.dumps(value, default=float)}", file=sys.stderr, flush=True)


def memory(steps: int = 3) -> dict:
    """Per stage actor: parameters + optimizer state, activation peak, resident set."""
    out = {"network": "784-4096x4-10", "batch": 64, "micro_batches": 8}
    for stages, schedule in ((1, "gpipe"), (2, "gpipe"), (2, "1f1b"), (4, "gpipe"), (4, "1f1b")):
        res = stage_actors(schedule, steps, 1, net=memory_net, stages=stages, cpus=2 / stages / 1.0 if stages > 1 else 1.0,
                           batch=64, micro=8)
        out[f"S{stages}_{schedule}"] = [{k: v for k, v in m.items()} for m in res["memory"]]
        _progress(f"S{stages}_{schedule}", out[f"S{stages}_{schedule}"])
    return out


def bench(steps: int = 20, only=("a", "c"), profile: bool = False, batch: int = BATCH) -> dict:
    report = {}
    if "a" in only:
        report["throughput"] = throughput(steps, profile=profile, batch=batch)
    if "c" in only:
        report["memory"] = memory()
    return report


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per system (default 20; a step is ~0.5-0.8 s)")
    p.add_argument("--only", nargs="+", default=["a", "c"], choices=["a", "c"], help="a: throughput, c: memory")
    p.add_argument("--profile", action="store_true", help="also where each stage's step goes (cProfile, ms per step)")
    p.add_argument("--batch", type=int, default=BATCH, help=f"throughput's batch (default {BATCH}; M = {MICRO} "
                   "micro-batches of batch/M rows: small ones cost more per sample, see one_process_1cpu_micro)")
    args = p.parse_args()
    from ray_train.cluster import init_ray

    init_ray(num_cpus=2)
    print(json.dumps(bench(args.steps, args.only, args.profile, args.batch), indent=2))
