"""Nielsen's and the seed article's techniques, each against its formula: L2 lambda as per-step
weight decay (network2 and network3), the three costs, N(0, 1) initialisation, L1, the max-norm
projection, input standardisation from training statistics only, and the overfit check."""
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ray_train.api import overfit_check
from ray_train.cluster import ReplicaContext
from ray_train.config import DataConfig, build_config
from ray_train.data.dataset import standardized
from ray_train.data.loaders import load_dataset
from ray_train.errors import ConfigError
from ray_train.network import model_factory
from ray_train.worker import losses
from ray_train.worker.optim import max_norm_, weight_decay_from_lambda
from ray_train.worker.replica import Replica


def test_weight_decay_from_nielsens_lambda():
    # ch. 3 (network2.py): C0 + lambda/2n sum w^2 -> lambda/n: lambda 5 over 50,000 images
    assert weight_decay_from_lambda(5.0, 50_000, 10, "network2") == pytest.approx(1e-4)
    # ch. 6 (network3.py): + 0.5 lambda sum w^2 / num_training_batches -> lambda m / n
    assert weight_decay_from_lambda(0.1, 50_000, 10, "network3") == pytest.approx(2e-5)  # net D
    assert weight_decay_from_lambda(0.1, 250_000, 10, "network3") == pytest.approx(4e-6)  # net E (expanded)


def test_network3_decay_is_the_gradient_of_its_cost():
    """One SGD step on network3's cost (mean batch cost + 0.5 lambda sum w^2 / (n/m)) equals one
    step of the mean batch cost with the derived weight decay."""
    lmbda, n, m, eta = 0.1, 500, 10, 0.03
    torch.manual_seed(0)
    w0, x, y = torch.randn(3, 4), torch.randn(m, 4), torch.randint(0, 3, (m,))
    w = w0.clone().requires_grad_()
    (F.cross_entropy(x @ w.T, y) + 0.5 * lmbda * (w ** 2).sum() / (n / m)).backward()
    by_cost = w0 - eta * w.grad
    v = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([v], lr=eta, weight_decay=weight_decay_from_lambda(lmbda, n, m, "network3"))
    F.cross_entropy(x @ v.T, y).backward()
    opt.step()
    assert torch.allclose(v.detach(), by_cost, atol=1e-7)


def test_presets_state_lambda_and_the_run_derives_the_decay():
    cfg = build_config(overrides={"optim": {"l2_lambda": 0.1, "l2_cost": "network3"}, "run": {"batch_size": 5},
                                  "resources": {"replicas": 2}})
    from ray_train.api import _with_lambda

    data = load_dataset(cfg.data)  # mnist5k: 3,500 training images after the validation split
    assert _with_lambda(cfg, data).optim.weight_decay == pytest.approx(0.1 * 10 / 3500)
    with pytest.raises(ConfigError, match="not both"):
        build_config(overrides={"optim": {"l2_lambda": 0.1, "weight_decay": 1e-4}})


def test_the_three_costs():
    z, y = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]]), torch.tensor([0, 2])
    a, t = torch.sigmoid(z), F.one_hot(y, 3).float()
    assert losses.summed("quadratic", z, y) == pytest.approx(float(0.5 * ((a - t) ** 2).sum()))
    ce = -(t * torch.log(a) + (1 - t) * torch.log(1 - a)).sum()
    assert losses.summed("cross_entropy", z, y) == pytest.approx(float(ce), rel=1e-6)
    nll = -torch.log_softmax(z, 1)[torch.arange(2), y].sum()
    assert losses.summed("log_likelihood", z, y) == pytest.approx(float(nll), rel=1e-6)
    for name in losses.CLASSIFICATION_LOSSES:
        assert losses.loss(name, z, y) == pytest.approx(float(losses.summed(name, z, y)) / 2, rel=1e-6)
    t = torch.tensor([[1.0, 0.0, 0.5], [0.5, 1.0, -1.0]])
    assert losses.summed("mse", z, t) == pytest.approx(float(((z - t) ** 2).mean(1).sum()), rel=1e-6)
    assert losses.summed("l1", z, t) == pytest.approx(float((z - t).abs().mean(1).sum()), rel=1e-6)
    for name in losses.REGRESSION_LOSSES:
        assert losses.loss(name, z, t) == pytest.approx(float(losses.summed(name, z, t)) / 2, rel=1e-6)


def test_normal_init_is_n01_and_scaled_is_one_over_root_n_in():
    data = load_dataset(DataConfig(dataset="synthetic", synthetic_train=64, synthetic_test=8))
    for init, std in (("normal", 1.0), ("scaled", 1 / np.sqrt(784))):
        cfg = build_config(overrides={"model": {"name": "mlp100", "init": init}})
        torch.manual_seed(0)
        w = next(p for n, p in model_factory(cfg, data)().named_parameters() if p.dim() == 2)  # 784 -> 100
        assert float(w.detach().std()) == pytest.approx(std, rel=0.02), init
        assert abs(float(w.detach().mean())) < 0.1 * std


def _replica(optim, steps=1):
    cfg = build_config(overrides={"run": {"batch_size": 16}, "model": {"name": "mlp30"},
                                  "data": {"dataset": "synthetic", "synthetic_train": 64, "synthetic_test": 16},
                                  "optim": {"optimizer": "sgd", "lr": 0.5, **optim}, "resources": {"replicas": 1}})
    data = load_dataset(cfg.data)
    r = Replica(ReplicaContext(0, 1, 1, 0, 0), cfg, data, model_factory(cfg, data))
    r.set_epoch(0, 0.5)
    return r, data


def test_l1_adds_l1_times_sign_of_each_weight_to_the_gradient():
    plain, data = _replica({})
    l1, _ = _replica({"l1": 0.01})
    idx = np.arange(16)
    plain.gradients(*plain.batch(idx))
    l1.gradients(*l1.batch(idx))
    for (name, p), q in zip(plain.model.named_parameters(), l1.model.parameters()):
        expected = p.grad + (0.01 * torch.sign(p.detach()) if p.dim() > 1 else 0)
        assert torch.allclose(q.grad, expected, atol=1e-7), name


def test_max_norm_projects_each_units_incoming_weights():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 10.0]]))
    b = torch.nn.Parameter(torch.tensor([5.0, 5.0, 5.0]))
    max_norm_([w, b], 1.0)
    assert torch.allclose(w.norm(dim=1), torch.tensor([1.0, 0.5, 1.0]))
    assert torch.allclose(w[0], torch.tensor([0.6, 0.8])) and torch.equal(b.detach(), torch.full((3,), 5.0))
    r, _ = _replica({"max_norm": 0.5, "lr": 5.0})
    r.train_steps(3)
    for p in r.params:
        if p.dim() > 1:
            assert float(p.detach().reshape(len(p), -1).norm(dim=1).max()) <= 0.5 + 1e-5


def test_standardisation_uses_training_statistics_only():
    data = load_dataset(DataConfig(validation=0.1))
    std = standardized(data)
    x = data.x_train.astype(np.float32) / 255
    mean, sd = x.mean(0), x.std(0)
    sd[sd < 1e-6] = 1
    assert np.allclose(std.standardize["mean"], mean, atol=1e-6)
    assert np.allclose(std.x_test, (data.x_test / np.float32(255) - mean) / sd, rtol=1e-4, atol=1e-4)
    assert np.allclose(std.x_val, (data.x_val / np.float32(255) - mean) / sd, rtol=1e-4, atol=1e-4)
    # changing the test images changes nothing in the statistics
    other = standardized(type(data)(data.name, data.x_train, data.y_train, 255 - data.x_test, data.y_test, 10,
                                    data.x_val, data.y_val))
    assert np.array_equal(other.standardize["mean"], std.standardize["mean"])
    assert abs(float(std.x_train.mean())) < 1e-4


@pytest.mark.parametrize("lr,passed", [(0.5, True), (1e-6, False)])
def test_overfit_check(ray_cluster, tmp_path, monkeypatch, lr, passed):
    if not passed:  # a rate this small learns nothing in any number of steps: a few show it
        monkeypatch.setattr("ray_train.api.OVERFIT_STEPS", 50)
    cfg = {"run": {"storage": str(tmp_path)}, "model": {"name": "mlp30"}, "optim": {"optimizer": "sgd", "lr": lr}}
    result = overfit_check(cfg, progress=False, out=io.StringIO())
    assert result["examples"] == 100 and result["passed"] is passed
    assert (result["train_error"] <= 0.01) is passed


def test_slow_replica_sleeps_factor_minus_one_times_its_work(monkeypatch):
    """--slow-replica RANK:FACTOR: only RANK's steps stretch, to FACTOR times their work."""
    import ray_train.worker.replica as replica

    clock, slept = [10.0], []
    monkeypatch.setattr(replica.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(replica.time, "sleep", lambda s: (slept.append(s), clock.__setitem__(0, clock[0] + s)))
    cfg = build_config({"run": {"slow_replica": "1:3"}})
    factors = [replica.slow_factor(cfg, rank) for rank in range(2)]
    assert factors == [1.0, 3.0]
    clock[0] = 10.5  # a step that began at 10.0 did 0.5 s of work
    assert replica.straggle(factors[1], 10.0) == pytest.approx(1500.0) and slept == [pytest.approx(1.0)]
    assert replica.straggle(factors[0], clock[0] - 0.25) == pytest.approx(250.0) and len(slept) == 1
    with pytest.raises(ConfigError, match="run.slow_replica"):
        build_config({"run": {"slow_replica": "1:0.5"}})
