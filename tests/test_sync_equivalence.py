"""Sync SGD with N replicas and batch b per replica equals single-process SGD with batch N*b over
the same samples (the rule that keeps the strategy honest)."""
import numpy as np
import pytest

from ray_train.cluster import ReplicaContext
from ray_train.config import build_config
from ray_train.data.loaders import load_dataset
from ray_train.network import model_factory
from ray_train.worker.batches import shard_batches
from ray_train.worker.group import ReplicaGroup
from ray_train.worker.replica import Replica

STEPS, BATCH, SEED = 50, 16, 3


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
    group = ReplicaGroup.create(cfg, ray_cluster.put(data), model_factory(cfg, data))
    try:
        expected = {"gloo": "DistAllreduce", "shm": "SharedMemoryAllreduce"}[allreduce]
        assert group.comm == expected
        assert ray_cluster.get([a.set_epoch.remote(0, cfg.optim.lr) for a in group.actors]) == [STEPS, STEPS]
        results = ray_cluster.get([a.train_steps.remote(STEPS) for a in group.actors])
        params = ray_cluster.get([a.flat_params.remote() for a in group.actors])
    finally:
        group.shutdown()
    assert all(r["samples"] == STEPS * BATCH for r in results)
    # Every replica applied the same update: bit-identical parameters.
    np.testing.assert_array_equal(params[0], params[1])
    reference = _reference(cfg, data)
    initial = Replica(ReplicaContext(0, 1, 1, 0, SEED), cfg, data, model_factory(cfg, data)).flat_params()
    assert np.abs(reference - initial).max() > 1e-3, "training must have moved the parameters"
    assert np.abs(params[0] - reference).max() <= 1e-5
