"""Every preset in configs/ loads and validates; the default job is what the README says."""
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
