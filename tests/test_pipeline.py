"""Stage actors (ray_train/worker/pipeline.py): R pipelined replicas of S stage actors follow
single-process SGD on the R replicas' whole batch, to 1e-5 after 50 steps, with either schedule,
plain SGD and momentum; a resumed pipelined run equals the uninterrupted one."""
import json
import os
import shutil
import signal
import sys

import numpy as np
import pytest
import ray.cloudpickle
import torch
from torch import nn

import ray_train
from models import build_model
from ray_train.cli import main
from ray_train.strategies.sync.engine import SyncEngine
from ray_train.worker.pipeline import Stage

from ray_train.cluster import ReplicaContext
from ray_train.config import build_config
from ray_train.data.loaders import load_dataset
from ray_train.network import model_factory
from ray_train.worker.batches import shard_batches
from ray_train.worker.pipeline_group import PipelineGroup
from ray_train.worker.replica import Replica
from ray_train.errors import ConfigError
from tests.conftest import one_line_error

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


# -- checkpoints, resume and a stage's death, through the CLI ----------------------------------------
EPOCHS, BATCH_CLI = 2, 64
CLI = ["--model", "mlp30", "--dropout", "0.3", "--dataset", "mnist5k", "--optimizer", "momentum", "--lr", "0.2",
       "--batch-size", str(BATCH_CLI), "--replicas", "2", "--cpus-per-replica", "0.5", "--stages", "2",
       "--micro-batches", "4", "--seed", "1", "--log-every", "10", "--no-progress"]

# The stage class travels to the actors by value: workers cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class StageDiesOnce(Stage):
    """Replica 1's stage 1 kills its own process halfway through epoch 1 (0-based), once per run."""

    def set_epoch(self, epoch: int, lr: float, start: int = 0) -> int:
        self.marker = os.path.join(self.cfg.run.storage, f"{self.cfg.run.run_name}.killed")
        self.doomed = self.ctx.rank == 3 and epoch == 1 and not os.path.exists(self.marker)
        return super().set_epoch(epoch, lr, start)

    def train_steps(self, n: int) -> dict:
        if self.doomed and self.cursor >= len(self.batches) // 2:
            with open(self.marker, "w") as fh:
                fh.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().train_steps(n)


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    common = [*CLI, "--storage", str(storage)]
    assert main([*common, "--epochs", str(EPOCHS), "--run-name", "straight"]) == 0
    # the straight run as if stopped after epoch 1 (its epoch-1 checkpoint is what a 1-epoch run
    # writes), resumed: one group start fewer than a run of its own
    shutil.copytree(storage / "straight", storage / "resumed")
    (storage / "resumed" / "checkpoints" / "ckpt-000002.pt").unlink()
    for name in ("model.pt", "model-last.pt", "summary.json"):
        (storage / "resumed" / name).unlink()
    assert main(["--resume", str(storage / "resumed"), "--epochs", str(EPOCHS), "--no-progress"]) == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SyncEngine, "stage_cls", StageDiesOnce)
        assert main([*common, "--epochs", str(EPOCHS), "--run-name", "killed"]) == 0
    return storage


def _model(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_model_pt_holds_the_whole_network_and_checkpoints_each_stage(runs):
    model = _model(runs / "straight" / "model.pt")
    net = build_model("mlp30", dropout=0.3)
    assert net.load_state_dict(model).missing_keys == []  # loads as the whole network, as evaluate.py does
    ckpt = torch.load(runs / "straight" / "checkpoints" / "ckpt-000002.pt", map_location="cpu", weights_only=False)
    engine = ckpt["engine"]
    assert engine["stages"] == 2 and len(engine["stage_optimizers"]) == 2 and len(engine["rng"]) == 4
    assert all(opt["state"] for opt in engine["stage_optimizers"])  # momentum buffers of each stage
    summary = json.loads((runs / "straight" / "summary.json").read_text())
    assert summary["stages"] == 2 and summary["micro_batches"] == 4
    assert summary["bubble_bound"] == pytest.approx(1 / 5) and 0.0 <= summary["bubble"] < 1.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs / "straight"), size_guidance={"scalars": 0})
    acc.Reload()
    for s in (0, 1):
        assert acc.Scalars(f"pipeline/step_ms/stage_{s}")[0].value > 0
        assert 0.0 <= acc.Scalars(f"pipeline/bubble/stage_{s}")[0].value < 1.0
    # stage 0 sends the activations at the cut, stage 1 their gradients: the same bytes
    sent = [acc.Scalars(f"pipeline/activation_bytes/stage_{s}")[0].value for s in (0, 1)]
    assert sent[0] == sent[1] > 0


def test_a_resumed_pipelined_run_equals_the_uninterrupted_one(runs):
    a, b = _model(runs / "straight" / "model-last.pt"), _model(runs / "resumed" / "model-last.pt")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_a_stage_death_restarts_the_pipelines_from_the_checkpoint(runs):
    pid = int((runs / "killed.killed").read_text())
    summary = json.loads((runs / "killed" / "summary.json").read_text())
    assert summary["restarts"] == 1
    failure = summary["failures"][0]
    assert (failure["rank"], failure["stage"], failure["pid"], failure["epoch"]) == (1, 1, pid, 2)
    a, b = _model(runs / "straight" / "model-last.pt"), _model(runs / "killed" / "model-last.pt")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


@pytest.mark.parametrize("argv, needle", [
    (["--stages", "9"], "--stages: 9 stages, but the network splits into only 5 layers (net.0, net.1"),
    (["--stages", "2", "--split-at", "net.9"], "'net.9' is not a layer of the network; its layers: net.0,"),
    (["--stages", "2", "--gpus-per-replica", "1"], "--gpus-per-replica does not combine with --stages"),
    (["--stages", "2", "--micro-batches", "5"], "pipeline.micro_batches: 5 does not divide run.batch_size 64"),
    (["--stages", "4", "--replicas", "2"], "2 replicas x 4 stages x 1 CPU = 8 CPU asked, but the cluster has 2 CPU"),
    (["--stages", "2", "--strategy", "hogwild"], "run.strategy 'hogwild' does not take --stages, --micro-batches "
                                                 "or --split-at; sync, async, ensemble do"),
])
def test_bad_pipelines_are_one_line_errors(ray_cluster, capsys, tmp_path, argv, needle):
    line = one_line_error(capsys, ["--model", "mlp30", "--epochs", "1", "--storage", str(tmp_path), *argv])
    assert needle in line, line


def test_an_ensemble_member_may_be_a_pipeline(ray_cluster, tmp_path, capsys):
    argv = ["--strategy", "ensemble", "--members", "2", "--bagging", "--model", "mlp30", "--stages", "2",
            "--micro-batches", "2", "--cpus-per-replica", "0.5", "--epochs", "1", "--storage", str(tmp_path),
            "--run-name", "ens", "--no-progress"]
    assert main(argv) == 0
    assert "each 1 replica(s) x 2 stages x 0.5 CPU" in capsys.readouterr().out
    summary = json.loads((tmp_path / "ens" / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.5
    members = summary["members"]
    assert len(members) == 2 and all(m["distinct_examples"] < 3500 for m in members)  # bagging in the stages
    model = torch.load(tmp_path / "ens" / "members" / "member_0" / "model.pt", weights_only=True)["model"]
    assert build_model("mlp30").load_state_dict(model).missing_keys == []


# -- a user's factory that returns its stages as a list ----------------------------------------------
def two_stages():
    """Stages given as a list (also ``--model tests.test_pipeline:two_stages``)."""
    return [nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU()), nn.Sequential(nn.Linear(32, 10))]


def test_a_factory_may_return_a_list_of_stage_modules(ray_cluster, tmp_path):
    config = {"run": {"epochs": 1, "storage": str(tmp_path), "run_name": "listed", "batch_size": 64},
              "pipeline": {"micro_batches": 4}, "resources": {"replicas": 1, "cpus_per_replica": 0.5}}
    summary = ray_train.fit(config, model=two_stages, tensorboard=False, progress=False, out=sys.stderr)
    assert summary["stages"] == 2  # the list's length: --stages was left out
    assert summary["stage_params"] == [784 * 32 + 32, 32 * 10 + 10]  # cut where the list says
    assert summary["test_accuracy"] > 0.5
    state = _model(tmp_path / "listed" / "model.pt")
    assert nn.Sequential(*two_stages()).load_state_dict(state).missing_keys == []  # the whole network
    got = ray_train.predict(str(tmp_path / "listed"), model=two_stages)
    assert got["accuracy"] == pytest.approx(summary["best_test_accuracy"])
    with pytest.raises(ConfigError, match="pipeline.stages: 3, but model custom returns 2 stage modules"):
        ray_train.fit({**config, "pipeline": {"stages": 3}}, model=two_stages)


def test_a_list_that_contradicts_stages_is_a_one_line_error(capsys, tmp_path):
    line = one_line_error(capsys, ["--model", "tests.test_pipeline:two_stages", "--stages", "3",
                                   "--storage", str(tmp_path)])
    assert "pipeline.stages: 3, but model tests.test_pipeline:two_stages returns 2 stage modules" in line, line
