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
from ray_train.checkpoint import CheckpointStore
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
