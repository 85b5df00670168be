"""The validation protocol (Nielsen; SOURCES.md): schedules, early stopping, target accuracy and
the best model read a validation split held out of the training set, never the test set; the
summary reports the test accuracy at the best-validation epoch besides the final one."""
import io

import numpy as np
import pytest
import torch

import ray_train
from ray_train.api import fit
from ray_train.config import DataConfig
from ray_train.data.loaders import load_dataset
from ray_train.errors import ConfigError


def test_default_splits():
    data = load_dataset(DataConfig())  # mnist5k: a stratified 500 of the 4,000 training digits
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (3500, 500, 1000)
    assert np.bincount(data.y_val).tolist() == [50] * 10
    assert load_dataset(DataConfig(validation=0)).y_val is None
    assert len(load_dataset(DataConfig(validation=0.2)).y_val) == 800
    assert load_dataset(DataConfig(dataset="synthetic")).y_val is None  # benchmark data: none
    with pytest.raises(ConfigError, match="data.validation"):
        DataConfig(validation=1.0)


def test_validation_images_are_not_trained_on():
    full, split = load_dataset(DataConfig(validation=0)), load_dataset(DataConfig())
    seen = {x.tobytes() for x in split.x_train}
    assert not any(x.tobytes() in seen for x in split.x_val)
    assert len(seen | {x.tobytes() for x in split.x_val}) == len({x.tobytes() for x in full.x_train})


def _fit(tmp_path, name, data):
    cfg = {"run": {"strategy": "sync", "epochs": 12, "batch_size": 32, "storage": str(tmp_path), "run_name": name},
           "model": {"name": "mlp30"},
           "optim": {"optimizer": "sgd", "lr": 0.5, "schedule": "plateau", "patience": 1, "early_stop": 3},
           "resources": {"replicas": 2, "cpus_per_replica": 0.5}}
    return fit(cfg, data=data, tensorboard=False, progress=False, out=io.StringIO())


def test_training_never_reads_the_test_set(ray_cluster, tmp_path):
    """Shuffled test labels change the reported test figures and nothing else: the same
    parameters, learning rates, stop epoch and best epoch."""
    base = load_dataset(DataConfig())
    shuffled = np.random.default_rng(0).permutation(base.y_test)
    runs = {}
    for name, y_test in (("real", base.y_test), ("shuffled", shuffled)):
        data = ray_train.Dataset("digits", base.x_train, base.y_train, base.x_test, y_test, 10, base.x_val, base.y_val)
        runs[name] = _fit(tmp_path, name, data)
    real, fake = runs["real"], runs["shuffled"]
    for key in ("epochs", "stopped", "best_epoch", "val_accuracy"):
        assert real[key] == fake[key], key
    assert [h["lr"] for h in real["history"]] == [h["lr"] for h in fake["history"]]
    assert real["test_accuracy"] > 0.8 > fake["test_accuracy"]  # the shuffled labels did reach the report
    for file in ("model.pt", "model-last.pt"):
        a, b = (torch.load(tmp_path / run / file, weights_only=True)["model"] for run in ("real", "shuffled"))
        assert all(torch.equal(a[k], b[k]) for k in a), file


def test_the_summary_reports_the_best_validation_epoch(ray_cluster, tmp_path):
    summary = _fit(tmp_path, "best", "mnist5k")
    vals = [h["val_accuracy"] for h in summary["history"]]
    best = int(np.argmax(vals))  # the first epoch with the highest validation accuracy
    assert summary["best_epoch"] == best + 1 and summary["val_accuracy"] == vals[best]
    assert summary["best_test_accuracy"] == summary["history"][best]["test_accuracy"]
    saved = torch.load(tmp_path / "best" / "model.pt", weights_only=True)
    last = torch.load(tmp_path / "best" / "model-last.pt", weights_only=True)
    assert saved["epoch"] == summary["best_epoch"] and last["epoch"] == summary["epochs"]
