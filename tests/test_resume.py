"""Checkpoint and resume of the sync strategy: two epochs, stop, ``--resume`` to four gives the
parameters, momentum buffers, schedule and per-replica RNG of an uninterrupted four-epoch run; the
TensorBoard steps continue without duplicates; bad --resume folders are one-line errors."""
import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch

from ray_train.cli import main
from ray_train.cluster import ReplicaContext
from ray_train.config import build_config
from ray_train.data.loaders import load_dataset
from ray_train.network import model_factory
from ray_train.worker.batches import shard_batches
from ray_train.worker.replica import Replica
from tests.conftest import one_line_error

EPOCHS, HALF, BATCH, REPLICAS, LOG_EVERY, TRAIN = 4, 2, 64, 2, 10, 3500  # mnist5k less validation
STEPS = TRAIN // REPLICAS // BATCH  # 27 per epoch
# Dropout makes every step draw from the replica's RNG; plateau with patience 1 gives the schedule
# state worth restoring (best accuracy, stall counters, current rate).
YAML = "optim: {schedule: plateau, patience: 1}\n"
ARGS = ["--model", "mlp30", "--dropout", "0.3", "--dataset", "mnist5k", "--optimizer", "momentum", "--lr", "0.2",
        "--batch-size", str(BATCH), "--replicas", str(REPLICAS), "--seed", "1", "--log-every", str(LOG_EVERY),
        "--no-progress"]


def _run(storage, name, epochs):
    config = storage / "job.yaml"
    config.write_text(YAML)
    argv = ["--config", str(config), *ARGS, "--epochs", str(epochs), "--storage", str(storage), "--run-name", name]
    assert main(argv) == 0


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    _run(storage, "straight", EPOCHS)
    _run(storage, "resumed", HALF)
    assert main(["--resume", str(storage / "resumed"), "--epochs", str(EPOCHS), "--no-progress"]) == 0
    return storage / "straight", storage / "resumed"


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resumed_run_equals_the_uninterrupted_run(runs):
    straight, resumed = runs
    a, b = _load(straight / "model.pt"), _load(resumed / "model.pt")
    diffs = [float((a["model"][k] - b["model"][k]).abs().max()) for k in a["model"]]
    print(f"max abs parameter difference, resumed vs uninterrupted: {max(diffs):.3g}")
    assert max(diffs) <= 1e-6
    cfg = build_config(overrides={"model": {"name": "mlp30", "dropout": 0.3}})
    initial = Replica(ReplicaContext(0, REPLICAS, 1, 0, 1), cfg, None,
                      model_factory(cfg, load_dataset(cfg.data))).state()["model"]
    assert max(float((a["model"][k] - initial[k]).abs().max()) for k in a["model"]) > 1e-2, "training moved nothing"
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert len(momentum_a) == 4 and all(float(x.abs().max()) > 0 for x in momentum_a)
    assert max(float((x - y).abs().max()) for x, y in zip(momentum_a, momentum_b)) <= 1e-6


def test_last_checkpoints_agree_on_schedule_rng_and_counters(runs):
    straight, resumed = runs
    a = _load(straight / "checkpoints" / "ckpt-000004.pt")
    b = _load(resumed / "checkpoints" / "ckpt-000004.pt")
    assert (a["epoch"], a["step"], a["samples"]) == (b["epoch"], b["step"], b["samples"]) == (
        EPOCHS, EPOCHS * STEPS, EPOCHS * STEPS * REPLICAS * BATCH)
    assert a["schedule"] == b["schedule"] and a["schedule"]["best"] > 0.5
    ra, rb = a["engine"]["rng"], b["engine"]["rng"]
    assert len(ra) == len(rb) == REPLICAS
    assert all(torch.equal(x["cpu"], y["cpu"]) for x, y in zip(ra, rb))
    assert not torch.equal(ra[0]["cpu"], ra[1]["cpu"]), "replicas must draw different dropout masks"


def test_summary_and_history_continue(runs):
    straight, resumed = runs
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in runs)
    assert sa["epochs"] == sb["epochs"] == EPOCHS
    assert [h["epoch"] for h in sb["history"]] == [1, 2, 3, 4]
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr"):
        assert [h[key] for h in sa["history"]] == pytest.approx([h[key] for h in sb["history"]], abs=1e-6), key
    assert sa["test_errors"] == sb["test_errors"] and sa["train_samples"] == sb["train_samples"]
    assert sb["restarts"] == 0 and sb["failures"] == []
    # only the last checkpoints are kept (default 3)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == [
        "ckpt-000002.pt", "ckpt-000003.pt", "ckpt-000004.pt"]


def test_tensorboard_steps_continue_without_duplicates(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(run_dir, tag):
        acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    straight, resumed = runs
    chunk_steps = [e * STEPS + min(s + LOG_EVERY, STEPS) for e in range(EPOCHS) for s in range(0, STEPS, LOG_EVERY)]
    assert len(chunk_steps) == EPOCHS * math.ceil(STEPS / LOG_EVERY)
    loss = scalars(resumed, "train/loss")
    assert [s for s, _ in loss] == chunk_steps  # every chunk once, in order: no duplicates, no gap
    reference = scalars(straight, "train/loss")
    assert [s for s, _ in reference] == chunk_steps
    np.testing.assert_allclose([v for _, v in loss], [v for _, v in reference], rtol=0, atol=1e-6)
    for tag in ("test/accuracy", "lr", "throughput/samples_per_s"):
        assert [s for s, _ in scalars(resumed, tag)] == [STEPS * (e + 1) for e in range(EPOCHS)], tag


def test_rng_restore_reproduces_dropout_and_is_needed():
    """Replica.load_state with the RNG continues bit-identically; without it the dropout masks,
    and so the parameters, differ: the resume test above would notice a missing RNG."""
    cfg = build_config(overrides={"model": {"name": "mlp30", "dropout": 0.3}, "data": {"dataset": "synthetic",
                                  "synthetic_train": 640, "synthetic_test": 64}, "run": {"batch_size": 32}})
    data = load_dataset(cfg.data)
    batches = shard_batches(len(data.y_train), 1, 0, 32, 0, 0)

    def replica():
        return Replica(ReplicaContext(0, 1, 1, 0, 0), cfg, data, model_factory(cfg, data))

    first = replica()
    for idx in batches[:10]:
        first.step(idx)
    state, rng = copy.deepcopy(first.state()), first.rng_state()  # state() holds live tensors
    for idx in batches[10:]:
        first.step(idx)
    # One process, one global torch RNG: the two continuations run one after the other.
    exact = replica()
    exact.load_state(state, rng)
    for idx in batches[10:]:
        exact.step(idx)
    no_rng = replica()
    no_rng.load_state(state)
    for idx in batches[10:]:
        no_rng.step(idx)
    np.testing.assert_array_equal(exact.flat_params(), first.flat_params())
    assert np.abs(no_rng.flat_params() - first.flat_params()).max() > 1e-4


def test_resume_of_a_missing_folder_is_a_one_line_error(capsys, tmp_path):
    assert "no such run folder" in one_line_error(capsys, ["--resume", str(tmp_path / "nope")])


def test_resume_of_another_strategys_run_is_a_one_line_error(capsys, tmp_path):
    run_dir = tmp_path / "async-run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"strategy": "async", "config": {"run": {"strategy": "async"}}}))
    assert "holds a 'async' run, not 'sync'" in one_line_error(capsys, ["--resume", str(run_dir), "--strategy", "sync"])
    assert "not 'sync'" in one_line_error(capsys, ["--resume", str(run_dir), "--config", "configs/default.yaml"])


def test_resume_with_another_model_names_the_checkpoint(runs, capsys, tmp_path):
    run_dir = tmp_path / "resumed"
    shutil.copytree(runs[1], run_dir)
    line = one_line_error(capsys, ["--resume", str(run_dir), "--model", "net_b", "--epochs", "5", "--no-progress"])
    assert f"checkpoint {run_dir / 'checkpoints' / 'ckpt-000004.pt'} does not fit" in line
