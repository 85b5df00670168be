"""Every preset in configs/ loads and validates; the default job is what the docs say."""
import glob
import os

import pytest

from ray_train.config import build_config, load_yaml
from tests.conftest import ROOT

PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_there_are_presets():
    names = {os.path.basename(p) for p in PRESETS}
    assert {"default.yaml", "nielsen_net_b.yaml", "nielsen_net_h.yaml"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=[os.path.basename(p) for p in PRESETS])
def test_preset_loads(path):
    cfg = build_config(load_yaml(path))
    assert cfg.run.epochs > 0 and cfg.resources.replicas > 0


def test_default_job():
    cfg = build_config(load_yaml(os.path.join(ROOT, "configs", "default.yaml")))
    assert (cfg.run.strategy, cfg.data.dataset, cfg.resources.replicas) == ("sync", "mnist5k", 2)


def test_nielsen_minibatch_is_ten_across_replicas():
    for name in ("nielsen_net_b", "nielsen_net_c", "nielsen_net_d", "nielsen_net_h", "nielsen_mlp30"):
        cfg = build_config(load_yaml(os.path.join(ROOT, "configs", f"{name}.yaml")))
        assert cfg.run.batch_size * cfg.resources.replicas == 10, name


@pytest.mark.parametrize("strategy,optimizer,lr", [("sync", "momentum", 0.05), ("ensemble", "momentum", 0.05),
                                                    ("async", "adagrad", 0.01)])
def test_each_strategy_has_its_own_default_optimizer(strategy, optimizer, lr):
    """The default job names no optimizer, so changing only --strategy gets that strategy's."""
    cfg = build_config(load_yaml(os.path.join(ROOT, "configs", "default.yaml")), {"run": {"strategy": strategy}})
    assert (cfg.optim.optimizer, cfg.optim.lr) == (optimizer, lr)


def test_explicit_choices_win_and_each_optimizer_has_its_own_rate():
    assert build_config(overrides={"run": {"strategy": "async"}, "optim": {"optimizer": "momentum"}}).optim.lr == 0.05
    assert build_config(overrides={"run": {"strategy": "async"}, "optim": {"lr": 0.2}}).optim.optimizer == "adagrad"
    assert build_config(overrides={"optim": {"optimizer": "adam"}}).optim.lr == 0.001
    assert build_config(overrides={"optim": {"optimizer": "adadelta"}}).optim.lr == 1.0
    assert build_config(overrides={"optim": {"optimizer": "adagrad", "lr": 0.3}}).optim.lr == 0.3


def test_an_ensemble_member_with_another_optimizer_takes_that_optimizers_rate():
    from ray_train.strategies.ensemble.config import member_specs

    cfg = build_config(overrides={"run": {"strategy": "ensemble"}, "optim": {"lr": 0.1},
                                  "ensemble": {"members": [{}, {"optimizer": "adam"}, {"optimizer": "adam", "lr": 0.01}]}})
    assert [(s.optimizer, s.lr) for s in member_specs(cfg)] == [("momentum", 0.1), ("adam", 0.001), ("adam", 0.01)]
