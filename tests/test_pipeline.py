"""Stage actors (ray_train/worker/pipeline.py): R pipelined replicas of S stage actors follow
single-process SGD on the R replicas' whole batch, to 1e-5 after 50 steps, with either schedule,
plain SGD and momentum; a resumed pipelined run equals the uninterrupted one."""
import numpy as np
import pytest
import torch

from ray_train.cluster import ReplicaContext
from ray_train.config import build_config
from ray_train.data.loaders import load_dataset
from ray_train.network import model_factory
from ray_train.worker.batches import shard_batches
from ray_train.worker.pipeline_group import PipelineGroup
from ray_train.worker.replica import Replica

STEPS, BATCH, SEED = 50, 16, 3


def _cfg(stages, replicas, optimizer, schedule, cpus):
    return build_config(overrides={
        "run": {"batch_size": BATCH, "seed": SEED},
        "data": {"dataset": "synthetic", "synthetic_train": replicas * BATCH * STEPS, "synthetic_test": 64},
        "model": {"name": "mlp30"},
        "optim": {"optimizer": optimizer, "lr": 0.5, "momentum": 0.9},
        "resources": {"replicas": replicas, "cpus_per_replica": cpus},
        "pipeline": {"stages": stages, "micro_batches": 4, "schedule": schedule},
    })


def _reference(cfg, data, replicas) -> dict:
    """One process, batch R*b: each step takes every replica's batch of that step."""
    single = Replica(ReplicaContext(0, 1, 1, 0, SEED), cfg, data, model_factory(cfg, data))
    initial = {k: v.clone() for k, v in single.model.state_dict().items()}
    shards = [shard_batches(len(data.y_train), replicas, r, BATCH, SEED, 0) for r in range(replicas)]
    for s in range(STEPS):
        single.step(np.concatenate([shards[r][s] for r in range(replicas)]))
    return initial, single.model.state_dict()


@pytest.mark.parametrize("stages, replicas, optimizer, schedule, cpus", [
    (2, 1, "sgd", "gpipe", 0.5),
    (2, 2, "momentum", "1f1b", 0.5),   # sync: 2 pipelines equal one process at batch 2b
    (4, 1, "momentum", "gpipe", 0.5),
    (4, 1, "sgd", "1f1b", 0.5),
])
def test_pipelined_replicas_equal_one_process_on_the_whole_batch(ray_cluster, stages, replicas, optimizer, schedule, cpus):
    cfg = _cfg(stages, replicas, optimizer, schedule, cpus)
    data = load_dataset(cfg.data, seed=SEED)
    group = PipelineGroup.create(cfg, ray_cluster.put(data), model_factory(cfg, data))
    try:
        assert ray_cluster.get([a.set_epoch.remote(0, cfg.optim.lr) for a in group.actors]) == [STEPS] * len(group.actors)
        results = ray_cluster.get([a.train_steps.remote(STEPS) for a in group.actors])
        states = [group.get([a.state.remote() for a in group.replica(r)]) for r in range(replicas)]
        evaluation = group.evaluate("test", data.y_test)
    finally:
        group.shutdown()
    assert sum(r["samples"] for r in results) == replicas * STEPS * BATCH
    assert all(r["act_bytes"] > 0 for r in results)  # activations and gradients moved between stages
    models = [{k: v for part in parts for k, v in part["model"].items()} for parts in states]
    initial, reference = _reference(cfg, data, replicas)
    assert models[0].keys() == reference.keys()
    assert max(float((reference[k] - initial[k]).abs().max()) for k in reference) > 1e-3, "training must move the parameters"
    for model in models:
        for k in reference:
            assert torch.allclose(model[k], reference[k], atol=1e-5, rtol=0), k
    assert 0.0 <= evaluation.accuracy <= 1.0 and len(evaluation.probs) == len(data.y_test)
