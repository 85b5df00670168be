"""Model averaging (--strategy local): with H = 1 and plain SGD it is sync SGD (the mean of
w - eta g_i is w - eta mean(g_i)); with H = 8 it trains about as well for an eighth of the bytes;
DiLoCo's outer step and EASGD's elastic pull train too, and a resumed run continues exactly.
Every run here is deterministic (same seeds, same batches): comparisons between runs are exact."""
import io

import pytest
import torch

from ray_train.api import fit

EPOCHS = 4


def _fit(storage, name, strategy, epochs=EPOCHS, resume=None, optim=None, **local):
    cfg = {"run": {"strategy": strategy, "epochs": epochs, "batch_size": 32, "storage": str(storage), "run_name": name,
                   "resume": resume},
           "model": {"name": "mlp30"}, "optim": optim or {"optimizer": "sgd", "lr": 0.5},
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


def _params(path):
    return torch.load(path, weights_only=True)["model"]


def _max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_averaging_every_eight_steps_trains_about_as_well_as_sync_for_an_eighth_of_the_bytes(sync):
    storage, reference = sync
    local = _fit(storage, "h8", "local", average_every=8)
    ratio = reference["comm_bytes"] / local["comm_bytes"]
    print(f"{EPOCHS} epochs: sync {reference['test_accuracy']:.4f}, local H=8 {local['test_accuracy']:.4f}; "
          f"comm bytes {reference['comm_bytes']:,} vs {local['comm_bytes']:,} ({ratio:.2f}x fewer)")
    assert local["stopped"] == "epochs" and local["test_accuracy"] >= reference["test_accuracy"] - 0.01
    assert ratio >= 8.0


def test_outer_sgd_at_rate_one_is_the_plain_average(sync):
    storage, _ = sync
    _fit(storage, "avg4", "local", epochs=2, average_every=4)
    _fit(storage, "osgd4", "local", epochs=2, average_every=4, outer_optimizer="sgd", outer_lr=1.0)
    diff = _max_diff(_params(storage / "avg4" / "model-last.pt"), _params(storage / "osgd4" / "model-last.pt"))
    assert diff <= 1e-6


def test_diloco_and_easgd_train(sync):
    """Measured (mlp30, 4 epochs, 2 replicas, H = 8): sync 0.903, DiLoCo (Nesterov 0.7/0.9) 0.922,
    EASGD (alpha 0.45) 0.882."""
    storage, reference = sync
    diloco = _fit(storage, "diloco", "local", average_every=8, outer_optimizer="nesterov")
    easgd = _fit(storage, "easgd", "local", average_every=8, elastic_alpha=0.45)
    print(f"sync {reference['test_accuracy']:.4f}, DiLoCo {diloco['test_accuracy']:.4f}, "
          f"EASGD {easgd['test_accuracy']:.4f}")
    assert diloco["test_accuracy"] >= reference["test_accuracy"] - 0.01
    assert easgd["test_accuracy"] >= reference["test_accuracy"] - 0.03
    assert easgd["comm_bytes"] == diloco["comm_bytes"] > 0  # the centre needs no bytes of its own


@pytest.mark.parametrize("mix", [{"outer_optimizer": "nesterov"}, {"elastic_alpha": 0.45}], ids=["diloco", "easgd"])
def test_a_resumed_run_continues_exactly(sync, mix):
    """H = 5 does not divide an epoch's 54 steps: the count since the last mix, every replica's own
    parameters and momentum and the outer state must all survive the checkpoint."""
    storage, _ = sync
    name, optim = f"resume-{next(iter(mix))}", {"optimizer": "momentum", "lr": 0.1}
    _fit(storage, f"{name}-straight", "local", epochs=2, optim=optim, average_every=5, **mix)
    _fit(storage, name, "local", epochs=1, optim=optim, average_every=5, **mix)
    resumed = _fit(storage, name, "local", epochs=2, resume=str(storage / name), optim=optim, average_every=5, **mix)
    assert resumed["epochs"] == 2
    diff = _max_diff(_params(storage / f"{name}-straight" / "model-last.pt"), _params(storage / name / "model-last.pt"))
    assert diff <= 1e-6
