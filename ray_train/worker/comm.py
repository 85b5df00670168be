"""Gradient averaging among replica actors.

Two policies behind one small interface (``mean_`` averages a flat buffer in place, identically
on every rank):

- ``DistAllreduce``: torch.distributed all_reduce (gloo on CPU, NCCL on GPUs), the flat gradient
  split into a few large buckets so that there are few messages (one message per tensor cost a
  third of the throughput, measured on the development VM).
- ``GradBuckets``: the same sums, but each bucket's all_reduce starts as soon as backward has
  produced the bucket's last gradient (parameter hooks, as DDP does), so communication overlaps
  the rest of backward; ``mean_`` then only waits. Sync SGD's gradients over gloo or NCCL.
- ``SharedMemoryAllreduce``: replicas on one node's CPUs write their gradient into a shared-memory
  slot and each sums all slots after one barrier. It avoids TCP loopback, which bounded gloo at
  ~77% of linear scaling on two cores (a 2.1 ms allreduce of 1.16 MB against ~7 ms of compute
  per step, measured on the development VM).
- ``HierarchicalAllreduce`` (worker/hier.py): replicas on several nodes, several on a node: the two
  levels above, shared memory inside each node and gloo (NCCL) among one leader per node.
"""
from __future__ import annotations

import os
import platform
import uuid
from multiprocessing import resource_tracker, shared_memory

import numpy as np
import torch
import torch.distributed as dist

BUCKET_BYTES = 25 * 2**20


def allreduce_bytes(flat: torch.Tensor, world_size: int) -> int:
    """What one replica counts for averaging ``flat`` among ``world_size`` replicas: 2(N-1)/N of
    its bytes, the volume a ring allreduce sends per rank, whatever the transport (docs/benchmarks.md,
    "Communication accounting"); 0 alone."""
    return 2 * (world_size - 1) * flat.numel() * flat.element_size() // world_size


def flatten_grads(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """One contiguous gradient buffer; every ``p.grad`` becomes a view into it, so backward
    accumulates straight into the buffer that is averaged (no copy in or out)."""
    first = params[0]
    flat = torch.zeros(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
    for p, view in zip(params, _views(params, flat)):
        p.grad = view
    return flat


def flatten_params(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The same for the parameters themselves (model averaging): their values move into one
    contiguous buffer and every ``p.data`` becomes a view into it."""
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    for p, view in zip(params, _views(params, flat)):
        p.data = view
    return flat


def _views(params: list[torch.nn.Parameter], flat: torch.Tensor) -> list[torch.Tensor]:
    offset, views = 0, []
    for p in params:
        views.append(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return views


class DistAllreduce:
    """Bucketed torch.distributed all_reduce over a process group (default: the default one)."""

    def __init__(self, world_size: int, bucket_bytes: int = BUCKET_BYTES, group=None) -> None:
        self.world_size = world_size
        self.bucket_bytes = bucket_bytes
        self.group = group  # None: the default process group (a pipeline's stage copies have their own)

    def mean_(self, flat: torch.Tensor) -> None:
        per = max(1, self.bucket_bytes // flat.element_size())
        works = [dist.all_reduce(b, group=self.group, async_op=True) for b in flat.split(per)]
        for w in works:
            w.wait()
        flat.div_(self.world_size)

    def close(self) -> None:
        pass


def grad_buckets(params: list[torch.nn.Parameter], itemsize: int,
                 bucket_bytes: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Buckets of a flat gradient (``flatten_grads(params)``) in the order backward fills them:
    runs of consecutive parameters, last to first, up to ``bucket_bytes`` each (a parameter larger
    than that is a bucket of its own). Returns each bucket's (lo, hi) in the flat buffer, in that
    order, and the bucket of each parameter."""
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    bounds: list[tuple[int, int]] = []
    bucket_of = [0] * len(params)
    hi = len(params)
    for i in reversed(range(len(params))):
        if i + 1 < hi and (offsets[hi] - offsets[i]) * itemsize > bucket_bytes:
            bounds.append((offsets[i + 1], offsets[hi]))
            hi = i + 1
        bucket_of[i] = len(bounds)
    bounds.append((offsets[0], offsets[hi]))
    return bounds, bucket_of


class GradBuckets:
    """Bucketed all_reduce of the flat gradient ``flat`` (``flatten_grads(params)``) started from
    backward: buckets are runs of consecutive parameters, last to first (the order backward produces
    their gradients), up to ``bucket_bytes`` each; a post-accumulate-grad hook counts a bucket's
    parameters and launches its all_reduce (asynchronous) when the last one is in. ``mean_`` launches
    any bucket backward did not complete (a parameter without a gradient), waits and divides.
    Every rank runs the same graph, so the buckets launch in the same order on every rank. The sums
    are those of DistAllreduce: the same numbers (tests/test_sync_equivalence.py)."""

    def __init__(self, params: list[torch.nn.Parameter], flat: torch.Tensor, world_size: int,
                 bucket_bytes: int = BUCKET_BYTES) -> None:
        self.world_size, self.flat = world_size, flat
        # (lo, hi) of each bucket in flat, in launch order; the bucket of each parameter
        self.bounds, self.bucket_of = grad_buckets(params, flat.element_size(), bucket_bytes)
        self.size = [self.bucket_of.count(b) for b in range(len(self.bounds))]
        self.left = list(self.size)
        self.works: list = [None] * len(self.bounds)
        self.hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(params)]

    def _hook(self, i: int):
        def ready(_param) -> None:
            b = self.bucket_of[i]
            self.left[b] -= 1
            if self.left[b] == 0:
                self._launch(b)
        return ready

    def _launch(self, b: int) -> None:
        if self.works[b] is None:
            lo, hi = self.bounds[b]
            self.works[b] = dist.all_reduce(self.flat[lo:hi], async_op=True)

    def mean_(self, flat: torch.Tensor) -> None:
        assert flat is self.flat, "GradBuckets averages the gradient buffer it hooked"
        for b in range(len(self.bounds)):
            self._launch(b)
        for w in self.works:
            w.wait()
        self.works = [None] * len(self.bounds)
        self.left = list(self.size)
        flat.div_(self.world_size)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


class SharedMemoryAllreduce:
    """Allreduce through one shared-memory segment for replicas on the same node.

    Layout: two parity halves x world slots x numel float32. Step t writes slot [t % 2][rank],
    waits at a barrier, then sums the world slots of that half in rank order, so every rank gets
    bit-identical results. One barrier per step is enough: a rank can only write half t % 2
    again at step t + 2, after every rank has passed barrier t + 1, i.e. finished reading step t.

    The barrier: each rank publishes its step count in its own flag word and yields the CPU
    until every flag has reached it. That takes ~0.05 ms where a gloo barrier over loopback takes
    ~0.4 ms (measured: 0.39 vs 1.0 ms per 290k-float allreduce, two replicas, two cores). It
    relies on x86's ordered stores (slot data becomes visible before the flag); elsewhere the
    barrier is gloo's.
    """

    ORDERED_STORES = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")

    def __init__(self, name: str, rank: int, world_size: int, numel: int, create: bool) -> None:
        self.rank, self.world_size, self.step = rank, world_size, 0
        header = 64 * ((8 * world_size + 63) // 64)
        nbytes = header + 2 * world_size * numel * 4
        if create:
            self.shm = shared_memory.SharedMemory(name=name, create=True, size=nbytes)
        else:
            self.shm = shared_memory.SharedMemory(name=name)
            # Python < 3.13 registers attached segments with the resource tracker too, which
            # would unlink the creator's segment when this process exits.
            resource_tracker.unregister(self.shm._name, "shared_memory")
        self.flags = np.ndarray((world_size,), dtype=np.int64, buffer=self.shm.buf[: 8 * world_size])
        array = np.ndarray((2, world_size, numel), dtype=np.float32, buffer=self.shm.buf[header:])
        self.slots = torch.from_numpy(array)

    def unlink(self) -> None:
        """Remove the segment's name once every rank has attached: the mappings stay valid, and
        no crash (a SIGKILL'd driver, killed actors) can leave it behind in /dev/shm."""
        self.shm.unlink()

    @staticmethod
    def new_name() -> str:
        return f"rt_{uuid.uuid4().hex[:16]}"

    def mean_(self, flat: torch.Tensor) -> None:
        half = self.write(flat)
        self.barrier()
        self.reduce(half, flat)

    def write(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's gradient into its slot of this step's half; returns the half."""
        half = self.slots[self.step % 2]
        half[self.rank].copy_(flat)
        self.step += 1
        return half

    def reduce(self, half: torch.Tensor, flat: torch.Tensor) -> None:
        # The same reduction over the same slots in rank order on every rank: bit-identical
        # results. Pairwise add then divide, not torch.mean(dim=0): the same numbers for two
        # ranks, in half the time (0.09 vs 0.19 ms for net B's 289,630 floats, one thread).
        torch.add(half[0], half[1], out=flat)
        for r in range(2, self.world_size):
            flat.add_(half[r])
        flat.div_(self.world_size)

    def barrier(self) -> None:
        if not self.ORDERED_STORES:
            dist.barrier()
            return
        self.flags[self.rank] = self.step
        while self.flags.min() < self.step:
            os.sched_yield()

    def close(self) -> None:
        del self.slots, self.flags
        self.shm.close()
