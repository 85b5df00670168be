"""A short real run through the CLI entry point: summary.json, the model file, and the TensorBoard
event files read back with tensorboard's own EventAccumulator."""
import json
import math

import pytest

from ray_train.cli import main

EPOCHS, LOG_EVERY, REPLICAS, BATCH, TRAIN = 2, 10, 2, 64, 3500  # mnist5k: 4,000 less 500 for validation


@pytest.fixture(scope="module")
def short_run(ray_cluster, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    argv = ["--config", "configs/default.yaml", "--epochs", str(EPOCHS), "--run-name", "short",
            "--storage", str(storage), "--log-every", str(LOG_EVERY), "--no-progress"]
    assert main(argv) == 0
    run_dir = storage / "short"
    return run_dir, json.loads((run_dir / "summary.json").read_text())


def test_summary_holds_the_contract_keys(short_run):
    _, summary = short_run
    for key in ("strategy", "model", "dataset", "replicas", "epochs", "test_accuracy", "test_errors",
                "train_samples", "wall_s", "samples_per_s", "history", "best_epoch", "val_accuracy",
                "best_test_accuracy", "best_test_errors"):
        assert key in summary, key
    assert (summary["strategy"], summary["model"], summary["dataset"]) == ("sync", "net_d", "mnist5k")
    assert summary["replicas"] == REPLICAS and summary["epochs"] == EPOCHS
    steps = TRAIN // REPLICAS // BATCH
    assert summary["train_samples"] == EPOCHS * steps * REPLICAS * BATCH
    assert len(summary["history"]) == EPOCHS
    assert summary["test_errors"] == round((1 - summary["test_accuracy"]) * 1000)
    # Two epochs of net D with momentum already classify most digits.
    assert summary["test_accuracy"] > 0.85
    assert summary["allreduce"] == "SharedMemoryAllreduce"
    assert (short_run[0] / "model.pt").exists()
    # every step each replica counts 2(N-1)/N of net D's gradient (float32) as moved
    import torch

    params = sum(v.numel() for v in torch.load(short_run[0] / "model.pt", weights_only=True)["model"].values())
    per_step = 2 * (REPLICAS - 1) * params * 4 // REPLICAS
    assert summary["comm_bytes"] == EPOCHS * steps * REPLICAS * per_step
    assert summary["history"][-1]["comm_bytes"] == summary["comm_bytes"]


def test_event_files_hold_every_tag_with_the_expected_points(short_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = short_run
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    steps = TRAIN // REPLICAS // BATCH
    chunks = EPOCHS * math.ceil(steps / LOG_EVERY)
    expected = {"train/loss": chunks, "train/accuracy": chunks, "lr": EPOCHS, "test/loss": EPOCHS,
                "test/accuracy": EPOCHS, "val/loss": EPOCHS, "val/accuracy": EPOCHS, "throughput/samples_per_s": EPOCHS,
                "comm/bytes": chunks}
    expected.update({f"time/step_ms/replica_{r}": chunks for r in range(REPLICAS)})
    for tag, count in expected.items():
        assert tag in tags["scalars"], tag
        assert len(acc.Scalars(tag)) == count, tag
    train_steps = [e.step for e in acc.Scalars("train/loss")]
    assert train_steps == sorted(train_steps) and train_steps[-1] == EPOCHS * steps
    moved = [e.value for e in acc.Scalars("comm/bytes")]
    assert moved == sorted(moved) and moved[-1] == pytest.approx(summary_bytes(run_dir), rel=1e-6)
    weight_tags = [t for t in tags["histograms"] if t.startswith("weights/")]
    assert len(weight_tags) == 8  # net D: two conv, hidden and output layers, weight and bias each
    assert all(len(acc.Histograms(t)) == EPOCHS for t in weight_tags)
    assert tags["images"] == ["test/confusion_matrix"] and len(acc.Images("test/confusion_matrix")) == 1
    assert "hparams/test_accuracy" in tags["scalars"]
    plugins = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugins


def summary_bytes(run_dir):
    return json.loads((run_dir / "summary.json").read_text())["comm_bytes"]


def test_an_existing_run_name_is_not_overwritten(short_run, capsys):
    run_dir, _ = short_run
    assert main(["--run-name", "short", "--storage", str(run_dir.parent)]) == 2
    assert "already holds a run" in capsys.readouterr().err
