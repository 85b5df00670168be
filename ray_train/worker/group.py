"""A synchronous group of replica actors: created in one placement group, connected by a process
group, driven a chunk of steps at a time. The sync engine drives one (and so does every member of
an ensemble, each a sync engine)."""
from __future__ import annotations

from collections import deque

import numpy as np

from ray_train.cluster import ReplicaContext, actor_class, reserve
from ray_train.config import TrainConfig
from ray_train.run.failure import ReplicaDied
from ray_train.worker.evaluation import EvalResult, combine
from ray_train.worker.replica import PG_TIMEOUT, Replica

# How long the driver waits, after a replica's collective failed, for the peer death behind it.
PEER_DEATH_TIMEOUT_S = PG_TIMEOUT.total_seconds()
QUEUE = 2  # calls queued per replica: the actors never wait for the driver, and a stop is prompt
# One call runs chunks worth up to TASK_S seconds of steps, MAX_BLOCKS chunks at most (a stop waits
# for the QUEUE calls queued: about QUEUE x TASK_S)
TASK_S, MAX_BLOCKS = 0.5, 8


def choose_allreduce(cfg: TrainConfig, nodes: list[str]) -> tuple[str, str]:
    """(torch.distributed backend, how) for this group's placement, ``nodes`` the Ray node id of
    each rank. How: "flat" (one all_reduce among all replicas), "shm" (one node's shared memory)
    or "hier" (worker/hier.py: inside each node, then among one leader per node)."""
    res, kind = cfg.resources, cfg.run.allreduce
    own_gpu = res.gpus_per_replica >= 1
    several = len(set(nodes)) > 1
    crowded = max(nodes.count(n) for n in nodes) > 1 if nodes else False  # a node holds two or more
    if kind == "auto":
        if own_gpu:
            kind = "nccl"  # NCCL's own rings and trees already follow the nodes (docs/cluster.md)
        elif res.gpus_per_replica == 0 and res.replicas > 1 and (not several or crowded):
            kind = "hier" if several else "shm"
        else:
            kind = "gloo"
    elif kind == "shm" and several:
        kind = "hier"  # shared memory where replicas share a node, gloo between the nodes
    # Replicas sharing one GPU cannot use NCCL (one communicator per device): gloo it is.
    backend = "nccl" if kind == "nccl" or (kind == "hier" and own_gpu) else "gloo"
    return backend, kind if kind in ("shm", "hier") else "flat"


class ReplicaGroup:
    blocks = 1  # chunks per call once the first chunk's time is known (train_epoch)

    def __init__(self, actors: list, pg, info: list[dict], comm: str, shm_name: str | None = None,
                 stream=None, seed: int = 0) -> None:
        self.actors, self.pg, self.info, self.comm = actors, pg, info, comm
        self.shm_name = shm_name  # the shared-memory segment of SharedMemoryAllreduce, if any
        self.closed = False
        # streamed data (data/streams.py): the driver cuts each epoch's shards and hands them out
        self.stream, self.seed, self.eval_shards = stream, seed, {}
        self.train_split = None  # (the epoch its next iteration gives, the replicas' DataIterators)
        self.cutter = None  # a stored stream's next epoch is cut in this thread (shards)
        self.next_cut = None  # (that epoch, the future of its shards)

    @classmethod
    def create(cls, cfg: TrainConfig, data_ref, model, replica_cls=Replica) -> "ReplicaGroup":
        """Replicas of ``model`` (a zero-argument factory) seeded with ``cfg.run.seed``."""
        import ray

        res = cfg.resources
        pg = reserve(res)
        actors = [
            actor_class(replica_cls, num_cpus=res.cpus_per_replica, num_gpus=res.gpus_per_replica, pg=pg,
                        bundle=rank).remote(
                ReplicaContext(rank, res.replicas, res.cpus_per_replica, res.gpus_per_replica, cfg.run.seed),
                cfg, data_ref, model)
            for rank in range(res.replicas)
        ]
        try:
            info = ray.get([a.info.remote() for a in actors])
            comm, name = cls.wire(cfg, actors, info)
        except Exception:
            cls(actors, pg, [], "none").shutdown(graceful=False)
            raise
        return cls(actors, pg, info, comm, name, data_ref if getattr(data_ref, "streamed", False) else None,
                   cfg.run.seed)

    def shards(self, epoch: int | None = None, split: str = "train") -> list:
        """One streamed shard per replica (None each for in-memory data): this epoch's training
        shards, or ``split`` cut for evaluation (kept: they can be read again)."""
        if self.stream is None:
            return [None] * len(self.actors)
        hints = [i["node_id"] for i in self.info]
        if epoch is not None:
            if self.stream.stored:  # cut afresh each epoch from the stored blocks, the next while this one trains
                from concurrent.futures import ThreadPoolExecutor

                ahead, n = self.next_cut, len(self.actors)
                shards = (ahead[1].result() if ahead and ahead[0] == epoch
                          else self.stream.train_shards(self.seed, epoch, n, hints))
                self.cutter = self.cutter or ThreadPoolExecutor(1, thread_name_prefix="ray_train-shards")
                self.next_cut = (epoch + 1, self.cutter.submit(self.stream.train_shards, self.seed, epoch + 1, n, hints))
                return shards
            if self.train_split is None or self.train_split[0] != epoch:  # the first epoch, or not the next
                self.train_split = (epoch, self.stream.train_shards(self.seed, epoch, len(self.actors), hints))
            self.train_split = (epoch + 1, self.train_split[1])
            return self.train_split[1]
        if split not in self.eval_shards:
            self.eval_shards[split] = self.stream.eval_shards(split, len(self.actors), hints)
        return self.eval_shards[split]

    @classmethod
    def wire(cls, cfg: TrainConfig, actors: list, info: list[dict]) -> tuple[str, str | None]:
        """Connect the started replicas (a subclass may wire them otherwise; strategies/hogwild/engine.py):
        the averaging's name and the shared-memory segment's name, if any."""
        import ray

        from ray_train.worker.comm import SharedMemoryAllreduce
        from ray_train.worker.hier import Hierarchy

        if len(actors) == 1:
            return "none", None
        nodes = [i["node_id"] for i in info]
        backend, how = choose_allreduce(cfg, nodes)
        port = ray.get(actors[0].free_port.remote())
        name = SharedMemoryAllreduce.new_name() if how == "shm" else None
        # on CPUs, shared memory inside the nodes where stores are ordered (else gloo groups there)
        hier = (Hierarchy.plan(nodes, cfg.resources.gpus_per_replica == 0 and SharedMemoryAllreduce.ORDERED_STORES)
                if how == "hier" else None)
        return ray.get([a.connect.remote(info[0]["address"], port, backend, name, *([hier] if hier else []))
                        for a in actors])[0], name

    def averaging(self) -> str:
        """How the gradients are averaged, for the run's first lines: the averaging's name, and for
        hierarchical averaging where each level runs."""
        if self.comm != "HierarchicalAllreduce":
            return self.comm
        from ray_train.worker.comm import SharedMemoryAllreduce
        from ray_train.worker.hier import Hierarchy

        gpus = any(i["device"].startswith("cuda") for i in self.info)  # whole GPUs (config.check_allreduce)
        hierarchy = Hierarchy.plan([i["node_id"] for i in self.info], not gpus and SharedMemoryAllreduce.ORDERED_STORES)
        return f"{self.comm} ({hierarchy.describe('NCCL' if gpus else 'gloo')})"

    def train_epoch(self, epoch: int, lr: float, start: int, chunk: int, on_chunk, should_stop) -> bool:
        """Run the epoch from step ``start`` as chunks of ``chunk`` steps, QUEUE calls queued on
        every actor (no per-step round trip through the driver), reporting each chunk's results
        as it completes. Once a chunk's time is known, one call runs several chunks (up to
        TASK_S of steps, Replica.train_blocks): each call costs the replica a Ray task's handling
        between its steps. Once ``should_stop()`` is true nothing more is queued and the calls
        already queued finish. True when the epoch is complete."""

        shards = self.shards(epoch)
        # in-memory data: the call as before (subclasses in tests and plug-ins take no shard)
        steps = self.get([a.set_epoch.remote(epoch, lr, start, *([shard] if shard is not None else []))
                          for a, shard in zip(self.actors, shards)])[0]
        blocks_ok = all(hasattr(a, "train_blocks") for a in self.actors)
        pending: deque = deque()
        position, stopping = start, False
        while True:
            while not stopping and position < steps and len(pending) < QUEUE:
                n = min(chunk * self.blocks, steps - position)
                if blocks_ok and n > chunk:
                    pending.append((True, [a.train_blocks.remote(n, chunk) for a in self.actors]))
                else:
                    n = min(chunk, n)
                    pending.append((False, [a.train_steps.remote(n) for a in self.actors]))
                position += n
            if not pending:
                return position == steps
            blocks, refs = pending.popleft()
            results = self.get(refs)
            for block in (zip(*results, strict=True) if blocks else [results]):
                on_chunk(list(block))
                stopping = stopping or should_stop()
            if blocks_ok and not blocks and results[0]["step_ms"].size:
                # the chunk's time sets how many chunks one call runs from now on
                chunk_s = max(float(np.sum(r["step_ms"])) for r in results) / 1000 * chunk / results[0]["step_ms"].size
                self.blocks = int(min(MAX_BLOCKS, max(1, TASK_S // max(chunk_s, 1e-6))))

    def evaluate(self, split: str, y: np.ndarray) -> EvalResult:
        shards = self.shards(split=split)
        return combine(self.get([a.evaluate.remote(split, *([shard] if shard is not None else []))
                                 for a, shard in zip(self.actors, shards)]), y)

    def get(self, refs: list) -> list:
        """ray.get of one call on every replica. When a replica dies, its peers may be stuck in
        the collective (shared memory spins) or fail in it (gloo raises): the death is what is
        reported, as ReplicaDied, so the run loop can restart the group from a checkpoint."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return ray.get(refs)
        except RayActorError as exc:
            raise self._died(exc) from exc
        except RayTaskError:
            ray.wait(refs, num_returns=len(refs), timeout=PEER_DEATH_TIMEOUT_S)
            for ref in refs:
                try:
                    ray.get(ref, timeout=0)
                except RayActorError as exc:
                    raise self._died(exc) from exc
                except Exception:
                    pass
            raise

    def _died(self, exc) -> ReplicaDied:
        rank = self.rank_of(exc)
        return ReplicaDied({"rank": rank, "pid": None if rank is None else self.info[rank]["pid"],
                            "error": type(exc).__name__})

    def rank_of(self, exc) -> int | None:
        """The rank of the replica a RayActorError is about, if it is one of this group's."""
        ids = [a._actor_id.hex() for a in self.actors]
        actor_id = getattr(exc, "actor_id", None)
        return ids.index(actor_id) if actor_id in ids else None

    def nodes(self) -> dict:
        """Which Ray node runs each replica (summary.json ``nodes``), by rank."""
        return {"replicas": [i["node_id"] for i in self.info]}

    def model_state(self) -> dict:
        """The network and its optimizer state (identical on every replica: rank 0's)."""
        return self.get([self.actors[0].state.remote()])[0]

    def weights(self) -> dict:
        return self.get([self.actors[0].weights.remote()])[0]

    def state(self) -> dict:
        """Model and optimizer (identical on every replica: rank 0's) and every rank's RNG state."""
        state, *rngs = self.get([self.actors[0].state.remote()] + [a.rng_state.remote() for a in self.actors])
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
        """Close the process group and kill the actors (once; later calls do nothing). After a
        replica died, ``graceful=False`` skips the close: the survivors may be stuck in a
        collective and never get to it."""
        import ray

        from ray_train.cluster import release

        if self.closed:
            return
        self.closed = True
        if self.cutter is not None:
            self.cutter.shutdown(wait=True)
        try:
            if graceful:
                ray.get([a.close.remote() for a in self.actors], timeout=30)
        except Exception:  # a dead replica must not stop the teardown of the others
            pass
        for a in self.actors:
            ray.kill(a)
        release(self.pg)
