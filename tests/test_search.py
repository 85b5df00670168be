"""python -m ray_train search: the space syntax and its errors (no Ray), the grid of the same
budget, and a real search on Ray Tune: two tiny sync trials at once, each a run folder with its
hparams for TensorBoard, and best.yaml, whose rerun gives the best trial's test accuracy exactly
(one replica, fixed seed: the runs are deterministic)."""
import io
import json
import math
import os

import pytest

from ray_train.cli.search import Param, grid_points, grid_size, parse_param, parse_space, run_search, trial_bundles
from tests.conftest import one_line_error


@pytest.mark.parametrize("space,needle", [
    ("optim.lr", "expected section.field=KIND(ARGS)"),
    ("lr=uniform(0,1)", "expected section.field=KIND(ARGS)"),
    ("optim.lr=normal(0,1)", "unknown distribution 'normal'"),
    ("optimizer.lr=uniform(0,1)", "unknown section 'optimizer'"),
    ("optim.rate=uniform(0,1)", "optim has no field 'rate'"),
    ("optim.lr=uniform(0.1)", "takes two bounds"),
    ("optim.lr=uniform(0.5,0.1)", "low bound must be below"),
    ("optim.lr=loguniform(0,0.1)", "bounds must be > 0"),
    ("optim.lr=uniform(a,b)", "must be finite numbers"),
    ("run.epochs=randint(1,2.5)", "whole numbers"),
    ("model.dropout=uniform(0,1.5)", "model.dropout=1.5 is not a valid value"),
    ("run.epochs=uniform(1,3)", "run.epochs: expected an integer"),
    ("optim.optimizer=choice(sgd,lion)", "optim.optimizer='lion' is not a valid value"),
    ("optim.optimizer=choice(sgd)", "at least two values"),
    ("run.storage=choice(a,b)", "search sets run.storage itself"),
])
def test_bad_space_strings_are_one_line_errors_before_ray(capsys, space, needle):
    assert needle in one_line_error(capsys, ["search", "--model", "mlp30", "--space", space])


@pytest.mark.parametrize("argv,needle", [
    (["search", "--model", "mlp30"], "--space: give at least one"),
    (["search", "--space", "optim.lr=uniform(0.01,0.1)", "--space", "optim.lr=uniform(0.01,0.1)"], "searched twice"),
    (["search", "--space", "optim.lr=uniform(0.01,0.1)", "--trials", "0"], "--trials"),
    (["search", "--space", "optim.lr=uniform(0.01,0.1)", "--scheduler", "pbt"], "invalid choice"),
    (["search", "--space", "optim.lr=uniform(0.01,0.1)", "--model", "resnet9000"], "model.name"),
])
def test_bad_search_options_are_one_line_errors(capsys, argv, needle):
    assert needle in one_line_error(capsys, argv)


def test_space_values_are_typed():
    assert parse_param("optim.lr=loguniform(1e-3, 1e-1)") == Param("optim", "lr", "loguniform", (1e-3, 1e-1))
    assert parse_param("run.batch_size=randint(16,64)").args == (16, 64)
    assert parse_param("optim.optimizer=choice(sgd, adam)").args == ("sgd", "adam")
    assert parse_param("data.standardize=choice(true,false)").args == (True, False)


def test_grid_of_the_same_budget_is_log_spaced_for_loguniform():
    params = parse_space(["optim.lr=loguniform(1e-3,1e-1)", "model.dropout=uniform(0,0.5)"])
    k = grid_size(params, 9)
    assert k == 3
    lr = grid_points(params[0], k)
    assert lr == pytest.approx([1e-3, 1e-2, 1e-1])
    assert grid_points(params[1], k) == pytest.approx([0.0, 0.25, 0.5])
    assert grid_points(parse_param("run.epochs=randint(1,4)"), 2) == [1, 4]
    assert grid_points(parse_param("optim.optimizer=choice(sgd,momentum,adam)"), 2) == ["sgd", "adam"]
    assert grid_size(params, 10) == round(math.sqrt(10))


def test_a_trial_reserves_an_empty_head_and_a_bundle_per_replica():
    from ray_train.config import build_config

    cfg = build_config({"resources": {"replicas": 3, "cpus_per_replica": 0.5}})
    assert trial_bundles(cfg) == [{"CPU": 0}] + [{"CPU": 0.5}] * 3
    cfg = build_config({"run": {"strategy": "async"}, "resources": {"replicas": 2}, "async": {"ps_cpus": 0.25}})
    assert trial_bundles(cfg)[-2:] == [{"CPU": 0.25}, {"CPU": 0.25}]


def test_two_trials_at_once_and_best_yaml_reruns_the_best_trial_exactly(ray_cluster, tmp_path, capfd):
    from ray_train.api import fit
    from ray_train.config import load_yaml
    from ray_train.metrics.tensorboard import logged_steps

    values = {"run": {"strategy": "sync", "epochs": 1, "batch_size": 64, "seed": 3, "storage": str(tmp_path),
                      "log_every": 20},
              "model": {"name": "mlp30"}, "optim": {"optimizer": "sgd"}, "resources": {"replicas": 1}}
    params = parse_space(["optim.lr=loguniform(0.01,0.3)"])
    out = io.StringIO()
    capfd.readouterr()
    result = run_search(values, {}, params, 2, concurrent=2, out=out)
    terminal = capfd.readouterr()  # what reached the process's own stdout and stderr: no Tune banner, no Ray line
    print(out.getvalue())
    assert (terminal.out + terminal.err).strip() == "", terminal
    assert out.getvalue().startswith("cluster: ") and all(ln.startswith("search: ")
                                                          for ln in out.getvalue().splitlines()[1:]), out.getvalue()
    assert os.path.exists(os.path.join(result["dir"], "ray.log"))
    rows = result["rows"]
    assert len(rows) == 2 and all(r["status"] == "done" for r in rows), rows
    assert rows[0]["best_accuracy"] >= rows[1]["best_accuracy"]
    lrs = [r["params"]["optim.lr"] for r in rows]
    assert lrs[0] != lrs[1] and all(0.01 <= lr <= 0.3 for lr in lrs)
    for r in rows:  # each trial is a TensorBoard run with its hparams
        tags = logged_steps(os.path.join(result["dir"], r["trial"]))
        assert "hparams/test_accuracy" in tags and "hparams/val_accuracy" in tags, tags
    saved = json.load(open(os.path.join(result["dir"], "results.json")))
    assert saved["best"] == rows[0]["trial"]
    best = load_yaml(result["best_yaml"])
    assert best["optim"]["lr"] == pytest.approx(rows[0]["params"]["optim.lr"]) and best["run"]["seed"] == 3
    rerun = fit(result["best_yaml"], tensorboard=False, progress=False, out=io.StringIO())
    trial = rows[0]["summary"]
    assert rerun["test_accuracy"] == trial["test_accuracy"]
    assert rerun["val_accuracy"] == trial["val_accuracy"]
