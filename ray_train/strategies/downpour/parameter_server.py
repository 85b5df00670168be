"""The parameter server of Downpour SGD: the flat parameter vector cut into near-equal slices,
each held by a ParameterShard with its own server-side optimizer and version counter, plus the
StalenessGate that makes a replica wait (on an asyncio condition) when it runs too far ahead.

Both are plain classes (``ray_train.cluster.actor_class`` makes them Ray actors), so
tests/test_parameter_server.py drives a shard without Ray.

Replicas reach a shard two ways: Ray actor calls (``push``, ``push_pull``, ``pull_ref``; any
placement), or, from the shard's own node, the ``ShardServer`` below: gradients and parameters
move through shared memory and only a 16-byte request and an 8-byte reply cross a socket.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import mmap
import os
import selectors
import socket
import struct
import sys
import threading
import time
import traceback
import uuid

import numpy as np
import torch

from ray_train.cluster import tune_malloc
from ray_train.config import OptimConfig
from ray_train.errors import StorageError
from ray_train.run import storage
from ray_train.run.checkpoint import load_checked
from ray_train.run.files import save_atomic
from ray_train.worker.optim import build_optimizer, inverse_lr, set_lr


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


def _locked(method):
    """Shard state is shared by the actor's method calls and its ShardServer thread."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)
    return wrapper


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
        self.lock = threading.RLock()
        self.server: ShardServer | None = None
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
        self.adopted_version: int | None = None  # a replica's copy taken after a restart
        self.seen_before: int = 0  # the newest version replicas saw acknowledged before the restart
        self._ref = self._ref_version = None
        self.last_snapshot = -float("inf")
        if snapshot_path and self._stored():
            # Only a restart after a crash finds its own snapshot: the driver removes stale ones.
            self.load(load_checked(snapshot_path))
            self.restored_version = self.version

    @_locked
    def assign(self, values: np.ndarray) -> int:
        """Start from ``values`` at version 0 (the run's initial parameters); returns the length."""
        with torch.no_grad():
            self.param.copy_(torch.from_numpy(np.array(values, dtype=np.float32)).reshape(-1))
        if self.snapshot_path:
            self.snapshot()
        return self.param.numel()

    @_locked
    def offer(self, version: int, values: np.ndarray, seen: int) -> bool:
        """A replica's copy of this slice at ``version``, offered once it reached this shard again
        after losing it; ``seen`` is the newest version that replica had acknowledged. Only a
        shard restarted after a crash takes one, and only when it is newer than what it holds
        (its snapshot plus the pushes since): a restart then loses the updates in flight, not
        every update since the last snapshot. The optimizer state stays the snapshot's."""
        if self.restored_version is None:
            return False
        self.seen_before = max(self.seen_before, int(seen))
        if version <= self.version:
            return False
        with torch.no_grad():
            self.param.copy_(torch.from_numpy(np.asarray(values, dtype=np.float32)).reshape(-1))
        self.version = self.adopted_version = int(version)
        if self.snapshot_path:
            self.snapshot()
        return True

    # -- the two verbs replicas use --------------------------------------------------------------
    @_locked
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
            try:
                self.snapshot()
            except StorageError as exc:  # the previous snapshot stays; the next interval tries again
                print(f"warning: {exc}; keeping the previous snapshot", file=sys.stderr, flush=True)
        return self.version

    @_locked
    def push_pull(self, grad: np.ndarray, fetched_version: int, rank: int = -1) -> tuple[int, list]:
        """``push``, then ``pull_ref`` of the parameters it produced: one call instead of two when
        a replica's next step starts with a fetch (with n_fetch = n_push = 1, every step)."""
        self.push(grad, fetched_version, rank)
        return self.pull_ref()

    @_locked
    def pull(self) -> tuple[int, np.ndarray]:
        return self.version, self.param.detach().numpy().copy()

    @_locked
    def pull_ref(self) -> tuple[int, list]:
        """(version, [object ref]): one object-store copy per version, read by every replica that
        fetches this version (the ref is wrapped in a list so Ray passes it, not its value)."""
        import ray

        if self._ref_version != self.version:
            # ray.put copies into the object store at once: no copy of our own first
            self._ref, self._ref_version = ray.put(self.param.detach().numpy()), self.version
        return self.version, [self._ref]

    def endpoint(self) -> dict:
        """Where replicas on this node reach the shard through shared memory (the ShardServer is
        started by the first call); ``node_id`` tells a replica whether it is on this node."""
        with self.lock:
            if self.server is None:
                self.server = ShardServer(self)
        return {"address": self.server.address, "node_id": _node_id(), "pid": os.getpid()}

    # -- driver side ------------------------------------------------------------------------------
    @_locked
    def set_lr(self, lr: float) -> None:
        self.lr = lr
        set_lr(self.opt, lr)

    @_locked
    def stats(self) -> dict:
        """Totals plus the staleness values recorded since the previous call."""
        recent, self.recent = np.asarray(self.recent, dtype=np.int32), []
        return {"index": self.index, "version": self.version, "count": self.stale_count,
                "sum": self.stale_sum, "max": self.stale_max, "recent": recent}

    @_locked
    def info(self) -> dict:
        return {"index": self.index, "pid": os.getpid(), "version": self.version,
                "restored_version": self.restored_version, "adopted_version": self.adopted_version,
                "seen_before": self.seen_before, "node_id": _node_id(),
                "shm_peers": len(self.server.peers) if self.server is not None else 0}

    @_locked
    def state(self) -> dict:
        """Parameters, optimizer state and version: tensors and numbers only (weights_only load)."""
        return {"index": self.index, "params": self.param.detach().clone(), "optimizer": self.opt.state_dict(),
                "version": self.version, "lr": self.lr,
                "staleness": [self.stale_count, self.stale_sum, self.stale_max]}

    @_locked
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

    @_locked
    def snapshot(self) -> str:
        """Atomic (temporary file + rename, or one upload to a bucket), so a crash mid-write leaves
        the previous snapshot."""
        self.last_snapshot = time.monotonic()
        try:
            return save_atomic(self.snapshot_path, self.state())
        except OSError as exc:  # a bucket this node has no credentials for, a full disk
            raise self._no_access("write", exc) from None

    def _stored(self) -> bool:
        try:
            return storage.exists(self.snapshot_path)
        except OSError as exc:
            raise self._no_access("read", exc) from None

    def _no_access(self, doing: str, exc: OSError) -> StorageError:
        return StorageError(f"parameter shard {self.index} cannot {doing} its snapshot {self.snapshot_path} "
                            f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}); "
                            "every node needs access to --storage (credentials, and AWS_ENDPOINT_URL for an "
                            "S3-compatible server)")


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


# The same-node transport's messages: a request is (kind, version) as two int64; the reply is the
# shard's version after serving it (int64), or REFUSED. HELLO carries (rank, lo, hi, n) and the
# replica's mailbox as a file descriptor.
PUSH, PULL, PUSH_PULL, HELLO = 1, 2, 3, 4
REQUEST, HELLO_MSG, REPLY = struct.Struct("<qq"), struct.Struct("<qqqqq"), struct.Struct("<q")
REFUSED = -1


def mailbox_views(buf, n: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """A replica's mailbox holds two float32 vectors of the whole model's length n: the outbox
    (its mean gradient, which shards read) and the inbox (the parameters shards write for it).
    Returns the [lo, hi) slice of each."""
    outbox = np.frombuffer(buf, dtype=np.float32, count=n, offset=0)
    inbox = np.frombuffer(buf, dtype=np.float32, count=n, offset=4 * n)
    return outbox[lo:hi], inbox[lo:hi]


class _Peer:
    def __init__(self, conn: socket.socket) -> None:
        self.conn, self.rank = conn, -1
        self.map = self.outbox = self.inbox = None


class ShardServer:
    """The shard's end of the same-node transport, one thread. Each replica owns a mailbox, an
    anonymous shared-memory file (memfd) that it hands over, as a file descriptor, when it
    connects to the shard's socket: a push is the replica's mean gradient in its outbox plus a
    request; the thread applies it with the shard's optimizer, in arrival order, and (for a pull)
    copies the shard's parameters into the replica's inbox before it replies with the version.
    The requester waits for the reply before it touches its mailbox again, so no reader ever sees
    a half-written vector.

    Nothing has a name in /dev/shm, and the socket's name is in the abstract namespace: the kernel
    frees both with the last process holding them, so a SIGKILL leaks nothing. A restarted shard
    (or replica) simply starts a new server (connects again): a replica asks ``endpoint`` anew."""

    def __init__(self, shard: ParameterShard) -> None:
        self.shard = shard
        self.address = f"\0ray_train-ps{shard.index}-{uuid.uuid4().hex[:16]}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(self.address)
        self.listener.listen(64)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.peers: list[_Peer] = []
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name=f"shard-{shard.index}-server", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.closed:
            for key, _ in self.selector.select(timeout=1.0):
                if key.fileobj is self.listener:
                    conn, _ = self.listener.accept()
                    peer = _Peer(conn)
                    self.peers.append(peer)
                    self.selector.register(conn, selectors.EVENT_READ, peer)
                else:
                    try:
                        self._serve(key.data)
                    except (OSError, ValueError, struct.error):
                        self._drop(key.data)  # the replica died (or broke the protocol)
                    except Exception:  # noqa: BLE001 - a bug: say so, and let the replica see a lost shard
                        traceback.print_exc()
                        self._drop(key.data)

    def _serve(self, peer: _Peer) -> None:
        if peer.map is None:
            self._hello(peer)
            return
        data = peer.conn.recv(REQUEST.size)
        if not data:
            raise ConnectionResetError("replica closed the connection")
        kind, fetched = REQUEST.unpack(data)
        shard = self.shard
        with shard.lock:
            if kind & PUSH:
                shard.push(peer.outbox, fetched, peer.rank)
            if kind & PULL:
                np.copyto(peer.inbox, shard.param.detach().numpy())
            version = shard.version
        peer.conn.send(REPLY.pack(version))

    def _hello(self, peer: _Peer) -> None:
        data, fds, _, _ = socket.recv_fds(peer.conn, HELLO_MSG.size, 1)
        try:
            kind, rank, lo, hi, n = HELLO_MSG.unpack(data)
            fits = len(fds) == 1 and hi - lo == self.shard.param.numel() and os.fstat(fds[0]).st_size >= 8 * n
            if kind != HELLO or not fits:
                peer.conn.send(REPLY.pack(REFUSED))
                raise ValueError(f"shard {self.shard.index}: bad hello {(kind, rank, lo, hi, n)}")
            peer.map = mmap.mmap(fds[0], 8 * n)  # mmap keeps its own duplicate of the descriptor
        finally:
            for fd in fds:
                os.close(fd)
        peer.rank = rank
        peer.outbox, peer.inbox = mailbox_views(peer.map, n, lo, hi)
        with self.shard.lock:
            version = self.shard.version
        peer.conn.send(REPLY.pack(version))

    def _drop(self, peer: _Peer) -> None:
        self.selector.unregister(peer.conn)
        peer.conn.close()
        self.peers.remove(peer)
        peer.outbox = peer.inbox = None
        if peer.map is not None:
            try:
                peer.map.close()
            except BufferError:  # a view is still alive somewhere: the mapping goes with it
                pass

    def close(self) -> None:
        """Stop serving (tests; an actor's server ends with its process)."""
        self.closed = True
        self.thread.join()
        for peer in list(self.peers):
            self._drop(peer)
        self.selector.close()
        self.listener.close()


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
