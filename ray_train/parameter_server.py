"""The parameter server of Downpour SGD: the flat parameter vector cut into near-equal slices,
each held by a ParameterShard with its own server-side optimizer and version counter, plus the
StalenessGate that makes a replica wait (on an asyncio condition) when it runs too far ahead.

Both are plain classes (``ray_train.cluster.actor_class`` makes them Ray actors), so
tests/test_parameter_server.py drives a shard without Ray.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import time

import numpy as np
import torch

from ray_train.checkpoint import load_checked
from ray_train.cluster import tune_malloc
from ray_train.files import save_atomic
from ray_train.config import OptimConfig
from ray_train.optim import build_optimizer, inverse_lr, set_lr


def split_bounds(n: int, k: int) -> list[tuple[int, int]]:
    """K near-equal contiguous slices of range(n): sizes differ by at most one."""
    assert 1 <= k <= n, (n, k)
    return [(n * i // k, n * (i + 1) // k) for i in range(k)]


def decay_ranges(model: torch.nn.Module, lo: int, hi: int) -> list[tuple[int, int]]:
    """Where the weights (dim > 1) lie inside the slice [lo, hi), relative to lo: weight decay
    applies to weights only, never biases, as in the sync strategy's parameter groups."""
    out, offset = [], 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        a, b = max(offset, lo), min(offset + p.numel(), hi)
        if p.dim() > 1 and a < b:
            out.append((a - lo, b - lo))
        offset += p.numel()
    return out


class ParameterShard:
    """One slice of the master parameters. The optimizer is torch.optim's own, built by
    ``build_optimizer`` over a single flat Parameter, so momentum, AdaGrad and Adam on a shard
    are exactly what they are on a replica (tested); weight decay is added by hand through a
    mask because a flat slice mixes weights and biases.

    ``init`` is the slice's initial values, or only its length: an actor gets its values by a
    method call (``assign`` or ``load``), so that a restart by Ray does not depend on them (it
    restores the shard's own snapshot instead)."""

    def __init__(self, index: int, init, optim: OptimConfig, decay: list[tuple[int, int]] | None = None,
                 staleness_lr: bool = False, snapshot_path: str | None = None,
                 snapshot_every_s: float = 10.0) -> None:
        tune_malloc()
        torch.set_num_threads(1)  # a shard is reserved a fraction of a CPU
        self.index, self.staleness_lr = index, staleness_lr
        self.weight_decay = optim.weight_decay
        values = np.zeros(init, dtype=np.float32) if isinstance(init, int) else init
        flat = torch.as_tensor(np.array(values, dtype=np.float32, copy=True)).reshape(-1)
        self.param = torch.nn.Parameter(flat)
        self.param.grad = torch.zeros_like(flat)
        self.opt = build_optimizer([("slice", self.param)], dataclasses.replace(optim, weight_decay=0.0))
        self.lr = optim.lr
        self.optim = optim  # the inverse schedule's rate is computed per update (per version)
        self.mask = None
        if self.weight_decay > 0 and decay:
            self.mask = torch.zeros_like(flat)
            for a, b in decay:
                self.mask[a:b] = 1.0
        self.version = 0
        self.stale_count = self.stale_sum = self.stale_max = 0
        self.recent: list[int] = []  # staleness since the last stats() call (driver's histogram)
        self.snapshot_path, self.snapshot_every_s = snapshot_path, snapshot_every_s
        self.restored_version: int | None = None
        self._ref = self._ref_version = None
        self.last_snapshot = -float("inf")
        if snapshot_path and os.path.exists(snapshot_path):
            # Only a restart after a crash finds its own snapshot: the driver removes stale ones.
            self.load(load_checked(snapshot_path))
            self.restored_version = self.version

    def assign(self, values: np.ndarray) -> int:
        """Start from ``values`` at version 0 (the run's initial parameters); returns the length."""
        with torch.no_grad():
            self.param.copy_(torch.from_numpy(np.array(values, dtype=np.float32)).reshape(-1))
        if self.snapshot_path:
            self.snapshot()
        return self.param.numel()

    # -- the two verbs replicas use --------------------------------------------------------------
    def push(self, grad: np.ndarray, fetched_version: int, rank: int = -1) -> int:
        """Apply one replica's mean gradient; returns the new version."""
        staleness = max(0, self.version - int(fetched_version))
        np.copyto(self.param.grad.numpy(), grad, casting="no")
        if self.mask is not None:
            self.param.grad.add_(self.param.detach() * self.mask, alpha=self.weight_decay)
        lr = inverse_lr(self.optim, self.version + 1) if self.optim.schedule == "inverse" else self.lr
        set_lr(self.opt, lr / staleness if self.staleness_lr and staleness > 1 else lr)
        self.opt.step()
        self.version += 1
        self.stale_count += 1
        self.stale_sum += staleness
        self.stale_max = max(self.stale_max, staleness)
        self.recent.append(staleness)
        if self.snapshot_path and time.monotonic() - self.last_snapshot >= self.snapshot_every_s:
            self.snapshot()
        return self.version

    def push_pull(self, grad: np.ndarray, fetched_version: int, rank: int = -1) -> tuple[int, list]:
        """``push``, then ``pull_ref`` of the parameters it produced: one call instead of two when
        a replica's next step starts with a fetch (with n_fetch = n_push = 1, every step)."""
        self.push(grad, fetched_version, rank)
        return self.pull_ref()

    def pull(self) -> tuple[int, np.ndarray]:
        return self.version, self.param.detach().numpy().copy()

    def pull_ref(self) -> tuple[int, list]:
        """(version, [object ref]): one object-store copy per version, read by every replica that
        fetches this version (the ref is wrapped in a list so Ray passes it, not its value)."""
        import ray

        if self._ref_version != self.version:
            # ray.put copies into the object store at once: no copy of our own first
            self._ref, self._ref_version = ray.put(self.param.detach().numpy()), self.version
        return self.version, [self._ref]

    # -- driver side ------------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        self.lr = lr
        set_lr(self.opt, lr)

    def stats(self) -> dict:
        """Totals plus the staleness values recorded since the previous call."""
        recent, self.recent = np.asarray(self.recent, dtype=np.int32), []
        return {"index": self.index, "version": self.version, "count": self.stale_count,
                "sum": self.stale_sum, "max": self.stale_max, "recent": recent}

    def info(self) -> dict:
        return {"index": self.index, "pid": os.getpid(), "version": self.version,
                "restored_version": self.restored_version}

    def state(self) -> dict:
        """Parameters, optimizer state and version: tensors and numbers only (weights_only load)."""
        return {"index": self.index, "params": self.param.detach().clone(), "optimizer": self.opt.state_dict(),
                "version": self.version, "lr": self.lr,
                "staleness": [self.stale_count, self.stale_sum, self.stale_max]}

    def load(self, state: dict) -> None:
        """Continue from what ``state`` returned (a checkpoint or this shard's snapshot)."""
        with torch.no_grad():
            self.param.copy_(state["params"])
        self.opt.load_state_dict(state["optimizer"])
        self.set_lr(float(state["lr"]))
        self.version = int(state["version"])
        self.stale_count, self.stale_sum, self.stale_max = (int(v) for v in state["staleness"])
        if self.snapshot_path:
            self.snapshot()

    def snapshot(self) -> str:
        """Atomic (temporary file + rename), so a crash mid-write leaves the previous snapshot."""
        self.last_snapshot = time.monotonic()
        return save_atomic(self.snapshot_path, self.state())


class StalenessGate:
    """Bounded staleness (``--max-staleness S``): before its push, a replica more than S pushes
    ahead of the slowest live replica waits on an asyncio condition that every push notifies.
    The slowest replica is always admitted, so the gate cannot deadlock; a dead replica leaves
    the gate (else it would hold everyone back) and rejoins level with the slowest."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.clocks: dict[int, int] = {}  # pushes admitted per live replica
        self.leads: list[int] = []
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:  # created inside the actor's event loop
            self._cond = asyncio.Condition()
        return self._cond

    async def join(self, rank: int) -> int:
        async with self._condition():
            others = [c for r, c in self.clocks.items() if r != rank]
            self.clocks[rank] = min(others) if others else self.clocks.get(rank, 0)
            self._cond.notify_all()
            return self.clocks[rank]

    async def leave(self, rank: int) -> None:
        async with self._condition():
            self.clocks.pop(rank, None)
            self._cond.notify_all()

    async def admit(self, rank: int) -> int:
        """Returns how many pushes ahead of the slowest this replica was when admitted."""
        cond = self._condition()
        async with cond:
            if rank not in self.clocks:
                self.clocks[rank] = min(self.clocks.values()) if self.clocks else 0
            await cond.wait_for(lambda: rank not in self.clocks
                                or self.clocks[rank] - min(self.clocks.values()) <= self.bound)
            if rank not in self.clocks:  # left while waiting (declared dead by the driver)
                return -1
            lead = self.clocks[rank] - min(self.clocks.values())
            self.leads.append(lead)
            self.clocks[rank] += 1
            cond.notify_all()
            return lead

    async def stats(self) -> dict:
        return {"lead_max": max(self.leads, default=0), "lead_mean": float(np.mean(self.leads)) if self.leads else 0.0,
                "admitted": len(self.leads)}
