"""Every strategy x every stop rule, on real actors: the run stops where the rule says, writes its
final checkpoint there, and says why on stdout and in summary.json (``stopped``).

Small jobs (mlp30; mnist5k, or random synthetic data where accuracy must stall) keep the nine runs
to about a minute on two cores; tests/test_loop.py covers the same rules exactly with a scripted
engine."""
import io
import json

import pytest
import torch

from ray_train.api import fit
from ray_train.run.checkpoint import CheckpointStore

STRATEGIES = {
    "sync": {"resources": {"replicas": 2, "cpus_per_replica": 0.5}},
    "async": {"resources": {"replicas": 2, "cpus_per_replica": 0.5}, "optim": {"optimizer": "adagrad", "lr": 0.05}},
    "ensemble": {"resources": {"cpus_per_replica": 0.5}, "ensemble": {"members": 2}},
}
TARGET, LIMIT_S, EPOCHS = 0.8, 2.0, 40


def _fit(tmp_path, strategy, name, run, data=None, optim=None):
    cfg = {key: dict(value) for key, value in STRATEGIES[strategy].items()}
    cfg["run"] = {"strategy": strategy, "epochs": EPOCHS, "storage": str(tmp_path), "run_name": name,
                  "log_every": 10, **run}
    cfg["model"] = {"name": "mlp30"}
    cfg["data"] = data or {"dataset": "mnist5k"}
    cfg["optim"] = {"optimizer": "momentum", "lr": 0.1, **cfg.get("optim", {}), **(optim or {})}
    out = io.StringIO()
    summary = fit(cfg, tensorboard=False, progress=False, out=out)
    on_disk = json.loads((tmp_path / name / "summary.json").read_text())
    assert on_disk["stopped"] == summary["stopped"]
    return summary, out.getvalue()


def _loops(tmp_path, name, summary):
    """(history, checkpoint dir) of every run loop: the run's own, or each ensemble member's."""
    run_dir = tmp_path / name
    if summary["strategy"] != "ensemble":
        return [(summary["history"], run_dir, summary["steps"])]
    return [(None, run_dir / "members" / f"member_{m['index']}", None) for m in summary["members"]]


def _final_checkpoint(where):
    found = CheckpointStore(str(where)).load_latest()
    assert found is not None, where
    return found[0]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_target_accuracy(ray_cluster, tmp_path, strategy):
    summary, out = _fit(tmp_path, strategy, "target", {"target_accuracy": TARGET})
    assert summary["stopped"] == "target_accuracy" and summary["epochs"] < EPOCHS
    # the target is read on the validation split (mnist5k's 500 held-out digits), never the test set
    assert out.count("stopped: validation accuracy") == (2 if strategy == "ensemble" else 1)
    for history, where, steps in _loops(tmp_path, "target", summary):
        state = _final_checkpoint(where)
        history = history or state["history"]
        accuracies = [h["val_accuracy"] for h in history]
        assert accuracies[-1] >= TARGET and all(a < TARGET for a in accuracies[:-1]), accuracies
        assert state["epoch"] == len(history) and state["in_epoch"] == 0
        if steps is not None:
            assert state["step"] == steps


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_time_limit(ray_cluster, tmp_path, strategy):
    summary, out = _fit(tmp_path, strategy, "timed", {"time_limit": LIMIT_S, "epochs": 10 * EPOCHS})
    assert summary["stopped"] == "time_limit" and summary["epochs"] < 10 * EPOCHS
    assert out.count(f"stopped: time limit of {LIMIT_S:g} s reached") == (2 if strategy == "ensemble" else 1)
    for _, where, steps in _loops(tmp_path, "timed", summary):
        state = _final_checkpoint(where)
        assert state["train_s"] >= LIMIT_S  # one-sided: the chunks under way finish first
        if steps is not None:
            assert state["step"] == steps  # the checkpoint is where the run stopped, mid-epoch or not


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_early_stop(ray_cluster, tmp_path, strategy):
    # Random labels: test accuracy wanders around chance and soon stops improving.
    data = {"dataset": "synthetic", "synthetic_train": 512, "synthetic_test": 256}
    summary, out = _fit(tmp_path, strategy, "early", {"batch_size": 32}, data=data, optim={"early_stop": 2})
    assert summary["stopped"] == "early_stop" and summary["epochs"] < EPOCHS
    assert out.count("stopped: no better test accuracy in 2 evaluations") == (2 if strategy == "ensemble" else 1)
    for history, where, _ in _loops(tmp_path, "early", summary):
        state = _final_checkpoint(where)
        accuracies = [h["test_accuracy"] for h in (history or state["history"])]
        assert max(accuracies[-2:]) <= max(accuracies[:-2]), accuracies  # the last two did not improve
        assert state["epoch"] == len(accuracies) and state["schedule"]["stalls"] == 2


def test_the_final_model_is_saved_with_the_stopped_run(ray_cluster, tmp_path):
    summary, _ = _fit(tmp_path, "sync", "model", {"target_accuracy": TARGET})
    model = torch.load(tmp_path / "model" / "model.pt", weights_only=True)
    assert model["model_name"] == "mlp30" and model["num_classes"] == 10 and "net.1.weight" in model["model"]


def test_divergence_is_one_line_and_exit_status_3(ray_cluster, tmp_path, capsys):
    """A non-finite loss (momentum SGD at lr 1e38 turns net D's loss into NaN within the first
    chunk) stops the run at once: one line naming the epoch and step and what to try, status 3."""
    from ray_train.cli import main
    from tests.conftest import ROOT

    code = main(["--config", f"{ROOT}/configs/default.yaml", "--lr", "1e38", "--epochs", "2", "--storage", str(tmp_path),
                 "--run-name", "diverged", "--no-progress", "--no-tensorboard"])
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.startswith("ray_train:")]
    assert code == 3, captured.err[-2000:]
    assert len(err) == 1 and "diverged in epoch 1, step" in err[0] and "--lr" in err[0], err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "diverged" / "summary.json").exists()


def test_an_exploding_finite_loss_is_divergence_too(ray_cluster, tmp_path, capsys):
    """The issue's --lr 50: epoch 1 ended at loss 4e20 and 10% accuracy, and the run trained on and
    exited 0. Now a loss over 1,000x the loss at chance (ln 10 = 2.303) stops it: status 3."""
    from ray_train.cli import main
    from tests.conftest import ROOT

    code = main(["--config", f"{ROOT}/configs/default.yaml", "--lr", "50", "--epochs", "2", "--storage", str(tmp_path),
                 "--run-name", "exploded", "--no-progress", "--no-tensorboard"])
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.startswith("ray_train:")]
    assert code == 3, captured.err[-2000:]
    assert len(err) == 1 and "diverged in epoch 1, step" in err[0] and "over 1000x where it started (2.303)" in err[0]
    assert not (tmp_path / "exploded" / "summary.json").exists()


def test_async_prints_no_ray_warning_about_constructor_arguments(ray_cluster, tmp_path, capfd):
    """Shards and replicas get their parameters and data by a method call, so Ray has nothing to
    warn about ("constructor arguments in the object store and max_restarts > 0")."""
    _fit(tmp_path, "async", "quiet", {"epochs": 1})
    captured = capfd.readouterr()
    assert "max_restarts" not in captured.err + captured.out
