"""A Downpour replica: its own loop over its data shard, talking to the parameter shards directly
(no global barrier, no driver round trip per step). Every n_fetch steps it pulls the current
parameters from every shard; every n_push steps it pushes the mean gradient since its last push,
one flat float32 slice per shard. It never applies an update itself: the shards own the model.

It talks to each shard through a channel: a ``ShmChannel`` to a shard on its own node (the
payload moves through the replica's shared-memory mailbox, a socket carries 16-byte requests and
8-byte replies) or a ``RayChannel`` (actor calls and the object store: any placement).
``async.transport`` chooses: auto and shm take shared memory wherever the shard shares the node
(shm makes the driver refuse a placement where one does not), ray always takes actor calls.

On a GPU the parameters and the accumulated gradient live on the device; each exchange moves one
flat buffer across (``device.Staging``: pinned host memory, the parameters uploaded asynchronously).
On the CPU the staging buffers are the tensors themselves: nothing is copied."""
from __future__ import annotations

import mmap
import os
import socket

import numpy as np
import torch

from ray_train.cluster import ReplicaContext
from ray_train.config import TrainConfig
from ray_train.data.dataset import Dataset
from ray_train.strategies.downpour.parameter_server import (
    HELLO,
    HELLO_MSG,
    PULL,
    PUSH,
    PUSH_PULL,
    REFUSED,
    REPLY,
    REQUEST,
    mailbox_views,
)
from ray_train.worker.batches import shard_batches, steps_per_epoch
from ray_train.worker.device import Staging, clock
from ray_train.worker.replica import Replica, straggle

SHARD_RETRIES = 20  # failed calls to one shard in a row before the replica gives up


class ShardLost(RuntimeError):
    """A shard stayed unreachable through every retry (its restarts are used up)."""


class ShardGone(Exception):
    """One request to a shard failed: it died (Ray may be restarting it)."""


class RayChannel:
    """Actor calls. A push_pull's or pull's parameters stay in the object store until ``read``."""

    kind = "ray"

    def __init__(self, shard) -> None:
        self.shard, self.ref, self.pulling, self.values = shard, None, False, None

    @property
    def busy(self) -> bool:
        return self.ref is not None

    def push(self, grad: np.ndarray, version: int, rank: int, pull: bool) -> None:
        # Ray serialises the arguments at submission, so the caller may reuse ``grad`` at once.
        self.ref = getattr(self.shard, "push_pull" if pull else "push").remote(grad, version, rank)
        self.pulling = pull

    def pull(self) -> None:
        # A pull is idempotent: Ray resubmits it until a restarting shard is back.
        self.ref, self.pulling = self.shard.pull_ref.options(max_task_retries=-1).remote(), True

    def wait(self) -> int:
        import ray

        ref, self.ref = self.ref, None
        try:
            reply = ray.get(ref)
        except ray.exceptions.RayError as exc:
            raise ShardGone from exc
        if not self.pulling:
            return reply
        version, (self.values,) = reply
        return version

    def read(self, out: np.ndarray) -> None:
        import ray

        ref, self.values = self.values, None
        try:
            np.copyto(out, ray.get(ref))
        except ray.exceptions.RayError as exc:  # the shard died, and its object with it, since the pull
            raise ShardGone from exc

    def close(self) -> None:
        pass


class Mailbox:
    """This replica's shared memory: an outbox (the mean gradient it pushes) and an inbox (the
    parameters shards copy in for it), each as long as the model, in an anonymous memfd: no name
    in /dev/shm, freed with the last process that maps it. Every ShmChannel hands the descriptor
    to its shard, which maps it and uses its own slice."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.fd = os.memfd_create("ray_train-mailbox", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, 8 * n)
        self.map = mmap.mmap(self.fd, 8 * n)


class ShmChannel:
    """The replica's end of a ShardServer on its node (parameter_server.py beside this file). After a
    request the replica leaves its mailbox slice alone until the reply: the shard reads the
    gradient from it and writes the parameters into it meanwhile."""

    kind = "shm"

    def __init__(self, address: str, mailbox: Mailbox, rank: int, lo: int, hi: int) -> None:
        self.outbox, self.inbox = mailbox_views(mailbox.map, mailbox.n, lo, hi)
        self.busy = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.sock.connect(address)
            socket.send_fds(self.sock, [HELLO_MSG.pack(HELLO, rank, lo, hi, mailbox.n)], [mailbox.fd])
            self.busy = True
            version = self.wait()
        except (OSError, ShardGone) as exc:
            self.sock.close()
            raise ShardGone(f"cannot reach the shard at {address[1:]!r}") from exc
        if version == REFUSED:
            self.sock.close()
            raise RuntimeError(f"the shard at {address[1:]!r} refused slice [{lo}, {hi}) of {mailbox.n}")

    def push(self, grad: np.ndarray, version: int, rank: int, pull: bool) -> None:
        np.copyto(self.outbox, grad)
        self._send(PUSH_PULL if pull else PUSH, version)

    def pull(self) -> None:
        self._send(PULL, 0)

    def _send(self, kind: int, version: int) -> None:
        try:
            self.sock.send(REQUEST.pack(kind, version))
        except OSError as exc:
            raise ShardGone from exc
        self.busy = True

    def wait(self) -> int:
        self.busy = False
        try:
            data = self.sock.recv(REPLY.size)
        except OSError as exc:
            raise ShardGone from exc
        if len(data) != REPLY.size:  # end of file: the shard's process is gone
            raise ShardGone("the shard closed the connection")
        return REPLY.unpack(data)[0]

    def read(self, out: np.ndarray) -> None:
        np.copyto(out, self.inbox)

    def close(self) -> None:
        self.sock.close()


class ShardClient:
    """Fetching parameters from, and pushing gradients to, the shards that hold ``self.flat``'s
    slices: what a Downpour replica, or one stage of a pipelined replica (stages.py beside this
    file), does with the parameter server. The class using it sets ``ctx`` (with ``rank``), ``cfg``,
    ``flat`` (the parameters' flat buffer) and ``grad`` before ``init_client``."""

    def init_client(self) -> None:
        self.n_fetch, self.n_push = self.cfg.async_.n_fetch, self.cfg.async_.n_push
        self.transport = self.cfg.async_.transport
        self.acc = torch.zeros_like(self.grad)
        self.params_host, self.acc_host = Staging(self.flat), Staging(self.acc)  # what the shards exchange
        self.mailbox = None if self.transport == "ray" or not self.flat.numel() else Mailbox(self.flat.numel())
        self.since_fetch = self.since_push = 0
        self.channels: list = []
        self.pending: list[tuple[int, bool]] = []  # (shard, whether it returns parameters) not yet acknowledged
        self.prefetched: dict[int, int] = {}  # shard -> version a push_pull returned, for the next fetch
        self.shard_errors: list[int] = []
        self.comm_bytes = 0

    def attach(self, shards: list, bounds: list[tuple[int, int]], gate=None) -> list[str]:
        """(Re)connect to ``shards``, shard k holding ``flat[bounds[k]]``; each shard's transport."""
        import ray

        self.shards, self.bounds, self.gate = shards, bounds, gate
        self.versions = np.zeros(len(shards), dtype=np.int64)  # as last fetched, per shard
        self.seen = np.zeros(len(shards), dtype=np.int64)  # highest version acknowledged, per shard
        self.node_id = ray.get_runtime_context().get_node_id()
        for channel in self.channels:
            if channel is not None:
                channel.close()
        self.channels = [None] * len(shards)
        self.pending, self.prefetched, self.since_fetch = [], {}, 0
        self.to_offer: set[int] = set()  # shards lost since this replica last reached them
        kinds = []
        for k in range(len(shards)):
            try:
                kinds.append(self._channel(k).kind)
            except ShardGone:  # down at the moment: the first request opens it
                kinds.append(None)
        return kinds

    # -- talking to the shards ---------------------------------------------------------------------
    def fetch(self) -> None:
        # The parameters a push_pull just returned, else a pull; ask every shard first, then
        # read: the shards answer in parallel.
        self.settle()
        for k in range(len(self.shards)):
            if k not in self.prefetched:
                self._ask(k)
        flat = self.params_host.writable()
        for k, (lo, hi) in enumerate(self.bounds):
            version = self._read(k, flat[lo:hi])
            self.comm_bytes += 4 * (hi - lo)
            self.versions[k] = version
            self.seen[k] = max(self.seen[k], version)
        self.params_host.upload(self.flat)

    def push(self) -> None:
        import ray

        self.acc.div_(self.since_push)
        if self.gate is not None:
            ray.get(self.gate.admit.remote(self.ctx.rank))  # waits on the gate's condition
        self.settle()
        mean = self.acc_host.download(self.acc)
        # The next step starts with a fetch: have the push return the parameters it produced
        # (one request per shard, not a push and then a pull). With one replica these are exactly
        # what a pull would return: a caller's requests are served in order by a shard.
        pull = self.since_fetch == 0
        for k, (lo, hi) in enumerate(self.bounds):
            try:
                self._channel(k).push(mean[lo:hi], int(self.versions[k]), self.ctx.rank, pull)
                self.pending.append((k, pull))
            except ShardGone:
                self._lost(k)
        self.comm_bytes += mean.nbytes
        self.acc.zero_()
        self.since_push = 0

    def settle(self) -> None:
        """Wait for the last pushes; a push lost with a dead shard is dropped (Downpour tolerates
        a lost gradient) and the shard is re-fetched once it is back."""
        pending, self.pending = self.pending, []
        for k, pull in pending:
            try:
                version = self.channels[k].wait()
            except ShardGone:
                self._lost(k)
                continue
            if pull:
                self.prefetched[k] = version
            self.seen[k] = max(self.seen[k], version)

    def _channel(self, k: int):
        """Shard ``k``'s channel, (re)opened if it was lost: shared memory when the shard runs on
        this node (and the transport allows), else actor calls."""
        if self.channels[k] is None:
            if self.transport == "ray":
                self.channels[k] = RayChannel(self.shards[k])
            else:
                import ray

                try:  # waits while Ray restarts the shard; fails once its restarts are used up
                    where = ray.get(self.shards[k].endpoint.options(max_task_retries=-1).remote())
                except ray.exceptions.RayError as exc:
                    raise ShardGone from exc
                if where["node_id"] != self.node_id:
                    self.channels[k] = RayChannel(self.shards[k])
                else:
                    lo, hi = self.bounds[k]
                    self.channels[k] = ShmChannel(where["address"], self.mailbox, self.ctx.rank, lo, hi)
            if k in self.to_offer:
                self._offer(k)
        return self.channels[k]

    def _offer(self, k: int) -> None:
        """Give shard ``k``, back after a restart, this replica's copy of its slice (as last
        fetched) and the newest version this replica saw acknowledged: the shard keeps the
        freshest copy its replicas hold when it is newer than its snapshot, so a restart loses
        only the updates in flight (strategies/downpour/README.md, node loss)."""
        import ray

        self.to_offer.discard(k)
        if self.versions[k] <= 0:
            return
        lo, hi = self.bounds[k]
        try:
            ray.get(self.shards[k].offer.options(max_task_retries=-1).remote(
                int(self.versions[k]), self.flat[lo:hi].detach().cpu().numpy(), int(self.seen[k])))
        except ray.exceptions.RayError as exc:
            raise ShardGone from exc

    def _ask(self, k: int) -> None:
        try:
            self._channel(k).pull()
        except ShardGone:
            self._lost(k)

    def _read(self, k: int, out: np.ndarray) -> int:
        for _ in range(SHARD_RETRIES):
            try:
                if k in self.prefetched:
                    version = self.prefetched.pop(k)
                else:
                    if self.channels[k] is None or not self.channels[k].busy:  # its pull was never sent
                        self._channel(k).pull()
                    version = self.channels[k].wait()
                self.channels[k].read(out)
                return version
            except ShardGone:
                self.versions[k] = -1  # ``out`` may be half written: no copy of this slice to offer
                self._lost(k)
        raise ShardLost(f"parameter shard {k} unreachable after {SHARD_RETRIES} attempts")

    def _lost(self, k: int) -> None:
        """Shard ``k`` failed a request: forget the channel (the next request reopens it) and
        fetch before the next step (a restored shard's parameters differ)."""
        self.shard_errors.append(k)
        self.to_offer.add(k)
        self.since_fetch = 0
        self.prefetched.pop(k, None)
        if self.channels[k] is not None:
            self.channels[k].close()
            self.channels[k] = None


class AsyncReplica(ShardClient, Replica):
    """Built from small arguments only; the data and the shards arrive with ``setup``, which the
    driver calls again after Ray restarts the actor (restarts must not depend on object refs)."""

    def __init__(self, ctx: ReplicaContext, cfg: TrainConfig, model) -> None:
        super().__init__(ctx, cfg, None, model)
        # One flat buffer the parameters are views of: a fetch is one copy per shard.
        self.flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        offset = 0
        for p in self.params:
            p.data = self.flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.init_client()
        self.local_epoch = -1

    def setup(self, data: Dataset, shards: list, bounds: list[tuple[int, int]], gate=None) -> list[str]:
        """Returns each shard's transport ("shm" or "ray")."""
        self.data = data
        self.spe = steps_per_epoch(len(data.y_train), self.ctx.world_size, self.cfg.run.batch_size)
        self.stream, self.stream_at = None, None  # streamed data: this rank's stream and its next (epoch, step)
        return self.attach(shards, bounds, gate)

    def info(self) -> dict:
        return {**super().info(), "rank": self.ctx.rank,
                "transports": [c.kind if c is not None else None for c in self.channels]}

    # -- the loop ------------------------------------------------------------------------------
    def run(self, start: int, n: int) -> dict:
        """Steps ``start .. start+n-1`` of this rank's own sequence of batches. The driver passes
        ``start``, so a restarted replica resumes its data order where the lost one stopped."""
        loss_sum = torch.zeros((), device=self.device)  # summed where the losses are; to the host once
        correct = torch.zeros((), dtype=torch.float64, device=self.device)  # a count, or summed |error|
        step_ms = np.empty(n, dtype=np.float32)
        pushes = 0
        for i, s in enumerate(range(start, start + n)):
            t0 = clock(self.device)
            epoch, pos = divmod(s, self.spe)
            if getattr(self.data, "streamed", False):
                batch = self._streamed_batch(epoch, pos)
            else:
                if epoch != self.local_epoch:
                    self.batches = shard_batches(len(self.data.y_train), self.ctx.world_size, self.ctx.rank,
                                                 self.cfg.run.batch_size, self.cfg.run.seed, epoch)
                    self.local_epoch = epoch
                batch = self.batch(self.batches[pos])
            if self.since_fetch == 0:
                self.fetch()
            loss, hits = self.gradients(*batch)
            loss_sum += loss
            correct += hits
            if self.precision.unscale_(self.grad):  # false only for an fp16 overflow: that step adds nothing
                self.acc += self.grad
            self.since_fetch = (self.since_fetch + 1) % self.n_fetch
            self.since_push += 1
            if self.since_push == self.n_push:
                self.push()
                pushes += 1
            step_ms[i] = straggle(self.slow, t0, self.device)
        # Acknowledged pushes only: when the driver sees this chunk, its updates are on the shards.
        self.settle()
        errors, self.shard_errors = self.shard_errors, []
        moved, self.comm_bytes = self.comm_bytes, 0
        return {"loss_sum": float(loss_sum) * self.cfg.run.batch_size, "correct": float(correct),
                "samples": n * self.cfg.run.batch_size, "step_ms": step_ms, "rank": self.ctx.rank,
                "pushes": pushes, "versions": self.seen.copy(), "shard_errors": errors, "pid": os.getpid(),
                "comm_bytes": moved, **({"wait_ms": self.stream.take_wait_ms()} if self.stream is not None else {})}

    def _streamed_batch(self, epoch: int, pos: int):
        """Batch ``pos`` of this rank's share of ``epoch``'s stream (docs/data.md, async). The
        rank reads the epoch's plan on its own and keeps every replicas-th batch; a step out of
        sequence (a restarted replica, a resumed run) reads the epoch again up to it."""
        from ray_train.worker.stream import TrainStream

        if self.stream is None or self.stream_at != (epoch, pos):
            run, ctx = self.cfg.run, self.ctx
            self.stream = TrainStream(self.data, self.data.epoch_plan(run.seed, epoch), run.batch_size, run.seed,
                                      epoch, ctx.rank, self.device, stride=(ctx.rank, ctx.world_size))
            self.stream.skip(pos)
        self.stream_at = (epoch, pos + 1)
        return self.stream.next()

