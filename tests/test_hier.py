"""Hierarchical averaging (ray_train/worker/hier.py): four replicas told they sit on two nodes
(their ``info`` reports a node id per rank; they run on the suite's one-node cluster) follow
single-process SGD with four times the batch, as flat sync does, whether the nodes average inside
through shared memory or through process groups (the GPU path's code, on gloo here), with buckets
launched from backward or averaged after it. The real thing on a cluster of fake nodes:
tests/test_multinode.py."""
import sys

import numpy as np
import pytest
import ray

from ray_train.cluster import ReplicaContext
from ray_train.config import build_config
from ray_train.data.loaders import load_dataset
from ray_train.network import model_factory
from ray_train.worker.batches import shard_batches
from ray_train.worker.group import ReplicaGroup, choose_allreduce
from ray_train.worker.hier import Hierarchy
from ray_train.worker.replica import Replica

STEPS, BATCH, SEED, REPLICAS = 20, 16, 3, 4
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors cannot import this test file


class Interleaved(Replica):
    """Ranks 0 and 2 on node "a", 1 and 3 on "b" (as SPREAD places them); a bucket per parameter
    tensor (net B's 4), launched from backward."""

    nodes = ("a", "b", "a", "b")
    bucket_bytes = 1200

    def info(self) -> dict:
        return {**super().info(), "node_id": self.nodes[self.ctx.rank]}


class Uneven(Interleaved):
    """Three on one node and a leader alone on the other; process groups inside the nodes (what
    GPUs use, with NCCL) and one average after backward."""

    nodes = ("a", "a", "b", "a")
    overlap_grads = False
    bucket_bytes = 256 * 1024  # after backward the buffer goes in chunks of this size: net B's 1.2 MB in 5

    def connect(self, address, port, backend, shm_name, hierarchy=None):
        return super().connect(address, port, backend, shm_name, Hierarchy(hierarchy.nodes, None))


def _cfg(**run):
    return build_config(overrides={
        "run": {"batch_size": BATCH, "seed": SEED, **run},
        "data": {"dataset": "synthetic", "synthetic_train": REPLICAS * BATCH * STEPS, "synthetic_test": 64},
        "model": {"name": "net_b"},
        "optim": {"optimizer": "momentum", "lr": 0.05, "momentum": 0.9},
        "resources": {"replicas": REPLICAS, "cpus_per_replica": 0.5},
    })


def _reference(cfg, data) -> np.ndarray:
    """Single process, batch 4b: each step takes every replica's batch of that step."""
    single = Replica(ReplicaContext(0, 1, 1, 0, SEED), cfg, data, model_factory(cfg, data))
    shards = [shard_batches(len(data.y_train), REPLICAS, r, BATCH, SEED, 0) for r in range(REPLICAS)]
    for s in range(STEPS):
        single.step(np.concatenate([shards[r][s] for r in range(REPLICAS)]))
    return single.flat_params()


@pytest.mark.parametrize("replica_cls", [Interleaved, Uneven])
def test_two_levels_equal_single_process_with_four_times_the_batch(ray_cluster, replica_cls):
    cfg = _cfg()
    data = load_dataset(cfg.data, seed=SEED)
    group = ReplicaGroup.create(cfg, ray_cluster.put(data), model_factory(cfg, data), replica_cls)
    try:
        assert group.comm == "HierarchicalAllreduce"  # auto: CPU replicas on two nodes, two or more on one
        assert "2 nodes x " in group.averaging() and "gloo between one leader per node" in group.averaging()
        assert ray_cluster.get([a.set_epoch.remote(0, cfg.optim.lr) for a in group.actors]) == [STEPS] * REPLICAS
        ray_cluster.get([a.train_steps.remote(STEPS) for a in group.actors])
        params = ray_cluster.get([a.flat_params.remote() for a in group.actors])
    finally:
        group.shutdown()
    for p in params[1:]:  # every replica applied the same update: the leaders' mean, handed on
        np.testing.assert_array_equal(params[0], p)
    reference = _reference(cfg, data)
    initial = Replica(ReplicaContext(0, 1, 1, 0, SEED), cfg, data, model_factory(cfg, data)).flat_params()
    assert np.abs(reference - initial).max() > 1e-3, "training must have moved the parameters"
    assert np.abs(params[0] - reference).max() <= 1e-5


def test_the_nodes_and_their_leaders():
    h = Hierarchy.plan(["n2", "n1", "n2", "n3"], shared_memory=True)
    assert h.groups() == [[0, 2], [1], [3]] and h.leaders == [0, 1, 3] and h.peers(2) == [0, 2]
    assert h.segment(0) == h.segment(2) and h.segment(0).startswith("rt_")  # one segment per crowded node
    assert h.segment(1) is None and h.segment(3) is None
    assert Hierarchy.plan(["a", "a"], shared_memory=False).segments is None


@pytest.mark.parametrize("nodes,allreduce,gpus,expected", [
    (["a", "a"], "auto", 0, ("gloo", "shm")),
    (["a", "b"], "auto", 0, ("gloo", "flat")),  # one per node: nothing to share inside a node
    (["a", "b", "a", "b"], "auto", 0, ("gloo", "hier")),
    (["a", "a", "b"], "auto", 0, ("gloo", "hier")),
    (["a", "b", "a", "b"], "shm", 0, ("gloo", "hier")),  # shared memory where it can be
    (["a", "b", "a", "b"], "gloo", 0, ("gloo", "flat")),
    (["a", "b", "a", "b"], "auto", 1, ("nccl", "flat")),  # NCCL's own rings and trees follow the nodes
    (["a", "b", "a", "b"], "hier", 1, ("nccl", "hier")),
])
def test_choose_allreduce(nodes, allreduce, gpus, expected):
    cfg = build_config(overrides={"run": {"allreduce": allreduce},
                                  "resources": {"replicas": len(nodes), "gpus_per_replica": gpus}})
    assert choose_allreduce(cfg, nodes) == expected


def test_hier_on_shared_gpus_is_refused():
    from ray_train.errors import ConfigError

    with pytest.raises(ConfigError, match="hier"):
        build_config(overrides={"run": {"allreduce": "hier"}, "resources": {"gpus_per_replica": 0.5}})


class _Recorder:
    """A node stage that records what it is asked; its peers' copies arrive when ``arrived`` says."""

    def __init__(self, arrived=lambda b: True):
        self.calls, self.arrived = [], arrived

    def has(self, b, step):
        return self.arrived(b)

    def contribute(self, b, lo, hi, flat, step):
        self.calls.append(("contribute", b, step))

    def collect(self, b, lo, hi, flat, step):
        self.calls.append(("collect", b, step))

    def publish(self, flat, step):
        self.calls.append(("publish", step))

    def receive(self, flat, step):
        self.calls.append(("receive", step))

    def close(self):
        pass


def _hooked(rank: int, node):
    import torch

    from ray_train.worker.comm import flatten_grads
    from ray_train.worker.hier import HierarchicalAllreduce

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Tanh(), torch.nn.Linear(30, 4))
    params = list(model.parameters())
    flat = flatten_grads(params)
    comm = HierarchicalAllreduce(Hierarchy(("a", "a")), rank, flat.numel(), None, node, params, flat,
                                 bucket_bytes=4 * 130)
    return model, flat, comm


def test_buckets_pass_on_in_bucket_order_from_backward():
    """A peer writes every bucket from backward's hooks; the leader sums and launches those whose
    peers' copies are in, in bucket order, and leaves the rest (here bucket 1 and so bucket 2) to
    ``mean_``, which also hands the mean on. Every collective keeps one order on every rank."""
    import torch

    peer = _Recorder()
    model, flat, comm = _hooked(1, peer)
    assert len(comm.bounds) == 3
    model(torch.randn(8, 20)).square().sum().backward()
    assert peer.calls == [("contribute", b, 1) for b in range(3)]
    comm.mean_(flat)
    assert peer.calls[-1] == ("receive", 1)

    late = _Recorder(arrived=lambda b: b != 1)
    model, flat, comm = _hooked(0, late)
    model(torch.randn(8, 20)).square().sum().backward()
    assert late.calls == [("collect", 0, 1)]
    comm.mean_(flat)
    assert late.calls == [("collect", 0, 1), ("collect", 1, 1), ("collect", 2, 1), ("publish", 1)]
    comm.close()
    assert not comm.hooks
