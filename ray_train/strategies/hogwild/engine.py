"""Hogwild! (Niu et al., 2011): replicas on one node update one shared-memory parameter vector
without locks. Each step a replica computes the gradient of its own batch (its shard of the epoch,
as sync) against whatever the shared vector holds at that moment, and its optimizer, with its own
momentum buffer, writes the update straight into the shared vector. No averaging, no barrier, no
lock: a replica may read parameters another is halfway through updating, which the paper shows
costs little when updates are sparse or small (for dense nets SOURCES.md is warier).

Wiring, by the driver in three rounds (there is no process group to hold a barrier): rank 0
creates a shared-memory segment holding the flat parameter vector, filled from its seeded model;
the others attach; rank 0 then removes the segment's name at once. Every replica's ``p.data`` is a
view into its mapping, so nothing, not even a SIGKILL'd driver, can leave the segment behind in
/dev/shm (as comm.SharedMemoryAllreduce). The replicas must share one node: a group that Ray
spread over several is shut down and the run ends with a one-line error.

Communication accounting: each step a replica writes its update into the vector every other
replica reads, S bytes per step per replica (S: the parameter vector's bytes); a replica alone
counts 0 (and is plain single-process SGD: the sync engine's numbers exactly).

Checkpoints hold the shared parameters, every replica's optimizer state (its own momentum) and
RNG. A resumed run trains on from them, but cannot repeat the uninterrupted run exactly: the
interleaving of the lock-free updates is the operating system's. Evaluation and checkpoints come
between epochs, when no replica is running, so they see one consistent vector.
"""
from __future__ import annotations

from multiprocessing import resource_tracker, shared_memory

import numpy as np
import torch

from ray_train.engine import StateMismatch
from ray_train.errors import ConfigError
from ray_train.strategies.sync.engine import SyncEngine
from ray_train.worker.comm import SharedMemoryAllreduce
from ray_train.worker.device import to_host
from ray_train.worker.group import ReplicaGroup
from ray_train.worker.replica import Replica


def check_one_node(node_ids: list[str]) -> None:
    """The replicas (one node id each, in rank order) must share one node's memory."""
    nodes = len(set(node_ids))
    if nodes > 1:
        raise ConfigError(f"run.strategy: hogwild's {len(node_ids)} replicas were placed on {nodes} nodes, but they "
                          "share one parameter vector in one node's memory; use fewer replicas (resources.replicas, "
                          "resources.cpus_per_replica) so that they fit on one node, or --strategy async")


class HogwildReplica(Replica):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shm, self.shared, self.step_bytes = None, None, 0

    def share(self, name: str, create: bool) -> None:
        """Move the parameters into shared-memory segment ``name``: rank 0 creates it holding its
        values, the others attach and take the values found there."""
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        if create:
            self.shm = shared_memory.SharedMemory(name=name, create=True, size=flat.numel() * flat.element_size())
        else:
            self.shm = shared_memory.SharedMemory(name=name)
            # Python < 3.13 registers attached segments with the resource tracker too, which
            # would unlink the creator's segment when this process exits.
            resource_tracker.unregister(self.shm._name, "shared_memory")
        self.shared = torch.from_numpy(np.ndarray(flat.shape, dtype=flat.numpy().dtype, buffer=self.shm.buf))
        if create:
            self.shared.copy_(flat)
        for p, view in zip(self.params, self.shared.split([p.numel() for p in self.params])):
            p.data = view.view_as(p)
        self.step_bytes = flat.numel() * flat.element_size()

    def unlink(self) -> None:
        """Remove the segment's name once every replica has attached (the mappings stay valid)."""
        self.shm.unlink()

    def step(self, idx):
        loss, hits = super().step(idx)  # the optimizer writes into the shared vector: no lock
        self.comm_bytes += self.step_bytes
        return loss, hits

    def optimizer_state(self) -> dict:
        return to_host(self.opt.state_dict())

    def restore(self, model: dict, optimizer: dict | None, rng: dict | None) -> None:
        """A checkpoint's parameters (copied in place, so into the shared vector), this rank's
        optimizer state (None: a rank the checkpoint did not have starts afresh) and RNG."""
        self.load_state({"model": model, "optimizer": self.opt.state_dict() if optimizer is None else optimizer}, rng)

    def close(self) -> None:
        if self.shm is not None:
            for p in self.params:  # the model outlives the mapping
                p.data = p.data.clone()
            self.shared = None
            try:
                self.shm.close()
            except BufferError:  # a view still held somewhere: the mapping goes with the process
                pass
            self.shm = None
        super().close()


class HogwildGroup(ReplicaGroup):
    @classmethod
    def wire(cls, cfg, actors, info) -> tuple[str, str | None]:
        import ray

        check_one_node([i["node_id"] for i in info])
        if len(actors) == 1:
            return "none", None
        name = SharedMemoryAllreduce.new_name()
        ray.get(actors[0].share.remote(name, True))
        ray.get([a.share.remote(name, False) for a in actors[1:]])
        ray.get(actors[0].unlink.remote())
        return "shared parameters", name

    def state(self) -> dict:
        """The shared parameters, and every rank's optimizer state (its own momentum) and RNG."""
        n = len(self.actors)
        first, *rest = self.get([self.actors[0].state.remote()] + [a.optimizer_state.remote() for a in self.actors[1:]]
                                + [a.rng_state.remote() for a in self.actors])
        return {"model": first["model"], "optimizer": [first["optimizer"], *rest[: n - 1]], "rng": rest[n - 1 :]}

    def load_state(self, state: dict) -> None:
        """Rank r gets ``state["optimizer"][r]`` and ``state["rng"][r]`` where the checkpoint has
        them (a run resumed with more replicas starts the new ranks' momentum afresh)."""
        import ray

        model = ray.put(state["model"])
        opts, rngs = list(state["optimizer"]), list(state.get("rng") or [])
        self.get([a.restore.remote(model, opts[r] if r < len(opts) else None, rngs[r] if r < len(rngs) else None)
                  for r, a in enumerate(self.actors)])


class HogwildEngine(SyncEngine):
    replica_cls = HogwildReplica

    def start(self, state: dict | None) -> None:
        from ray.exceptions import RayTaskError

        ctx = self.ctx
        if ctx.cfg.resources.gpus_per_replica:
            raise ConfigError("resources.gpus_per_replica: hogwild's replicas share one parameter vector in host "
                              "memory and run on CPUs; set it to 0, or use --strategy sync on GPUs")
        self.group = HogwildGroup.create(ctx.cfg, ctx.data_ref, ctx.model, self.replica_cls)
        if state is not None:
            try:
                self.group.load_state(state)
            except (RayTaskError, TypeError, KeyError) as exc:
                self.group.shutdown()
                raise StateMismatch(" ".join(str(getattr(exc, "cause", None) or exc).split())[:240]) from None
        ctx.sink.say(f"hogwild: {ctx.cfg.resources.replicas} replica(s) on one node updating one shared parameter "
                     "vector without locks")

    def extras(self) -> dict:
        return {"devices": [i["device"] for i in self.group.info], "nodes": self.group.nodes()}
