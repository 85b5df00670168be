"""Where a sync SGD step's time goes, per replica: data, forward + backward, the gradient's copy
into shared memory, the wait at the barrier (for the slower replica), the average, the optimizer
step. The account in docs/benchmarks.md of what bounds sync throughput comes from here:

    python scripts/profile_sync.py                       # 2 replicas, net B, batch 64, shm
    python scripts/profile_sync.py --allreduce gloo      # the allreduce as one phase

Each replica is the project's Replica with its step() split into timed phases (same operations,
same order), on a local 2-CPU Ray cluster. Prints mean and 90th percentile per phase in ms.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PHASES = ("data", "forward_backward", "write", "barrier", "average", "optimizer", "step")


def profiled_replica():
    import numpy as np

    from ray_train.worker.comm import SharedMemoryAllreduce
    from ray_train.worker.replica import Replica

    class ProfiledReplica(Replica):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.times = {p: [] for p in PHASES}

        def step(self, idx):
            t = [time.perf_counter()]
            x, y = self.batch(idx)
            t.append(time.perf_counter())
            loss, hits = self.gradients(x, y)
            t.append(time.perf_counter())
            comm = self.comm
            if isinstance(comm, SharedMemoryAllreduce):  # mean_() in its three parts
                half = comm.write(self.grad)
                t.append(time.perf_counter())
                comm.barrier()
                t.append(time.perf_counter())
                comm.reduce(half, self.grad)
            elif comm is not None:  # torch.distributed (GradBuckets start during backward): what is left to wait
                t.append(time.perf_counter())
                comm.mean_(self.grad)
                t.append(time.perf_counter())
            else:
                t += [t[-1], t[-1]]
            t.append(time.perf_counter())
            self.precision.step()
            t.append(time.perf_counter())
            for name, a, b in zip(PHASES, t, t[1:]):
                self.times[name].append((b - a) * 1e3)
            self.times["step"].append((t[-1] - t[0]) * 1e3)
            return loss, hits

        def profile(self, skip: int) -> dict:
            return {p: (float(np.mean(v[skip:])), float(np.percentile(v[skip:], 90))) for p, v in self.times.items()}

    return ProfiledReplica


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--allreduce", default="auto", choices=["auto", "shm", "gloo"])
    p.add_argument("--model", default="net_b")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=10, help="epochs of MNIST-5k (31 steps each for 2 replicas)")
    args = p.parse_args()

    from ray_train.cluster import init_ray

    init_ray(num_cpus=2, preload=("ray_train.worker.group",))
    import ray

    from ray_train.config import DataConfig, build_config
    from ray_train.data.loaders import load_dataset
    from ray_train.network import model_factory
    from ray_train.worker.group import ReplicaGroup

    cfg = build_config({}, {"run": {"batch_size": args.batch_size, "allreduce": args.allreduce},
                            "model": {"name": args.model}, "optim": {"optimizer": "sgd", "lr": 0.05},
                            "resources": {"replicas": args.replicas, "cpus_per_replica": 1}})
    data = load_dataset(DataConfig(dataset="mnist5k"))
    group = ReplicaGroup.create(cfg, ray.put(data), model_factory(cfg, data), replica_cls=profiled_replica())
    try:
        steps, t0 = 0, time.perf_counter()
        for epoch in range(args.epochs):
            n = ray.get([a.set_epoch.remote(epoch, 0.05) for a in group.actors])[0]
            ray.get([a.train_steps.remote(n) for a in group.actors])
            steps += n
        elapsed = time.perf_counter() - t0
        profiles = ray.get([a.profile.remote(20) for a in group.actors])
    finally:
        group.shutdown()
    print(f"{args.replicas} replica(s), {args.model}, batch {args.batch_size}, averaging: {group.comm}; "
          f"{steps} steps, {steps * args.batch_size * args.replicas / elapsed:,.0f} samples/s")
    print("phase (ms)".ljust(18) + "".join(f"replica {r}: mean / p90".rjust(26) for r in range(len(profiles))))
    for phase in PHASES:
        print(phase.ljust(18) + "".join(f"{prof[phase][0]:>16.2f} / {prof[phase][1]:<7.2f}" for prof in profiles))


if __name__ == "__main__":
    main()
