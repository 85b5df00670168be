"""The public API with a user's own network and data: ray_train.fit with a lambda or a closure and
numpy arrays of any shape and class count, under every strategy; from the command line,
--model package.module:factory (imported on the driver and in every replica) with --dataset
idx:DIR and --dataset npz:FILE; and the mistakes such a user makes, each one clear line."""
import gzip
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
from ray_train.errors import UserError
from tests.conftest import ROOT

CLASSES, SHAPE = 4, (3, 8, 8)


def blobs(n_train=480, n_test=160, seed=0, shape=SHAPE, classes=CLASSES):
    """Separable toy data: each class a fixed random pattern plus noise."""
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((classes, *shape)).astype(np.float32)

    def split(n):
        y = rng.integers(0, classes, n)
        return (protos[y] + 0.7 * rng.standard_normal((n, *shape))).astype(np.float32), y

    (x_train, y_train), (x_test, y_test) = split(n_train), split(n_test)
    return x_train, y_train, x_test, y_test


def _cfg(tmp_path, strategy, name, **extra):
    cfg = {"run": {"strategy": strategy, "epochs": 3, "batch_size": 16, "storage": str(tmp_path), "run_name": name,
                   "log_every": 5},
           "resources": {"replicas": 2, "cpus_per_replica": 0.5}, "optim": {"optimizer": "momentum", "lr": 0.05}}
    if strategy == "async":
        cfg["optim"] = {"optimizer": "adagrad", "lr": 0.05}
    if strategy == "ensemble":
        cfg["resources"] = {"cpus_per_replica": 0.5}
        cfg["ensemble"] = {"members": 2}
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


@pytest.mark.parametrize("strategy", ["sync", "async", "ensemble"])
def test_fit_with_a_lambda_and_numpy_arrays(ray_cluster, tmp_path, strategy):
    data = ray_train.Dataset("blobs", *blobs())
    assert data.num_classes == CLASSES and tuple(data.input_shape) == SHAPE
    summary = ray_train.fit(_cfg(tmp_path, strategy, "lambda"), data=data, tensorboard=False, out=io.StringIO(),
                            model=lambda: nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.ReLU(), nn.Linear(32, 4)))
    print(strategy, summary["test_accuracy"])
    assert summary["test_accuracy"] > 0.8  # chance is 0.25
    assert (summary["model"], summary["dataset"], summary["strategy"]) == ("custom", "blobs", strategy)
    on_disk = json.loads((tmp_path / "lambda" / "summary.json").read_text())
    assert on_disk["test_errors"] == summary["test_errors"]


def test_fit_with_a_closure_and_a_config_file(ray_cluster, tmp_path):
    hidden = 24

    class Net(nn.Module):  # defined in the test: travels to the replicas by value
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(192, hidden), nn.Tanh(), nn.Linear(hidden, CLASSES))

        def forward(self, x):
            return self.body(x)

    path = tmp_path / "job.yaml"
    path.write_text(f"run: {{epochs: 2, batch_size: 16, storage: {tmp_path}, run_name: closure}}\n"
                    "resources: {replicas: 2, cpus_per_replica: 0.5}\noptim: {lr: 0.05}\n")
    summary = ray_train.fit(str(path), model=lambda: Net(), data=ray_train.Dataset("blobs", *blobs(seed=1)),
                            tensorboard=False, out=io.StringIO())
    assert summary["test_accuracy"] > 0.8 and summary["epochs"] == 2
    model = torch.load(tmp_path / "closure" / "model.pt", weights_only=True)
    assert model["model"]["body.1.weight"].shape == (hidden, 192) and model["input_shape"] == list(SHAPE)


def test_a_registry_network_on_other_images(ray_cluster, tmp_path):
    # net_d on 16x16 three-channel images with 4 classes: the registry adapts the input and output layers
    data = ray_train.Dataset("rgb16", *blobs(shape=(3, 16, 16), seed=2))
    summary = ray_train.fit(_cfg(tmp_path, "sync", "netd", run={"epochs": 2}), model="net_d", data=data,
                            tensorboard=False, out=io.StringIO())
    assert summary["test_accuracy"] > 0.5


@pytest.mark.parametrize("model,needle", [
    (lambda: nn.Linear(192, 4), "does not build or run"),  # no Flatten: a 4-d input fails in the replica's shape
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(192, 7)), "expected [2, 4]"),
    (lambda: "not a module", "not a torch.nn.Module"),
])
def test_a_network_that_does_not_fit_the_data_is_one_error_before_ray(tmp_path, model, needle):
    with pytest.raises(UserError) as err:
        ray_train.fit(_cfg(tmp_path, "sync", "bad"), model=model, data=ray_train.Dataset("blobs", *blobs()))
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "bad").exists()


def test_a_batch_larger_than_a_replicas_share_is_an_error(tmp_path):
    with pytest.raises(UserError) as err:
        ray_train.fit(_cfg(tmp_path, "sync", "big", run={"batch_size": 512}),
                      model=lambda: nn.Sequential(nn.Flatten(), nn.Linear(192, 4)),
                      data=ray_train.Dataset("blobs", *blobs()))
    assert "run.batch_size: 512 is larger than a replica's share of the training set (216 examples" in str(err.value)


# -- the command line: a user's module, IDX folders and .npz files ------------------------------------
USER_MODULE = '''
import torch.nn as nn


def tiny():
    """16x16 grey images, 3 classes."""
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 3))
'''


def _idx(path, array):
    kind = 0x08
    header = bytes([0, 0, kind, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _cli(cwd, *argv):
    env = {**os.environ, "PYTHONPATH": ROOT, "RAY_ADDRESS": ""}
    return subprocess.run([sys.executable, "-m", "ray_train", *argv, "--no-tensorboard"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_with_a_users_factory_and_idx_and_npz_data(tmp_path):
    (tmp_path / "mynets.py").write_text(USER_MODULE)
    x_train, y_train, x_test, y_test = blobs(n_train=600, n_test=150, shape=(16, 16), classes=3, seed=3)
    folder = tmp_path / "digits3"
    folder.mkdir()
    scale = lambda x: np.clip(x * 40 + 128, 0, 255)  # noqa: E731  (uint8 pixels, as IDX files hold)
    for name, array in (("train-images-idx3-ubyte.gz", scale(x_train)), ("train-labels-idx1-ubyte.gz", y_train),
                        ("t10k-images-idx3-ubyte.gz", scale(x_test)), ("t10k-labels-idx1-ubyte.gz", y_test)):
        _idx(folder / name, array)
    np.savez(tmp_path / "blobs.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    common = ["--epochs", "3", "--batch-size", "16", "--cpus-per-replica", "0.5", "--storage", "runs", "--lr", "0.05"]
    # the factory comes from the folder the command runs in: importable on the driver and in the replicas
    idx = _cli(tmp_path, *common, "--model", "mynets:tiny", "--dataset", "idx:digits3", "--run-name", "idx")
    assert idx.returncode == 0, idx.stderr[-2000:]
    summary = json.loads((tmp_path / "runs" / "idx" / "summary.json").read_text())
    assert (summary["model"], summary["dataset"]) == ("mynets:tiny", "digits3")
    assert summary["test_accuracy"] > 0.7  # chance is 1/3
    npz = _cli(tmp_path, *common, "--model", "mlp30", "--dataset", "npz:blobs.npz", "--run-name", "npz")
    assert npz.returncode == 0, npz.stderr[-2000:]
    summary = json.loads((tmp_path / "runs" / "npz" / "summary.json").read_text())
    assert summary["dataset"] == "blobs" and summary["test_accuracy"] > 0.7
    bad = _cli(tmp_path, "--model", "mynets:nope", "--dataset", "npz:blobs.npz")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "nope" in bad.stderr
