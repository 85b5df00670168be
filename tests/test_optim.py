"""ray_train.worker.optim: optimizers built from OptimConfig, L2 on weights only, the schedules and
early stopping, all checked against hand-computed values."""
import json

import pytest
import torch
from torch import nn

from ray_train.config import OptimConfig
from ray_train.errors import ConfigError
from ray_train.worker.optim import Schedule, build_optimizer, inverse_lr, param_groups, set_lr


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()


@pytest.mark.parametrize("name,cls,options", [
    ("sgd", torch.optim.SGD, {"momentum": 0.0, "nesterov": False}),
    ("momentum", torch.optim.SGD, {"momentum": 0.8, "nesterov": False}),
    ("nesterov", torch.optim.SGD, {"momentum": 0.8, "nesterov": True}),
    ("adagrad", torch.optim.Adagrad, {}),
    ("rmsprop", torch.optim.RMSprop, {"alpha": 0.9}),
    ("adadelta", torch.optim.Adadelta, {"rho": 0.95}),
    ("adam", torch.optim.Adam, {"amsgrad": False}),
    ("amsgrad", torch.optim.Adam, {"amsgrad": True}),
])
def test_each_optimizer_builds_its_torch_class_and_steps(name, cls, options):
    model = _model()
    opt = build_optimizer(model.named_parameters(), OptimConfig(optimizer=name, lr=0.01, momentum=0.8))
    assert type(opt) is cls
    for group in opt.param_groups:
        assert group["lr"] == 0.01
        assert {k: group[k] for k in options} == options
    before = [p.detach().clone() for p in model.parameters()]
    _step(model, opt)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_nesterov_without_momentum_is_a_config_error():
    with pytest.raises(ConfigError, match="optim.momentum"):
        build_optimizer(_model().named_parameters(), OptimConfig(optimizer="nesterov", momentum=0.0))


def test_param_groups_put_weight_decay_on_weights_only():
    model = _model()
    weights, biases = param_groups(model.named_parameters(), 0.1)
    assert weights["weight_decay"] == 0.1 and biases["weight_decay"] == 0.0
    assert [p.dim() for p in weights["params"]] == [2, 2]
    assert [p.dim() for p in biases["params"]] == [1, 1]


def test_weight_decay_shrinks_weights_and_leaves_biases():
    model = _model()
    opt = build_optimizer(model.named_parameters(), OptimConfig(optimizer="sgd", lr=0.5, weight_decay=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        if p.dim() > 1:  # w' = w - lr * wd * w
            torch.testing.assert_close(p.detach(), before[name] * (1 - 0.5 * 0.1))
        else:
            assert torch.equal(p.detach(), before[name])


def test_momentum_follows_nielsen_rule():
    # C(w) = 0.5 * w^2 * [1, 2]  =>  grad = w * [1, 2]; mu = 0.5, eta = 0.1, w0 = [1, 1].
    # Step 1: g = [1, 2],     v = -0.1 * g           = [-0.1, -0.2],   w = [0.9, 0.8]
    # Step 2: g = [0.9, 1.6], v = 0.5 v - 0.1 g      = [-0.14, -0.26], w = [0.76, 0.54]
    w = nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))
    opt = build_optimizer([("w", w)], OptimConfig(optimizer="momentum", lr=0.1, momentum=0.5))
    scale = torch.tensor([1.0, 2.0], dtype=torch.float64)
    expected = [[0.9, 0.8], [0.76, 0.54]]
    for want in expected:
        opt.zero_grad()
        (0.5 * w.pow(2) * scale).sum().backward()
        opt.step()
        torch.testing.assert_close(w.detach(), torch.tensor(want, dtype=torch.float64))


def test_set_lr_changes_every_group():
    model = _model()
    opt = build_optimizer(model.named_parameters(), OptimConfig(optimizer="adam", lr=0.01, weight_decay=0.1))
    assert len(opt.param_groups) == 2
    set_lr(opt, 0.003)
    assert [g["lr"] for g in opt.param_groups] == [0.003, 0.003]


def _rates(cfg: OptimConfig, epochs: int) -> list[float]:
    schedule = Schedule(cfg)
    return [schedule.lr(e) for e in range(epochs)]


def test_constant_and_step_schedules():
    assert _rates(OptimConfig(lr=0.1, schedule="constant"), 4) == [0.1] * 4
    assert _rates(OptimConfig(lr=0.8, schedule="step", step_size=2, gamma=0.5), 7) == \
        [0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1]


def test_inverse_schedule_counts_iterations():
    # eta_t = eta0 * tau / max(t, tau), t the 1-based iteration, tau = 2: flat for t <= 2, then 1/t.
    cfg = OptimConfig(lr=0.6, schedule="inverse", tau=2.0)
    assert [inverse_lr(cfg, t) for t in range(1, 8)] == pytest.approx([0.6, 0.6, 0.4, 0.3, 0.24, 0.2, 0.6 * 2 / 7])
    assert _rates(cfg, 3) == [0.6] * 3  # per epoch the driver hands out eta0; the steps apply eta_t


def test_a_replica_applies_the_inverse_schedule_every_iteration():
    """Inside an epoch the rate falls step by step: after k steps of epoch 1 (spe steps each) the
    optimizer holds eta_t of iteration spe + k."""
    from ray_train.cluster import ReplicaContext
    from ray_train.config import build_config
    from ray_train.data.loaders import load_dataset
    from ray_train.network import model_factory
    from ray_train.worker.replica import Replica

    cfg = build_config(overrides={"run": {"batch_size": 16}, "model": {"name": "mlp30"},
                                  "data": {"dataset": "synthetic", "synthetic_train": 160, "synthetic_test": 16},
                                  "optim": {"optimizer": "sgd", "lr": 0.5, "schedule": "inverse", "tau": 4.0},
                                  "resources": {"replicas": 1}})
    data = load_dataset(cfg.data)
    replica = Replica(ReplicaContext(0, 1, 1, 0, 0), cfg, data, model_factory(cfg, data))
    spe = replica.set_epoch(1, 0.5)
    for k in (1, 3):
        replica.train_steps(1 if k == 1 else 2)
        assert replica.opt.param_groups[0]["lr"] == pytest.approx(inverse_lr(cfg.optim, spe + k))
        assert replica.opt.param_groups[0]["lr"] == pytest.approx(0.5 * 4 / (spe + k))


def _observe(schedule: Schedule, accuracies: list[float]) -> list[float]:
    """The rate of each epoch, observing that epoch's accuracy after it."""
    rates = []
    for epoch, acc in enumerate(accuracies):
        rates.append(schedule.lr(epoch))
        schedule.observe(epoch, acc)
    return rates


def test_plateau_halves_after_patience_stalls_and_ends_training_at_the_floor():
    schedule = Schedule(OptimConfig(lr=1.0, schedule="plateau", patience=2, lr_floor_div=4.0))
    # 0.5 best; two stalls -> 0.5; improvement; two stalls -> 0.25 = eta0/4: training ends there.
    rates, ends = [], []
    for epoch, acc in enumerate([0.5, 0.4, 0.5, 0.6, 0.6, 0.1]):
        rates.append(schedule.lr(epoch))
        schedule.observe(epoch, acc)
        ends.append(schedule.floor_reached)
    assert rates == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]
    assert ends == [False] * 5 + [True] and schedule.lr(6) == 0.25
    assert (schedule.best, schedule.best_epoch) == (0.6, 3)


def test_plateau_ends_at_eta0_over_128_after_seven_halvings():
    """Nielsen: halve eta whenever validation accuracy stalls; stop once eta is eta0/128."""
    schedule = Schedule(OptimConfig(lr=0.5, schedule="plateau", patience=1, lr_floor_div=128.0))
    rates = []
    for epoch in range(20):
        rates.append(schedule.lr(epoch))
        schedule.observe(epoch, 0.9)  # never better than the first
        if schedule.floor_reached:
            break
    assert rates == [0.5 / 2 ** k for k in (0, 0, 1, 2, 3, 4, 5, 6)]
    assert schedule.lr(epoch + 1) == 0.5 / 128 and epoch == 7


def test_plateau_counter_resets_on_improvement():
    schedule = Schedule(OptimConfig(lr=1.0, schedule="plateau", patience=2))
    rates = _observe(schedule, [0.1, 0.1, 0.2, 0.2, 0.3])
    assert rates == [1.0] * 5


def test_other_schedules_ignore_plateaus():
    schedule = Schedule(OptimConfig(lr=1.0, schedule="constant", patience=1))
    assert _observe(schedule, [0.5, 0.4, 0.3, 0.2]) == [1.0] * 4


def test_early_stopping_after_n_stalls_and_not_before():
    schedule = Schedule(OptimConfig(lr=0.1, early_stop=3))
    stops = []
    for epoch, acc in enumerate([0.5, 0.6, 0.6, 0.55, 0.7, 0.7, 0.6, 0.65]):
        schedule.observe(epoch, acc)
        stops.append(schedule.should_stop)
    assert stops == [False] * 7 + [True]
    assert (schedule.best, schedule.best_epoch) == (0.7, 4)


def test_early_stopping_off_by_default():
    schedule = Schedule(OptimConfig(lr=0.1))
    for epoch in range(50):
        schedule.observe(epoch, 0.1)
    assert not schedule.should_stop


def test_state_dict_round_trip_gives_identical_future():
    cfg = OptimConfig(lr=1.0, schedule="plateau", patience=2, lr_floor_div=8.0, early_stop=5)
    fresh = Schedule(cfg)
    assert json.loads(json.dumps(fresh.state_dict())) == fresh.state_dict()  # no infinities
    first = Schedule(cfg)
    _observe(first, [0.3, 0.5, 0.4, 0.4, 0.45])  # halved once, one stall into the next round
    state = json.loads(json.dumps(first.state_dict()))
    second = Schedule(cfg)
    second.load_state_dict(state)
    future = [0.45, 0.5, 0.2, 0.2, 0.2, 0.2, 0.2]
    trace = []
    for s in (first, second):
        rates, stops = [], []
        for epoch, acc in enumerate(future, start=5):
            rates.append(s.lr(epoch))
            s.observe(epoch, acc)
            stops.append(s.should_stop)
        trace.append((rates, stops, s.best, s.best_epoch))
    assert trace[0] == trace[1]
    assert trace[0][0][0] == 0.5 and trace[0][1][-1] is True


def test_one_adadelta_step_is_the_rho_only_rule():
    """AdaDelta (Zeiler 2012) has no learning rate: with the default rate 1.0 one step is
    E[g2] = rho E[g2] + (1 - rho) g2; dx = -sqrt(E[dx2] + eps) / sqrt(E[g2] + eps) g;
    E[dx2] = rho E[dx2] + (1 - rho) dx2."""
    from ray_train.fields import DEFAULT_LR

    rho, eps = 0.95, 1e-6
    w = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
    opt = build_optimizer([("w", w)], OptimConfig(optimizer="adadelta", lr=DEFAULT_LR["adadelta"]))
    sq_g, sq_dx, x = torch.zeros(3), torch.zeros(3), w.detach().clone()
    for g in (torch.tensor([0.3, -0.2, 1.0]), torch.tensor([-0.1, 0.4, 0.5])):
        w.grad = g.clone()
        opt.step()
        sq_g = rho * sq_g + (1 - rho) * g * g
        dx = -torch.sqrt(sq_dx + eps) / torch.sqrt(sq_g + eps) * g
        sq_dx = rho * sq_dx + (1 - rho) * dx * dx
        x = x + dx
        assert torch.allclose(w.detach(), x, atol=1e-7)
