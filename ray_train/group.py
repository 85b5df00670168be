"""A synchronous group of replica actors: created in one placement group, connected by a process
group, driven a chunk of steps at a time. Used by the sync strategy (and by ensemble members
that are themselves sync groups)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ray_train.cluster import ReplicaContext, reserve
from ray_train.config import TrainConfig
from ray_train.replica import PG_TIMEOUT, Replica, replica_actor

# How long the driver waits, after a replica's collective failed, for the peer death behind it.
PEER_DEATH_TIMEOUT_S = PG_TIMEOUT.total_seconds()


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    errors: int
    preds: np.ndarray


def choose_allreduce(cfg: TrainConfig, nodes: set[str]) -> tuple[str, bool]:
    """(torch.distributed backend, use shared memory) for this group's placement."""
    res, kind = cfg.resources, cfg.run.allreduce
    own_gpu = res.gpus_per_replica >= 1
    if kind == "auto":
        if own_gpu:
            kind = "nccl"
        elif res.gpus_per_replica == 0 and len(nodes) == 1 and res.replicas > 1:
            kind = "shm"
        else:
            kind = "gloo"
    # Replicas sharing one GPU cannot use NCCL (one communicator per device): gloo it is.
    backend = "nccl" if kind == "nccl" else "gloo"
    return backend, kind == "shm"


class ReplicaGroup:
    def __init__(self, actors: list, pg, info: list[dict], comm: str, shm_name: str | None = None) -> None:
        self.actors, self.pg, self.info, self.comm = actors, pg, info, comm
        self.shm_name = shm_name  # the shared-memory segment of SharedMemoryAllreduce, if any

    @classmethod
    def create(cls, cfg: TrainConfig, data_ref, replica_cls=Replica, seed: int | None = None) -> "ReplicaGroup":
        import ray

        from ray_train.comm import SharedMemoryAllreduce

        res = cfg.resources
        pg = reserve(res)
        seed = cfg.run.seed if seed is None else seed
        actors = [
            replica_actor(replica_cls, num_cpus=res.cpus_per_replica, num_gpus=res.gpus_per_replica, pg=pg,
                          bundle=rank).remote(
                ReplicaContext(rank, res.replicas, res.cpus_per_replica, res.gpus_per_replica, seed), cfg, data_ref)
            for rank in range(res.replicas)
        ]
        info = ray.get([a.info.remote() for a in actors])
        comm, name = "none", None
        if len(actors) > 1:
            backend, shm = choose_allreduce(cfg, {i["node_id"] for i in info})
            port = ray.get(actors[0].free_port.remote())
            name = SharedMemoryAllreduce.new_name() if shm else None
            comm = ray.get([a.connect.remote(info[0]["address"], port, backend, name) for a in actors])[0]
        return cls(actors, pg, info, comm, name)

    def train_epoch(self, epoch: int, lr: float, chunk: int, on_chunk) -> dict:
        """Queue the whole epoch as chunks of steps (the actors run them back to back, no
        per-step round trip through the driver) and report each chunk as it completes."""
        import ray

        steps = ray.get([a.set_epoch.remote(epoch, lr) for a in self.actors])[0]
        pending = [[a.train_steps.remote(min(chunk, steps - s)) for a in self.actors] for s in range(0, steps, chunk)]
        totals = {"loss_sum": 0.0, "correct": 0, "samples": 0, "steps": steps}
        for refs in pending:
            results = self.get(refs)
            for r in results:
                for k in ("loss_sum", "correct", "samples"):
                    totals[k] += r[k]
            on_chunk(results)
        return totals

    def evaluate(self, y_test: np.ndarray) -> EvalResult:
        parts = sorted(self.get([a.evaluate.remote() for a in self.actors]), key=lambda p: p["start"])
        preds = np.concatenate([p["preds"] for p in parts])
        n = len(y_test)
        errors = int((preds != y_test).sum())
        return EvalResult(sum(p["loss_sum"] for p in parts) / n, 1.0 - errors / n, errors, preds)

    def get(self, refs: list) -> list:
        """ray.get of one call on every replica. When a replica dies, its peers may be stuck in
        the collective (shared memory spins) or fail in it (gloo raises): the death is the error
        that is raised, a RayActorError, so the caller can restart the group."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return ray.get(refs)
        except RayTaskError:
            ray.wait(refs, num_returns=len(refs), timeout=PEER_DEATH_TIMEOUT_S)
            for ref in refs:
                try:
                    ray.get(ref, timeout=0)
                except RayActorError:
                    raise
                except Exception:
                    pass
            raise

    def rank_of(self, exc) -> int | None:
        """The rank of the replica a RayActorError is about, if it is one of this group's."""
        ids = [a._actor_id.hex() for a in self.actors]
        actor_id = getattr(exc, "actor_id", None)
        return ids.index(actor_id) if actor_id in ids else None

    def state(self) -> dict:
        """Model and optimizer (identical on every replica: rank 0's) and every rank's RNG state."""
        import ray

        state, *rngs = ray.get([self.actors[0].state.remote()] + [a.rng_state.remote() for a in self.actors])
        return {**state, "rng": rngs}

    def load_state(self, state: dict) -> None:
        """Push a checkpoint into every replica; rank r gets ``state["rng"][r]`` when there is one
        (a run resumed with more replicas keeps the new ranks' seeded RNG)."""
        import ray

        shared = ray.put({"model": state["model"], "optimizer": state["optimizer"]})
        rngs = list(state.get("rng") or [])
        self.get([a.load_state.remote(shared, rngs[r] if r < len(rngs) else None)
                  for r, a in enumerate(self.actors)])

    def shutdown(self, graceful: bool = True) -> None:
        """Close the process group and kill the actors. After a replica died, ``graceful=False``
        skips the close: the survivors may be stuck in a collective and never get to it."""
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            if graceful:
                ray.get([a.close.remote() for a in self.actors], timeout=30)
        except Exception:  # a dead replica must not stop the teardown of the others
            pass
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)
        if self.shm_name is not None:
            _unlink_segment(self.shm_name)  # rank 0 unlinks it on close, but not when it was killed


def _unlink_segment(name: str) -> None:
    from multiprocessing import shared_memory

    try:
        segment = shared_memory.SharedMemory(name=name)
    except FileNotFoundError:
        return
    segment.close()
    segment.unlink()
