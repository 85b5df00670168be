"""Model averaging (--strategy local): with H = 1 and plain SGD it is sync SGD (the mean of
w - eta g_i is w - eta mean(g_i)); with H = 8 it trains about as well."""
import io

import pytest
import torch

from ray_train.api import fit

EPOCHS = 4


def _fit(storage, name, strategy, **local):
    cfg = {"run": {"strategy": strategy, "epochs": EPOCHS, "batch_size": 32, "storage": str(storage), "run_name": name},
           "model": {"name": "mlp30"}, "optim": {"optimizer": "sgd", "lr": 0.5},
           "resources": {"replicas": 2, "cpus_per_replica": 0.5}, "local": local}
    return fit(cfg, tensorboard=False, progress=False, out=io.StringIO())


@pytest.fixture(scope="module")
def sync(ray_cluster, tmp_path_factory):
    storage = tmp_path_factory.mktemp("local")
    return storage, _fit(storage, "sync", "sync")


def test_averaging_every_step_with_plain_sgd_equals_sync(sync):
    storage, reference = sync
    local = _fit(storage, "h1", "local", average_every=1)
    a, b = (torch.load(storage / run / "model-last.pt", weights_only=True)["model"] for run in ("sync", "h1"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"local H=1 vs sync after {reference['steps']} steps: max abs difference {diff:.3g}")
    assert diff <= 1e-5
    assert local["steps"] == reference["steps"] and abs(local["test_accuracy"] - reference["test_accuracy"]) <= 0.002


def test_averaging_every_eight_steps_trains_about_as_well_as_sync(sync):
    """Both runs are deterministic (same seeds, same batches): the comparison is exact."""
    storage, reference = sync
    local = _fit(storage, "h8", "local", average_every=8)
    print(f"{EPOCHS} epochs: sync {reference['test_accuracy']:.4f}, local H=8 {local['test_accuracy']:.4f}")
    assert local["stopped"] == "epochs" and local["test_accuracy"] >= reference["test_accuracy"] - 0.01
