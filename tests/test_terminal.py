"""What a run prints (issue 23 items 1, 5, 6): the first line says which cluster and why; a run
this machine cannot hold fails before Ray starts; a model factory that fails only in the replicas
is one line naming the replica, exit 2; a killed replica's run prints the project's lines only,
Ray's own going to the run folder's ray.log."""
import os
import re
import subprocess
import sys

import pytest
import ray.cloudpickle
import torch.nn as nn

from ray_train import cluster
from tests.conftest import ROOT, one_line_error

# The factory below travels to the replicas by value: workers need not import this module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TINY = ["--model", "mlp30", "--epochs", "1", "--no-progress", "--no-tensorboard"]


# -- item 1: which cluster --------------------------------------------------------------------------
def test_the_address_comes_from_the_flag_then_ray_address_else_a_local_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.resolve_address(None) == ("local", "no --address given and RAY_ADDRESS unset")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert cluster.resolve_address(None) == ("10.0.0.5:6379", "RAY_ADDRESS=10.0.0.5:6379")
    assert cluster.resolve_address("local") == ("local", "--address local")
    assert cluster.resolve_address("auto") == ("auto", "--address auto")
    assert cluster.resolve_address("head:6380") == ("head:6380", "--address head:6380")


def test_a_bad_address_is_one_line_before_ray(capsys, tmp_path):
    line = one_line_error(capsys, ["--address", "nowhere", *TINY, "--storage", str(tmp_path)])
    assert "--address: expected local, auto or HOST:PORT, got 'nowhere'" in line


# -- item 5: fail fast ------------------------------------------------------------------------------
def test_more_replicas_than_this_machine_fails_before_ray_starts(capsys, tmp_path, monkeypatch):
    """The quoted failure: --replicas 8 on a 2-core machine came after Ray's 20 s start-up. With
    no cluster running and none named, the local cluster's CPUs are known first: ray.init must
    not even be called."""
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("ray.init was called")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_ray)
    cpus = cluster.local_resources(None)["CPU"]
    line = one_line_error(capsys, ["--replicas", str(int(cpus) + 6), *TINY, "--storage", str(tmp_path)])
    assert f"{int(cpus) + 6} CPU asked, but this machine has {cpus:g} CPU" in line
    assert not os.listdir(tmp_path)  # no run folder either
    # GPUs are counted without CUDA: here the devices the process may see, none
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    line = one_line_error(capsys, ["--gpus-per-replica", "1", *TINY, "--storage", str(tmp_path)])
    assert "2 replicas x 1 GPU = 2 GPU asked, but this machine has 0 GPU" in line
    # compare and search too: every regime, and the trials' shape, checked before their cluster
    too_many = ["--replicas", str(int(cpus) + 6), "--epochs", "1", "--no-progress", "--storage", str(tmp_path)]
    line = one_line_error(capsys, ["compare", "--strategies", "sync,async", *too_many])
    assert f"{int(cpus) + 6} CPU asked, but this machine has {cpus:g} CPU" in line
    line = one_line_error(capsys, ["search", "--space", "optim.lr=loguniform(1e-3,1e-1)", "--trials", "2", *too_many])
    assert f"{int(cpus) + 6} CPU asked, but this machine has {cpus:g} CPU" in line
    assert not os.listdir(tmp_path)


class DriverOnly:
    """A factory that builds on the driver (network.check_model) and fails in every replica,
    as one reading a file or a device only the driver has would."""

    def __init__(self) -> None:
        self.driver = os.getpid()

    def __call__(self):
        if os.getpid() != self.driver:
            raise FileNotFoundError("/data/only-on-the-driver/vocab.txt")
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


@pytest.mark.parametrize("strategy", ["sync", "async", "ensemble", "sandblaster"])  # local, hogwild: sync's group
def test_a_factory_failing_only_in_the_replicas_is_one_line_naming_the_replica(ray_cluster, tmp_path, capsys, strategy):
    """Under every strategy; and nothing stays reserved after it (Downpour's shards and placement
    group once did: the next run could not place its replicas)."""
    from ray.util import placement_group_table

    from ray_train.api import fit
    from ray_train.cli import exit_status

    cfg = {"run": {"epochs": 1, "storage": str(tmp_path), "run_name": "factory", "strategy": strategy},
           "resources": {"replicas": 2}}
    def train() -> int:
        fit(cfg, model=DriverOnly(), data="mnist5k", tensorboard=False, progress=False)
        return 0

    assert exit_status(train) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert re.fullmatch(r"ray_train: error: replica [01]: the model factory \(custom\) failed in the replica, though "
                        r"it built on the driver: FileNotFoundError: /data/only-on-the-driver/vocab.txt", err[0]), err
    held = [g for g in placement_group_table().values() if g["state"] != "REMOVED"]
    assert not held, held


# -- item 6: the project's lines only ----------------------------------------------------------------
OURS = ("cluster: ", "run ", "sync SGD: ", "epoch ", "replica 1 (pid ", "best validation accuracy ", "done: ",
        "watch it: ")
RAYS = ("(raylet)", "worker_pool.cc", "A worker died or was killed", "Token authentication", "Started a local Ray",
        "Connecting to existing Ray cluster", " INFO ", " WARNING ", "Traceback", "ActorDiedError")

KILLED_RUN = """
import sys
sys.path.insert(0, {root!r})
from tests.test_sync_faults import DiesOnce
from ray_train.strategies.sync.engine import SyncEngine
from ray_train.cli import main
SyncEngine.replica_cls = DiesOnce
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_with_a_killed_replica_prints_no_line_of_rays(ray_cluster, tmp_path):
    """A real CLI process joins this session's cluster (--address HOST:PORT) and loses replica 1
    to SIGKILL in epoch 2 (tests/test_sync_faults.py): its terminal holds the project's lines only,
    one of them the death and the restart; Ray's go to the run folder's ray.log."""
    from tests.test_sync_faults import ARGS

    address = ray_cluster.get_runtime_context().gcs_address
    argv = [*ARGS[:-3], "--epochs", "2", "--no-progress", "--address", address, "--storage", str(tmp_path),
            "--run-name", "killed"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # RAY_AUTH_MODE=token: the cluster's
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", KILLED_RUN.format(root=ROOT), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = (done.stdout + done.stderr).strip().splitlines()
    print("\n".join(lines))
    assert done.returncode == 0, done.stderr[-3000:]
    assert lines[0] == f"cluster: joined the Ray cluster at {address}, 1 node, 2 CPUs (--address {address})"
    assert any(re.match(r"replica 1 \(pid \d+\) died in epoch 2; restarting from checkpoint .*failure 1 of at most 3",
                        ln) for ln in lines), lines
    for line in lines:
        assert line.startswith(OURS), line
        assert not any(needle in line for needle in RAYS), line
    log = (tmp_path / "killed" / "ray.log").read_text()
    print(log[-3000:])
    assert lines[0] in log and "run killed in " in log


def test_local_announces_itself_and_not_sync(ray_cluster, tmp_path, capsys):
    from ray_train.cli import main

    assert main([*TINY, "--strategy", "local", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cluster: the Ray cluster this process is on already")
    assert "model averaging (local SGD): 2 replicas on ['cpu'], every 8 steps: averaged" in out
    assert "sync SGD" not in out


def test_rays_lines_go_to_the_log_file_and_with_verbose_to_stderr_too(tmp_path, capsys):
    import logging

    from ray_train import raylog

    path, previous = tmp_path / "ray.log", raylog.LOG.path
    try:
        raylog.capture_loggers(verbose=False)
        raylog.LOG.to_file(str(path))
        logging.getLogger("ray.some_module").warning("a quiet warning")
        assert "a quiet warning" not in capsys.readouterr().err
        raylog.capture_loggers(verbose=True)
        logging.getLogger("ray.some_module").warning("a loud warning")
        logging.getLogger("ray.some_module").info("an info line")
        err = capsys.readouterr().err
        assert "a loud warning" in err and "an info line" not in err
        raylog._forwarded({"pid": "raylet", "lines": ["A worker died or was killed ..."]})
    finally:
        raylog.capture_loggers(verbose=False)
        raylog.LOG.to_file(previous)
    text = path.read_text()
    assert "a quiet warning" in text and "a loud warning" in text and "(pid=raylet) A worker died or was killed" in text
