"""Hierarchical averaging for sync replicas on several nodes, several on each (Horovod's
hierarchical allreduce, in two levels):

1. inside each node the replicas' gradients are summed on the node's *leader* (its lowest rank):
   through one shared-memory segment per node for replicas on CPUs (``ShmNode``), or a reduce in a
   process group of the node's replicas (``GroupNode``: NCCL on GPUs, gloo where stores are not
   ordered);
2. the leaders, one per node, all_reduce those sums among themselves (gloo on CPUs, NCCL on GPUs)
   and divide by the world size;
3. each leader hands the mean back to its node (shared memory, or a broadcast in the node's group).

Only step 2 crosses the network, once per node instead of once per replica. The gradient goes in
buckets as backward produces them (``comm.grad_buckets``, parameter hooks as in ``GradBuckets``),
passed on in bucket order: a peer writes each bucket into its slot once it and the buckets before
it are complete; the leader, once its peers' copies of a bucket are in, adds them to its own and
starts that bucket's all_reduce among the leaders, so the network part runs while backward goes
on; ``mean_`` does what backward left and waits. The sums are those of a flat
allreduce in another order: the parameters equal single-node sync's to float32 rounding
(tests/test_hier.py, tests/test_multinode.py).

"Same node" is Ray's node id, never an address (fake nodes on one machine share both /dev/shm
and the IP). ``ray_train.worker.group.choose_allreduce`` picks this when replicas on CPUs span
nodes and some node holds two or more.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory

import numpy as np
import torch
import torch.distributed as dist

from ray_train.worker.comm import BUCKET_BYTES, grad_buckets


@dataclass(frozen=True)
class Hierarchy:
    """Who sits where, as every rank is told it: ``nodes[r]`` is rank r's Ray node id;
    ``segments`` names the shared-memory segment of each node that holds two or more replicas
    (``None``: process groups inside the nodes instead, e.g. on GPUs)."""

    nodes: tuple[str, ...]
    segments: tuple[tuple[str, str], ...] | None = None

    @classmethod
    def plan(cls, nodes: list[str], shared_memory: bool) -> "Hierarchy":
        h = cls(tuple(nodes))
        if not shared_memory:
            return h
        return cls(h.nodes, tuple((h.nodes[g[0]], f"rt_{uuid.uuid4().hex[:16]}") for g in h.groups() if len(g) > 1))

    @property
    def world_size(self) -> int:
        return len(self.nodes)

    def groups(self) -> list[list[int]]:
        """The ranks of each node, ascending; nodes in the order of their lowest rank."""
        out: dict[str, list[int]] = {}
        for rank, node in enumerate(self.nodes):
            out.setdefault(node, []).append(rank)
        return list(out.values())

    def peers(self, rank: int) -> list[int]:
        """The ranks on ``rank``'s node (itself included); the first is the node's leader."""
        return next(g for g in self.groups() if rank in g)

    @property
    def leaders(self) -> list[int]:
        return [g[0] for g in self.groups()]

    def segment(self, rank: int) -> str | None:
        return dict(self.segments or ()).get(self.nodes[rank])

    def describe(self, across: str) -> str:
        """E.g. "2 nodes x 2 replicas: shared memory inside each node, gloo between one leader per node"."""
        sizes = sorted({len(g) for g in self.groups()})
        per = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        inside = "shared memory" if self.segments is not None else across
        return (f"{len(self.groups())} nodes x {per} replicas: {inside} inside each node, "
                f"{across} between one leader per node")


class ShmNode:
    """The replicas of one node and one shared-memory segment: slot j >= 1 holds local peer j's
    gradient, slot 0 the node's mean; flag word [j, b] is the last step (counted from 1) for which
    peer j wrote bucket b (a word per bucket: backward may complete buckets out of order), word
    [0, 0] the last step the leader published. One slot each is enough: a peer writes its next
    step's buckets only after reading this step's mean, which the leader publishes only after
    reading every peer's buckets. Flags are read and written as ``SharedMemoryAllreduce``'s barrier
    does (ordered stores: x86 only; elsewhere ``GroupNode``)."""

    def __init__(self, name: str, index: int, size: int, numel: int, buckets: int, create: bool) -> None:
        self.index, self.size = index, size
        words = size * buckets
        header = 64 * ((8 * words + 63) // 64)
        nbytes = header + size * numel * 4
        if create:
            self.shm = shared_memory.SharedMemory(name=name, create=True, size=nbytes)
        else:
            self.shm = shared_memory.SharedMemory(name=name)
            resource_tracker.unregister(self.shm._name, "shared_memory")  # as SharedMemoryAllreduce
        self.flags = np.ndarray((size, buckets), dtype=np.int64, buffer=self.shm.buf[: 8 * words])
        self.slots = torch.from_numpy(np.ndarray((size, numel), dtype=np.float32, buffer=self.shm.buf[header:]))

    def _wait(self, j: int, b: int, step: int) -> None:
        while self.flags[j, b] < step:
            os.sched_yield()

    # a peer
    def contribute(self, b: int, lo: int, hi: int, flat: torch.Tensor, step: int) -> None:
        self.slots[self.index, lo:hi].copy_(flat[lo:hi])
        self.flags[self.index, b] = step

    def receive(self, flat: torch.Tensor, step: int) -> None:
        self._wait(0, 0, step)
        flat.copy_(self.slots[0])

    # the leader
    def has(self, b: int, step: int) -> bool:
        """Every peer has written bucket ``b`` of ``step``."""
        return all(self.flags[j, b] >= step for j in range(1, self.size))

    def collect(self, b: int, lo: int, hi: int, flat: torch.Tensor, step: int) -> None:
        for j in range(1, self.size):  # in local rank order: the same sums on every run
            self._wait(j, b, step)
            flat[lo:hi].add_(self.slots[j, lo:hi])

    def publish(self, flat: torch.Tensor, step: int) -> None:
        self.slots[0].copy_(flat)
        self.flags[0, 0] = step

    def unlink(self) -> None:
        self.shm.unlink()

    def close(self) -> None:
        del self.slots, self.flags
        self.shm.close()


class GroupNode:
    """The replicas of one node in a process group of their own (NCCL on GPUs: NVLink or PCIe
    inside the node): each bucket is reduced onto the leader, the mean broadcast back."""

    def __init__(self, group, leader: int) -> None:
        self.group, self.leader, self.works = group, leader, []

    def contribute(self, b: int, lo: int, hi: int, flat: torch.Tensor, step: int) -> None:
        self.works.append(dist.reduce(flat[lo:hi], dst=self.leader, group=self.group, async_op=True))

    def receive(self, flat: torch.Tensor, step: int) -> None:
        for w in self.works:  # (a reduce may still be reading the buffer the broadcast writes)
            w.wait()
        self.works = []
        dist.broadcast(flat, src=self.leader, group=self.group)

    def has(self, b: int, step: int) -> bool:
        return True  # the reduce is a collective: the leader joins it and the peers arrive

    def collect(self, b: int, lo: int, hi: int, flat: torch.Tensor, step: int) -> None:
        dist.reduce(flat[lo:hi], dst=self.leader, group=self.group, async_op=True).wait()

    def publish(self, flat: torch.Tensor, step: int) -> None:
        dist.broadcast(flat, src=self.leader, group=self.group)

    def close(self) -> None:
        pass


class HierarchicalAllreduce:
    """``mean_`` as the other averagings (comm.py): the same mean on every rank. With ``params``
    (whose gradients are views into ``flat``: ``flatten_grads``) each bucket starts from backward's
    hooks; without, ``mean_`` averages any flat buffer of ``numel`` floats in chunks of
    ``bucket_bytes`` (local SGD's parameters, or gradients that change after backward: L1)."""

    def __init__(self, hierarchy: Hierarchy, rank: int, numel: int, across, node,
                 params: list[torch.nn.Parameter] | None = None, flat: torch.Tensor | None = None,
                 bucket_bytes: int = BUCKET_BYTES) -> None:
        self.world_size = hierarchy.world_size
        self.leader = hierarchy.peers(rank)[0] == rank
        self.across, self.node, self.flat = across, node, flat  # across: the leaders' group (None: one node)
        self.step = 0
        self.bounds, self.bucket_of = buckets(numel, params, flat, bucket_bytes)
        self.size = [self.bucket_of.count(b) for b in range(len(self.bounds))]
        self._reset()
        self.hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(params or [])]

    def _reset(self) -> None:
        self.left = list(self.size)
        self.ready = [False] * len(self.bounds)  # this rank's own copy of the bucket is complete
        self.next = 0  # buckets before it are passed on: written, or summed and launched
        self.works: list = []

    def _hook(self, i: int):
        def ready(_param) -> None:
            b = self.bucket_of[i]
            self.left[b] -= 1
            if self.left[b] == 0:
                self.ready[b] = True
                self._advance(self.flat, wait=False)
        return ready

    def _advance(self, flat: torch.Tensor, wait: bool) -> None:
        """Pass on the complete buckets in bucket order (the order of every collective, whatever
        order backward completes them in). From a hook the leader does not wait for its peers: a
        bucket whose peers' copies are not all in waits for a later hook or ``mean_``."""
        step = self.step + 1
        while self.next < len(self.bounds) and self.ready[self.next]:
            b, (lo, hi) = self.next, self.bounds[self.next]
            if not self.leader:
                self.node.contribute(b, lo, hi, flat, step)
            else:
                if self.node is not None:
                    if not wait and not self.node.has(b, step):
                        return
                    self.node.collect(b, lo, hi, flat, step)
                if self.across is not None:
                    self.works.append(dist.all_reduce(flat[lo:hi], group=self.across, async_op=True))
            self.next += 1

    def mean_(self, flat: torch.Tensor) -> None:
        assert not self.hooks or flat is self.flat, "the hooks fill the gradient buffer they were given"
        self.ready = [True] * len(self.bounds)  # every bucket is final now (and without hooks: all of them)
        self._advance(flat, wait=True)
        self.step += 1
        if self.leader:
            for w in self.works:
                w.wait()
            flat.div_(self.world_size)
            if self.node is not None:
                self.node.publish(flat, self.step)
        else:
            self.node.receive(flat, self.step)
        self._reset()

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        if self.node is not None:
            self.node.close()
            self.node = None


def buckets(numel: int, params: list[torch.nn.Parameter] | None, flat: torch.Tensor | None,
            bucket_bytes: int) -> tuple[list[tuple[int, int]], list[int]]:
    """(lo, hi) of each bucket in launch order, and each parameter's bucket: backward's order
    (``comm.grad_buckets``) with ``params``, else chunks of ``bucket_bytes`` in order."""
    if params is not None:
        return grad_buckets(params, flat.element_size(), bucket_bytes)
    per = max(1, bucket_bytes // 4)
    return [(lo, min(lo + per, numel)) for lo in range(0, numel, per)], []


def connect_hierarchical(hierarchy: Hierarchy, rank: int, backend: str, numel: int,
                         params: list[torch.nn.Parameter] | None = None, flat: torch.Tensor | None = None,
                         bucket_bytes: int = BUCKET_BYTES) -> HierarchicalAllreduce:
    """Build this rank's part, inside an initialised default process group: every rank calls it
    (group creation and the barriers are collective)."""
    leaders, peers = hierarchy.leaders, hierarchy.peers(rank)
    across = dist.new_group(leaders, backend=backend) if len(leaders) > 1 else None
    across = across if rank in leaders else None
    node = None
    if hierarchy.segments is None:
        for ranks in hierarchy.groups():
            if len(ranks) > 1:
                group = dist.new_group(ranks, backend=backend)
                if rank in ranks:
                    node = GroupNode(group, ranks[0])
    else:
        # The leader creates its node's segment before the first barrier, its peers attach after
        # it; after the second every peer holds a mapping and the name goes (SharedMemoryAllreduce).
        index, name = peers.index(rank), hierarchy.segment(rank)
        count = len(buckets(numel, params, flat, bucket_bytes)[0])
        if name is not None and index == 0:
            node = ShmNode(name, 0, len(peers), numel, count, create=True)
        dist.barrier()
        if name is not None and index > 0:
            node = ShmNode(name, index, len(peers), numel, count, create=False)
        dist.barrier()
        if name is not None and index == 0:
            node.unlink()
    return HierarchicalAllreduce(hierarchy, rank, numel, across, node, params, flat, bucket_bytes)
