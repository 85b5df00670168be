"""Sync SGD with N replicas and batch b per replica equals single-process SGD with batch N*b over
the same samples (the rule that keeps the strategy honest), whether the gradients are averaged in
shared memory, after backward (DistAllreduce) or bucket by bucket during backward (GradBuckets)."""
import sys

import numpy as np
import pytest
import ray

from ray_train.cluster import ReplicaContext
from ray_train.config import build_config
from ray_train.data.loaders import load_dataset
from ray_train.network import model_factory
from ray_train.worker.batches import shard_batches
from ray_train.worker.group import ReplicaGroup
from ray_train.worker.replica import Replica

STEPS, BATCH, SEED = 50, 16, 3
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors cannot import this test file


class SmallBuckets(Replica):
    """Net B's 4 parameter tensors, a bucket each (1.2 kB: smaller than any two together)."""

    bucket_bytes = 1200


class AfterBackward(Replica):
    """Today's path before the buckets: one all_reduce of the whole gradient after backward."""

    overlap_grads = False


def _cfg(optimizer: str, allreduce: str):
    return build_config(overrides={
        "run": {"batch_size": BATCH, "seed": SEED, "allreduce": allreduce},
        "data": {"dataset": "synthetic", "synthetic_train": 2 * BATCH * STEPS, "synthetic_test": 64},
        "model": {"name": "net_b"},
        "optim": {"optimizer": optimizer, "lr": 0.05, "momentum": 0.9},
        "resources": {"replicas": 2, "cpus_per_replica": 0.5},
    })


def _reference(cfg, data) -> np.ndarray:
    """Single process, batch 2b: each step takes both replicas' batches of that step."""
    single = Replica(ReplicaContext(0, 1, 1, 0, SEED), cfg, data, model_factory(cfg, data))
    shards = [shard_batches(len(data.y_train), 2, r, BATCH, SEED, 0) for r in range(2)]
    for s in range(STEPS):
        single.step(np.concatenate([shards[0][s], shards[1][s]]))
    return single.flat_params()


@pytest.mark.parametrize("optimizer,allreduce", [("sgd", "gloo"), ("momentum", "gloo"),
                                                 ("sgd", "shm"), ("momentum", "shm")])
def test_two_replicas_equal_single_process_with_double_batch(ray_cluster, optimizer, allreduce):
    cfg = _cfg(optimizer, allreduce)
    data = load_dataset(cfg.data, seed=SEED)
    expected = {"gloo": "GradBuckets", "shm": "SharedMemoryAllreduce"}[allreduce]
    params = _train(ray_cluster, cfg, data, Replica, expected)
    _check(cfg, data, params)


def _train(ray_cluster, cfg, data, replica_cls, comm: str) -> list[np.ndarray]:
    group = ReplicaGroup.create(cfg, ray_cluster.put(data), model_factory(cfg, data), replica_cls)
    try:
        assert group.comm == comm
        assert ray_cluster.get([a.set_epoch.remote(0, cfg.optim.lr) for a in group.actors]) == [STEPS, STEPS]
        results = ray_cluster.get([a.train_steps.remote(STEPS) for a in group.actors])
        params = ray_cluster.get([a.flat_params.remote() for a in group.actors])
    finally:
        group.shutdown()
    assert all(r["samples"] == STEPS * BATCH for r in results)
    return params


def _check(cfg, data, params: list[np.ndarray]) -> None:
    # Every replica applied the same update: bit-identical parameters.
    np.testing.assert_array_equal(params[0], params[1])
    reference = _reference(cfg, data)
    initial = Replica(ReplicaContext(0, 1, 1, 0, SEED), cfg, data, model_factory(cfg, data)).flat_params()
    assert np.abs(reference - initial).max() > 1e-3, "training must have moved the parameters"
    assert np.abs(params[0] - reference).max() <= 1e-5


def test_buckets_launched_during_backward_give_the_numbers_of_one_allreduce_after_it(ray_cluster):
    cfg = _cfg("momentum", "gloo")
    data = load_dataset(cfg.data, seed=SEED)
    bucketed = _train(ray_cluster, cfg, data, SmallBuckets, "GradBuckets")
    after = _train(ray_cluster, cfg, data, AfterBackward, "DistAllreduce")
    assert np.abs(bucketed[0] - after[0]).max() <= 1e-5
    _check(cfg, data, bucketed)


def test_buckets_cover_the_gradient_last_parameters_first():
    import torch

    from ray_train.worker.comm import GradBuckets, flatten_grads

    params = [torch.nn.Parameter(torch.zeros(n)) for n in (300, 10, 200, 5)]
    flat = flatten_grads(params)
    buckets = GradBuckets(params, flat, 2, bucket_bytes=4 * 210)
    assert buckets.bounds == [(310, 515), (300, 310), (0, 300)]  # one too-large parameter is a bucket of its own
    assert buckets.bucket_of == [2, 1, 0, 0]
    buckets.close()
    assert not buckets.hooks


def test_backward_launches_every_bucket_before_mean_is_called():
    import torch
    import torch.distributed as dist

    from ray_train.cluster import free_port
    from ray_train.worker.comm import GradBuckets, flatten_grads

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Tanh(), torch.nn.Linear(30, 4))
        params = list(model.parameters())
        flat = flatten_grads(params)
        buckets = GradBuckets(params, flat, 1, bucket_bytes=4 * 130)
        assert len(buckets.bounds) == 3
        x = torch.randn(8, 20)
        model(x).square().sum().backward()
        assert all(w is not None for w in buckets.works), "every bucket was launched from a hook"
        buckets.mean_(flat)
        expected = torch.autograd.grad(model(x).square().sum(), params)
        torch.testing.assert_close(flat, torch.cat([g.reshape(-1) for g in expected]), rtol=0, atol=1e-6)
        assert all(w is None for w in buckets.works)
        buckets.close()
    finally:
        dist.destroy_process_group()
