"""python -m ray_train compare: every regime on one job, side by side. A tiny job (mlp30, one
replica, two epochs of mnist5k) through sync and local, plus a regime whose config is wrong for
it: the table, the JSON, the plot and one TensorBoard run per regime are written, and the wrong
regime is a failed row while the others run."""
import io
import json
import os

import pytest

from ray_train.cli.compare import curve, default_target, parse_strategies, run_compare, to_target, with_target
from tests.conftest import one_line_error


@pytest.mark.parametrize("argv,needle", [
    (["compare", "--strategies", "sync,warp"], "unknown regime 'warp'"),
    (["compare", "--strategies", "sync,sync"], "named twice"),
    (["compare", "--target-accuracy", "1.5"], "--target-accuracy"),
    (["compare", "--epochs", "0"], "run.epochs"),
    (["compare", "--bogus"], "unrecognized arguments"),
])
def test_user_errors_are_one_line_before_ray(capsys, argv, needle):
    assert needle in one_line_error(capsys, argv)


def test_strategies_keep_their_order():
    assert parse_strategies(" local, sync ") == ["local", "sync"]


def _summary(accs, train_s, samples, comm=None):
    history = [{"epoch": i + 1, "val_accuracy": a, "test_accuracy": None, "train_s": t, "samples": s,
                "comm_bytes": 0 if comm is None else comm[i]}
               for i, (a, t, s) in enumerate(zip(accs, train_s, samples))]
    return {"history": history}


def test_time_and_samples_to_target_are_the_first_epoch_at_or_above_it():
    c = curve(_summary([0.5, 0.8, 0.7, 0.9], [1.0, 2.0, 3.0, 4.0], [10, 20, 30, 40]))
    assert to_target(c, 0.8) == (2.0, 20)
    assert to_target(c, 0.85) == (4.0, 40)
    assert to_target(c, 0.95) == (None, None)


def test_default_target_is_the_lowest_best_so_every_regime_reaches_it():
    rows = [{"status": "ok", "best_accuracy": 0.9, "curve": curve(_summary([0.6, 0.9], [1, 2], [5, 10]))},
            {"status": "ok", "best_accuracy": 0.8, "curve": curve(_summary([0.8, 0.7], [3, 6], [7, 14]))},
            {"status": "failed", "best_accuracy": None, "curve": None}]
    target = default_target(rows)
    assert target == 0.8
    with_target(rows, target)
    assert (rows[0]["time_to_target_s"], rows[1]["time_to_target_s"]) == (2, 3)


def test_an_ensemble_history_without_running_totals_is_spread_over_its_epochs():
    summary = {"history": [{"epoch": 1, "val_accuracy": 0.5}, {"epoch": 2, "val_accuracy": 0.7}],
               "train_s": 10.0, "train_samples": 400}
    c = curve(summary)
    assert c["train_s"] == [5.0, 10.0] and c["samples"] == [200, 400] and c["comm_bytes"] == [0, 0]


def test_compare_writes_table_plot_and_a_tensorboard_run_per_regime(ray_cluster, tmp_path):
    values = {"run": {"epochs": 2, "batch_size": 64, "storage": str(tmp_path), "log_every": 20},
              "model": {"name": "mlp30"}, "resources": {"replicas": 1},
              "sandblaster": {}}
    # sandblaster with momentum is a config error for that regime only
    overrides = {"optim": {"optimizer": "momentum"}}
    out = io.StringIO()
    out_dir, rows = run_compare(values, overrides, ["sync", "sandblaster", "local"], None, out=out)
    print(out.getvalue()[-2000:])
    assert [r["strategy"] for r in rows] == ["sync", "sandblaster", "local"]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "L-BFGS" in rows[1]["reason"]
    table = json.loads(open(os.path.join(out_dir, "table.json")).read())
    ok = [r for r in table["regimes"] if r["status"] == "ok"]
    assert table["target_accuracy"] == min(r["best_accuracy"] for r in ok)
    for r in ok:  # the target is one every regime reached
        assert r["time_to_target_s"] is not None and r["samples_to_target"] > 0
        assert len(r["curve"]["accuracy"]) == 2 and r["curve"]["samples"][1] > r["curve"]["samples"][0]
    md = open(os.path.join(out_dir, "table.md")).read()
    assert "| sync |" in md and "| local |" in md and "failed: error: optim.optimizer" in md
    assert os.path.getsize(os.path.join(out_dir, "accuracy.png")) > 10_000
    from ray_train.metrics.tensorboard import logged_steps

    for strategy in ("sync", "local"):
        tags = logged_steps(os.path.join(out_dir, strategy))
        assert "val/accuracy" in tags and "train/loss" in tags, tags
    assert "compare [3/3] local: done" in out.getvalue()
    # which cluster once, no TensorBoard hint per regime (main prints one for all), each regime its own line
    text = out.getvalue()
    assert text.count("cluster: ") == 1 and "watch it" not in text
    assert text.count("sync SGD: 1 replica ") == 1 and "model averaging (local SGD): 1 replica " in text
