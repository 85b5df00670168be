"""Operators stop runs with SIGTERM (``ray job stop``, Kubernetes, schedulers) and users with Ctrl-C:
the driver finishes the chunk under way, checkpoints exactly there, flushes its event files, tears
its actors down and exits 143 (130 for SIGINT) with one line; --resume then continues to the
parameters an uninterrupted run reaches."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ray_train.cli import main
from ray_train.run.checkpoint import CheckpointStore
from tests.conftest import ROOT

# mlp30 with batch 8: ~1 s epochs, so that the signal (0.3 s after the first epoch line) lands mid-epoch
ARGS = ["--config", "configs/default.yaml", "--epochs", "3", "--model", "mlp30", "--dropout", "0.2", "--lr", "0.05",
        "--batch-size", "8", "--log-every", "5"]


def _ray_processes() -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines() if "ray::" in line or "raylet" in line or "gcs_server" in line}


def _interrupt(storage, name, sig):
    before = _ray_processes()
    env = {**os.environ, "PYTHONPATH": ROOT, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ray_train", *ARGS, "--storage", str(storage), "--run-name", name],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:  # wait for the first epoch, then signal in the middle of the run
        lines.append(line)
        if line.startswith("epoch   1"):
            break
    time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    deadline = time.time() + 30
    while _ray_processes() - before and time.time() < deadline:
        time.sleep(0.5)
    left = _ray_processes() - before
    return proc.returncode, "".join(lines) + out, err, left


@pytest.mark.parametrize("sig,status,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_signal_stops_cleanly_and_resume_is_exact(ray_cluster, tmp_path, sig, status, word):
    code, out, err, left = _interrupt(tmp_path, "stopped", sig)
    ours = [line for line in err.splitlines() if line.startswith("ray_train:")]
    assert code == status, err[-2000:]
    assert ours == [f"ray_train: {word}; continue with --resume {tmp_path / 'stopped'}"]
    assert "SIGTERM received" not in err and "Traceback" not in err
    # stdout and stderr are pipes here, as under `ray job submit` or in CI: no progress bars
    assert "\r" not in out + err and "step/s" not in out + err and "epoch 1/3" not in out + err
    assert not left, f"Ray processes of the stopped run still alive: {left}"
    assert not (tmp_path / "stopped" / "summary.json").exists()
    state, path = CheckpointStore(str(tmp_path / "stopped")).load_latest()
    assert 1 <= state["epoch"] < 3 or state["in_epoch"] > 0, path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "stopped"), size_guidance={"scalars": 0})
    acc.Reload()
    assert max(e.step for e in acc.Scalars("train/loss")) >= state["step"]  # flushed up to the checkpoint

    assert main(["--resume", str(tmp_path / "stopped"), "--no-progress"]) == 0
    assert main([*ARGS, "--storage", str(tmp_path), "--run-name", "straight", "--no-progress"]) == 0
    a, b = (torch.load(tmp_path / run / "model.pt", weights_only=True)["model"] for run in ("straight", "stopped"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"stopped at {os.path.basename(path)}; resumed vs uninterrupted: max abs difference {diff:.3g}")
    assert diff <= 1e-6


def _segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("rt_")}


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    return {p for p in pids if os.path.exists(f"/proc/{p}") and "zombie" not in _state(p)}


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((line for line in fh if line.startswith("State:")), "").lower()
    except OSError:
        return "zombie"


def test_a_killed_driver_leaves_no_shared_memory_and_no_processes(tmp_path):
    """SIGKILL gives the driver no chance to clean up: the allreduce segment must already be
    unlinked (it is, once every rank has attached) and the processes of its Ray cluster (GCS,
    raylet, the replicas) must go with the driver."""
    before = _segments()
    env = {**os.environ, "PYTHONPATH": ROOT, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ray_train", *ARGS, "--allreduce", "shm", "--storage", str(tmp_path),
                             "--run-name", "killed"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("epoch   1"):
            break
    assert any("SharedMemoryAllreduce" in line for line in seen), "".join(seen)  # the segment was in use
    assert _segments() == before  # already unlinked while training runs
    family = _descendants(proc.pid)
    assert len(family) >= 3, family  # at least GCS, raylet and a replica
    family -= _agents(family)
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.time() + 60
    while _alive(family) and time.time() < deadline:
        time.sleep(0.5)
    assert _segments() == before
    assert not _alive(family), f"processes of the killed run still alive: {_alive(family)}"


def _agents(pids: set[int]) -> set[int]:
    """Ray's dashboard and runtime-env agents: when their raylet dies they try to report it to the
    (dead) GCS and exit once that times out, about 90 s later (ray/_private/process_watcher.py);
    the test does not wait for them."""
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().decode(errors="replace")
        except OSError:
            continue
        if "DashboardAgent" in cmd or "RuntimeEnv" in cmd or "dashboard/agent.py" in cmd or "runtime_env/agent" in cmd:
            out.add(pid)
    return out
