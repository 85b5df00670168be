"""Sandblaster L-BFGS (--strategy sandblaster). The function L-BFGS minimises does not depend on who
evaluates the work units (units are summed in unit order, each evaluated the same way on any
replica), so runs that differ only in dispatch, a slowed replica or a killed replica end with the
same parameters as the undisturbed run: those comparisons are exact, not statistical."""
import json
import os
import sys
import tempfile

import pytest
import ray.cloudpickle
import torch

from ray_train.cli import main
from ray_train.config import build_config
from ray_train.errors import ConfigError
from ray_train.strategies.sandblaster.engine import SandblasterEngine
from ray_train.strategies.sandblaster.worker import SandblasterWorker

EPOCHS, ITERATIONS, UNITS = 2, 4, 16


def _argv(storage, name, *extra, epochs=EPOCHS):
    return ["--strategy", "sandblaster", "--model", "mlp30", "--dataset", "mnist5k", "--seed", "1",
            "--replicas", "2", "--cpus-per-replica", "0.5", "--work-units", str(UNITS),
            "--lbfgs-iterations", str(ITERATIONS), "--epochs", str(epochs), "--no-progress", "--no-tensorboard",
            "--storage", str(storage), "--run-name", name, *extra]


def _run(storage, name, *extra, epochs=EPOCHS) -> dict:
    assert main(_argv(storage, name, *extra, epochs=epochs)) == 0
    return json.loads((storage / name / "summary.json").read_text())


def _max_diff(storage, a, b) -> float:
    pa, pb = (torch.load(storage / run / "model-last.pt", weights_only=True)["model"] for run in (a, b))
    return max(float((pa[k] - pb[k]).abs().max()) for k in pa)


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    storage = tmp_path_factory.mktemp("sandblaster")
    return storage, _run(storage, "ref")


def test_trains_and_reports_iterations_units_and_bytes(reference):
    _, s = reference
    print({k: s[k] for k in ("iterations", "function_evaluations", "work_units", "backup_units", "backup_wins",
                             "units_per_replica", "comm_bytes", "test_accuracy", "train_samples")})
    assert s["stopped"] == "epochs" and s["iterations"] == EPOCHS * ITERATIONS == s["steps"]
    assert s["function_evaluations"] >= s["iterations"]
    assert s["work_units"] == UNITS * s["function_evaluations"] == sum(s["units_per_replica"].values())
    assert s["train_samples"] == 3500 * s["function_evaluations"]  # the whole training set per evaluation
    # at least: every replica fetched the parameters of some evaluations and returned gradients
    params = sum(p.numel() for p in torch.load(reference[0] / "ref" / "model.pt", weights_only=True)["model"].values())
    assert s["comm_bytes"] >= s["work_units"] * 4 * params
    losses = [h["train_loss"] for h in s["history"]]
    assert losses[1] < losses[0] and s["test_accuracy"] >= 0.7


def test_equals_torch_lbfgs_on_the_whole_batch_in_one_process(reference):
    """The distributed objective (units summed / batch + 0.5 wd |w|^2 on weights) and its gradient
    are the single-process ones: the same LBFGS settings on one process follow the same path (up
    to float summation order)."""
    from ray_train.data.loaders import load_dataset
    from ray_train.network import model_factory
    from ray_train.strategies.sandblaster.engine import MAX_EVALS
    from ray_train.worker import losses
    from ray_train.worker.batches import to_tensor

    storage, _ = reference
    wd, iterations = 1e-3, 4
    s = _run(storage, "wd", "--weight-decay", str(wd), "--lbfgs-iterations", str(iterations), epochs=1)
    cfg = build_config(overrides={"run": {"strategy": "sandblaster", "seed": 1}, "model": {"name": "mlp30"}})
    data = load_dataset(cfg.data, seed=1)
    torch.manual_seed(1)
    model = model_factory(cfg, data)().eval()
    x, y = to_tensor(data.x_train), torch.from_numpy(data.y_train)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, history_size=10, max_iter=1, max_eval=MAX_EVALS,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = losses.summed("log_likelihood", model(x), y) / len(y)
        loss = loss + 0.5 * wd * sum((p * p).sum() for p in model.parameters() if p.dim() > 1)
        loss.backward()
        return loss

    for _ in range(iterations):
        opt.step(closure)
    got = torch.load(storage / "wd" / "model-last.pt", weights_only=True)["model"]
    diff = max(float((got[k] - v).abs().max()) for k, v in model.state_dict().items())
    print(f"sandblaster vs one-process LBFGS after {iterations} iterations (weight decay {wd}): max abs diff {diff:.3g}")
    assert s["iterations"] == iterations and diff <= 1e-4


def test_resumed_run_continues_exactly(reference):
    storage, _ = reference
    _run(storage, "half", epochs=1)
    assert main(["--resume", str(storage / "half"), "--epochs", str(EPOCHS), "--no-progress", "--no-tensorboard"]) == 0
    resumed = json.loads((storage / "half" / "summary.json").read_text())
    diff = _max_diff(storage, "ref", "half")
    print(f"resumed vs uninterrupted: max abs parameter difference {diff:.3g}")
    assert resumed["iterations"] == EPOCHS * ITERATIONS and diff <= 1e-6


def test_a_slow_replica_takes_fewer_units_from_the_queue_and_static_splits_evenly(reference):
    storage, ref = reference
    queue = _run(storage, "slow-queue", "--slow-replica", "1:10")
    static = _run(storage, "slow-static", "--slow-replica", "1:10", "--dispatch", "static")
    q, st = queue["units_per_replica"], static["units_per_replica"]
    print(f"units per replica with replica 1 slowed 10x: queue {q} ({queue['backup_units']} backups, "
          f"{queue['backup_wins']} won), static {st}")
    assert q["0"] >= 2 * q["1"] and queue["backup_units"] >= 1
    assert st["0"] == st["1"] == static["work_units"] // 2 and static["backup_units"] == 0
    # the same function, whoever evaluated it
    assert _max_diff(storage, "ref", "slow-queue") <= 1e-6 and _max_diff(storage, "ref", "slow-static") <= 1e-6


DIED = os.path.join(tempfile.gettempdir(), "ray_train_test_sandblaster_died")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors cannot import this test file


class DyingWorker(SandblasterWorker):
    """Replica 1's process exits at the start of its 20th work unit, once (the marker file keeps
    its restarted successor alive): a death with that unit outstanding, at a known point."""

    def evaluate(self, *args):
        if self.ctx.rank == 1 and self.units == 19 and not os.path.exists(DIED):
            open(DIED, "w").close()
            os._exit(1)
        return super().evaluate(*args)


@pytest.mark.parametrize("dispatch", ["queue", "static"])
def test_a_replica_killed_mid_iteration_loses_nothing(reference, monkeypatch, dispatch):
    """Replica 1 dies with a unit outstanding on it. Static dispatch has no backups, so the dead
    replica's units must be handed out again; the queue may also cover them by backup copies."""
    storage, ref = reference
    if os.path.exists(DIED):
        os.remove(DIED)
    monkeypatch.setattr(SandblasterEngine, "worker_cls", DyingWorker)
    try:
        s = _run(storage, f"killed-{dispatch}", "--dispatch", dispatch)
    finally:
        died = os.path.exists(DIED)
        if died:
            os.remove(DIED)
    print(f"{dispatch}: replica 1 died at its 20th unit: failures {s['failures']}, {s['reissued_units']} units "
          f"reissued, {s['backup_wins']} backup wins, units {s['units_per_replica']}")
    assert died and s["stopped"] == "epochs" and s["iterations"] == EPOCHS * ITERATIONS
    assert len(s["failures"]) == 1 and s["failures"][0]["rank"] == 1
    assert s["reissued_units"] >= (1 if dispatch == "static" else 0)
    assert _max_diff(storage, "ref", f"killed-{dispatch}") <= 1e-6


def test_a_death_past_max_failures_gives_up(reference, monkeypatch, capsys):
    import ray

    storage, _ = reference

    def hook(event, info):
        if event == "dispatch" and info["rank"] == 1 and info["engine"].iteration == 1:
            ray.kill(info["engine"].workers[1], no_restart=False)

    monkeypatch.setattr(SandblasterEngine, "hooks", staticmethod(hook))
    assert main(_argv(storage, "give-up", "--max-failures", "0", "--dispatch", "static", epochs=1)) == 1
    err = capsys.readouterr().err
    assert "replica 1" in err and "giving up after 1 failure(s) (run.max_failures is 0)" in err, err


def test_a_sampled_batch_per_iteration(reference):
    storage, _ = reference
    s = _run(storage, "sampled", "--lbfgs-batch", "500", "--lbfgs-iterations", "3", epochs=1)
    print(f"lbfgs batch 500: {s['function_evaluations']} evaluations, train loss {s['history'][0]['train_loss']:.3f}")
    assert s["lbfgs_batch"] == 500 and s["train_samples"] == 500 * s["function_evaluations"]
    assert s["function_evaluations"] >= 3 and s["work_units"] == UNITS * s["function_evaluations"]


@pytest.mark.parametrize("flag,value,needle", [
    ("--work-units", "5000", "sandblaster.work_units: 5000 units for a batch of 3500"),
    ("--lbfgs-batch", "9999", "sandblaster.lbfgs_batch: 9999 examples"),
])
def test_units_or_batch_larger_than_the_data_is_a_one_line_error(reference, capsys, flag, value, needle):
    storage, _ = reference
    argv = [a for a in _argv(storage, f"bad{flag}") if a not in ("--work-units", str(UNITS))]
    assert main([*argv, flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("argv,needle", [
    (["--strategy", "sandblaster", "--dispatch", "fifo"], "sandblaster.dispatch"),
    (["--strategy", "sandblaster", "--work-units", "0"], "sandblaster.work_units"),
    (["--strategy", "sandblaster", "--lbfgs-history", "0"], "sandblaster.history"),
    (["--strategy", "sandblaster", "--optimizer", "momentum"], "optim.optimizer"),
    (["--strategy", "sync", "--optimizer", "lbfgs"], "optim.optimizer"),
    (["--strategy", "sandblaster", "--slow-replica", "2:3"], "run.slow_replica"),
])
def test_config_errors_are_one_line_exit_2(capsys, argv, needle):
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err


def test_defaults():
    cfg = build_config(overrides={"run": {"strategy": "sandblaster"}})
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.sandblaster.dispatch) == ("lbfgs", 1.0, "queue")
    with pytest.raises(ConfigError, match="sandblaster.iterations"):
        build_config(overrides={"run": {"strategy": "sandblaster"}, "sandblaster": {"iterations": 1.5}})



def test_a_stationary_start_stops_as_converged(reference):
    """Zero inputs, zero weights, balanced labels: the gradient is exactly 0 at the start, so the
    first iteration's line search never runs and the run stops there, not 2 epochs of no-ops."""
    import io

    import numpy as np
    from torch import nn

    from ray_train.api import fit
    from ray_train.data.dataset import Dataset

    def zero_linear():
        net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
        for p in net.parameters():
            nn.init.zeros_(p)
        return net

    x, y = np.zeros((64, 1, 4, 4), dtype=np.float32), np.arange(64) % 4
    s = fit({"run": {"strategy": "sandblaster", "epochs": EPOCHS, "storage": str(reference[0]), "run_name": "flat"},
             "resources": {"replicas": 2, "cpus_per_replica": 0.5}, "sandblaster": {"work_units": 4, "iterations": 3},
             "data": {"validation": 0}},
            model=zero_linear, data=Dataset("flat", x, y, x[:16], y[:16], 4), tensorboard=False, progress=False, out=io.StringIO())
    assert s["stopped"] == "converged" and "L-BFGS converged after 1 iterations" in s["stop_reason"]
    assert s["iterations"] == 1 and s["epochs"] == 1 and s["function_evaluations"] == 1
