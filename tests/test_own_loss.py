"""Your own loss and non-classification targets (issue 23 item 3): fit(loss=...) with any callable
(outputs, targets) -> scalar under sync, async and ensemble (nn.CrossEntropyLoss(label_smoothing=0.1)
gave "model.loss: unknown value"); float targets (they gave "expected integer class labels") train
with a regression loss, report loss and mean absolute error, select and stop on validation loss
(--target-loss), and an ensemble of regressors averages its members."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import ray_train
from ray_train.errors import ConfigError
from tests.conftest import ROOT
from tests.test_api import _cfg, blobs

# the networks below travel to the replicas by value (pytest imports this file under a name the
# replicas cannot import)
from ray import cloudpickle  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SHAPE = (3, 4, 4)
SMOOTHING = 0.1


def linear_targets(n_train=800, n_test=200, seed=0, noise=0.1):
    """y = a fixed linear map of x, two outputs per example, plus noise of std ``noise``: the best
    possible mean squared error is noise**2."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((int(np.prod(SHAPE)), 2)).astype(np.float32) / np.sqrt(np.prod(SHAPE))

    def split(n):
        x = rng.standard_normal((n, *SHAPE)).astype(np.float32)
        return x, (x.reshape(n, -1) @ w + noise * rng.standard_normal((n, 2))).astype(np.float32)

    (x_train, y_train), (x_test, y_test) = split(n_train), split(n_test)
    return ray_train.Dataset("linear", x_train, y_train, x_test, y_test)


def linear_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(SHAPE)), 2))


def mlp4():
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.ReLU(), nn.Linear(32, 4))


def _test_loss(net_state: dict, data, fn) -> float:
    net = mlp4()
    net.load_state_dict(net_state["model"])
    with torch.no_grad():
        return float(fn(net.eval()(torch.from_numpy(data.x_test)), torch.from_numpy(data.y_test)))


@pytest.mark.parametrize("strategy", ["sync", "async", "ensemble"])
def test_label_smoothing_loss_reaches_every_replica(ray_cluster, tmp_path, strategy):
    data = ray_train.Dataset("blobs", *blobs())
    smoothed = nn.CrossEntropyLoss(label_smoothing=SMOOTHING)
    summary = ray_train.fit(_cfg(tmp_path, strategy, "smooth"), model=mlp4, data=data, loss=smoothed,
                            tensorboard=False, out=io.StringIO())
    assert summary["test_accuracy"] > 0.8  # chance is 0.25
    assert summary["config"]["model"]["loss"] == "custom" and "loss_fn" not in summary["config"]["model"]
    run = tmp_path / "smooth"
    assert "loss_fn" not in (run / "run.json").read_text()
    # the loss the run reports is the smoothed one, computed where the network lives: the same value
    # recomputed here from the saved final network, and not plain cross-entropy's
    if strategy == "ensemble":
        member = summary["members"][0]
        state, reported = torch.load(run / "members" / "member_0" / "model.pt", weights_only=True), member["test_loss"]
    else:
        state, reported = torch.load(run / "model-last.pt", weights_only=True), summary["test_loss"]
    assert reported == pytest.approx(_test_loss(state, data, smoothed), rel=1e-4)
    assert abs(reported - _test_loss(state, data, nn.CrossEntropyLoss())) > 1e-3
    # smoothing's floor: the entropy of the smoothed target, never reached by plain cross-entropy's bound 0
    q = np.array([1 - SMOOTHING + SMOOTHING / 4] + [SMOOTHING / 4] * 3)
    assert summary["history"][-1]["train_loss"] > float(-(q * np.log(q)).sum()) - 1e-3


# Measured 2026-12-07 on the 2-core VM (shared, loaded): validation MSE 0.0127 (sync) and 0.0139
# (async) after 8 epochs, against the noise floor 0.01; the bound leaves a wide margin.
REGRESSION_VAL_LOSS = 0.03


@pytest.mark.parametrize("strategy,loss", [("sync", "mse"), ("async", nn.MSELoss())])
def test_regression_reaches_a_validation_loss(ray_cluster, tmp_path, strategy, loss):
    data = linear_targets()
    cfg = _cfg(tmp_path, strategy, "reg", run={"epochs": 8}, optim={"optimizer": "adam", "lr": 0.01})
    out = io.StringIO()
    summary = ray_train.fit(cfg, model=linear_net, data=data, loss=loss, out=out)
    print(strategy, summary["val_loss"], summary["test_mae"])
    assert summary["val_loss"] < REGRESSION_VAL_LOSS
    assert summary["test_accuracy"] is None and summary["test_errors"] is None
    assert 0 < summary["test_mae"] < 0.2 and summary["best_test_mae"] < 0.2
    last = summary["history"][-1]
    assert last["train_accuracy"] is None and last["val_mae"] < 0.2 and last["train_mae"] > 0
    # model selection reads the validation loss: the best epoch is the one with the lowest
    best = min(summary["history"], key=lambda r: r["val_loss"])
    assert summary["best_epoch"] == best["epoch"] and summary["val_loss"] == pytest.approx(best["val_loss"])
    lines = out.getvalue().splitlines()
    epoch = [ln for ln in lines if ln.startswith("epoch")]
    assert epoch and all(" mae " in ln and "acc" not in ln for ln in epoch), epoch
    assert any(ln.startswith("done: test loss") and "mean absolute error" in ln for ln in lines), lines[-3:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(tmp_path / "reg")).Reload().Tags()["scalars"]
    assert {"train/mae", "val/mae", "test/mae", "val/loss"} <= set(tags) and "train/accuracy" not in tags


def test_an_ensemble_of_regressors_averages_its_members(ray_cluster, tmp_path):
    data = linear_targets(seed=1)
    cfg = _cfg(tmp_path, "ensemble", "avg", run={"epochs": 3}, optim={"optimizer": "adam", "lr": 0.01})
    summary = ray_train.fit(cfg, model=linear_net, data=data, loss="mse", tensorboard=False, out=io.StringIO())
    losses = [m["test_loss"] for m in summary["members"]]
    # the mean squared error is convex: the average's loss is at most the members' mean (Jensen)
    assert summary["test_loss"] == summary["average_loss"] <= np.mean(losses) + 1e-6
    assert summary["test_accuracy"] is None and summary["test_mae"] == summary["average_mae"]
    assert json.loads((tmp_path / "avg" / "ensemble.json").read_text())["regression"] is True


MY_LOSS = '''
import torch


def half_mse(outputs, targets):
    return 0.5 * torch.mean((outputs - targets) ** 2)
'''


def test_cli_loss_by_module_path_on_float_targets_stops_at_the_target_loss(tmp_path):
    (tmp_path / "mylosses.py").write_text(MY_LOSS)
    d = linear_targets(seed=2)
    np.savez(tmp_path / "linear.npz", x_train=d.x_train, y_train=d.y_train, x_test=d.x_test, y_test=d.y_test)
    env = {**os.environ, "PYTHONPATH": ROOT, "RAY_ADDRESS": ""}
    run = subprocess.run([sys.executable, "-m", "ray_train", "--dataset", "npz:linear.npz", "--model", "mlp30",
                          "--loss", "mylosses:half_mse", "--target-loss", "0.05", "--epochs", "30", "--batch-size", "16",
                          "--optimizer", "adam", "--lr", "0.01", "--cpus-per-replica", "0.5", "--storage", "runs",
                          "--run-name", "reg", "--no-tensorboard"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((tmp_path / "runs" / "reg" / "summary.json").read_text())
    assert summary["stopped"] == "target_loss" and summary["epochs"] < 30, summary["stop_reason"]
    assert summary["history"][-1]["val_loss"] <= 0.05 < summary["history"][0]["train_loss"]
    assert "stopped: validation loss" in run.stdout


@pytest.mark.parametrize("kwargs,needle", [
    ({"loss": "log_likelihood"}, "model.loss: log_likelihood needs integer class labels, but linear's targets are "
                                 "floats (regression); use mse or l1"),
    ({"loss": "mse", "run": {"target_accuracy": 0.9}}, "run.target_accuracy: accuracy needs class labels"),
    ({"loss": "mylosses_missing:fn"}, "model.loss: cannot import 'mylosses_missing:fn'"),
    ({"loss": 3}, "loss: expected a loss name"),
])
def test_loss_and_targets_mistakes_are_one_error_before_ray(tmp_path, kwargs, needle):
    cfg = _cfg(tmp_path, "sync", "bad", run=kwargs.pop("run", {}))
    with pytest.raises(ConfigError) as err:
        ray_train.fit(cfg, model=linear_net, data=linear_targets(), **kwargs)
    assert needle in str(err.value)


def test_a_regression_loss_on_class_labels_and_loss_config_mistakes(tmp_path, capsys):
    from tests.conftest import one_line_error

    with pytest.raises(ConfigError, match="model.loss: mse is for float targets"):
        ray_train.fit(_cfg(tmp_path, "sync", "bad"), model=mlp4, data=ray_train.Dataset("b", *blobs()), loss="mse")
    line = one_line_error(capsys, ["--loss", "no such loss", "--storage", str(tmp_path)])
    assert "model.loss: unknown value 'no such loss'" in line and "package.module:function" in line
    line = one_line_error(capsys, ["--target-loss", "-1", "--storage", str(tmp_path)])
    assert "run.target_loss: must be >= 0" in line
    with pytest.raises(ConfigError, match="model.loss: 'custom' means a callable"):
        ray_train.config.build_config({"model": {"loss": "custom"}})
    with pytest.raises(ConfigError, match="model: unknown key 'loss_fn'"):
        ray_train.config.build_config({"model": {"loss_fn": "x"}})


@pytest.mark.parametrize("strategy", ["local", "hogwild", "sandblaster"])
def test_own_loss_and_regression_under_the_other_strategies(ray_cluster, tmp_path, strategy):
    data = linear_targets(seed=3)
    cfg = _cfg(tmp_path, strategy, "other", run={"epochs": 4}, optim={"optimizer": "adam", "lr": 0.01})
    if strategy == "sandblaster":
        cfg["optim"] = {}  # L-BFGS, its only optimizer
    summary = ray_train.fit(cfg, model=linear_net, data=data, loss=nn.MSELoss(), tensorboard=False, out=io.StringIO())
    first = summary["history"][0]["train_loss"]
    assert summary["val_loss"] < min(0.1, first / 3), (first, summary["val_loss"])
    assert summary["test_accuracy"] is None and summary["test_mae"] < 0.3
    # every strategy's model.pt predicts (a callable's run needs the callable: the folder has its weights)
    result = ray_train.predict(str(tmp_path / "other"), data.x_test, labels=data.y_test, model=linear_net)
    assert len(result["rows"]) == len(data.y_test) and result["mae"] < 0.3
