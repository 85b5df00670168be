"""Sync fault tolerance: a replica's process is killed (SIGKILL) halfway through an epoch; the
run loop tears the group down, builds a new one from the last checkpoint, redoes the epoch and ends
with the parameters of a run nobody killed. With run.max_failures 0 the run stops with a clear error."""
import json
import math
import os
import signal
import sys

import numpy as np
import ray.cloudpickle
import torch

from ray_train.cli import main
from ray_train.strategies.sync.engine import SyncEngine
from ray_train.worker.replica import Replica

EPOCHS, KILL_EPOCH, BATCH, REPLICAS, LOG_EVERY, TRAIN = 3, 1, 64, 2, 10, 3500  # mnist5k less validation
STEPS = TRAIN // REPLICAS // BATCH
ARGS = ["--model", "mlp30", "--dropout", "0.3", "--dataset", "mnist5k", "--lr", "0.2", "--batch-size", str(BATCH),
        "--replicas", str(REPLICAS), "--seed", "2", "--log-every", str(LOG_EVERY), "--epochs", str(EPOCHS),
        "--no-progress"]

# The replica class travels to the actors by value: workers cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class DiesOnce(Replica):
    """Rank 1 kills its own process (SIGKILL to the pid Replica.info() reports) halfway through
    epoch ``kill_epoch``, once per run: a marker file next to the run folder holds the pid."""

    kill_epoch = KILL_EPOCH

    def set_epoch(self, epoch: int, lr: float, start: int = 0) -> int:
        self.marker = os.path.join(self.cfg.run.storage, f"{self.cfg.run.run_name}.killed")
        self.doomed = self.ctx.rank == 1 and epoch == self.kill_epoch and not os.path.exists(self.marker)
        return super().set_epoch(epoch, lr, start)

    def train_steps(self, n: int) -> dict:
        if self.doomed and self.cursor >= len(self.batches) // 2:
            pid = self.info()["pid"]
            with open(self.marker, "w") as fh:
                fh.write(str(pid))
            os.kill(pid, signal.SIGKILL)
        return super().train_steps(n)


class DiesInFirstEpoch(DiesOnce):
    kill_epoch = 0


def _inject(monkeypatch, replica_cls):
    monkeypatch.setattr(SyncEngine, "replica_cls", replica_cls)


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_a_killed_replica_is_restarted_from_the_checkpoint(ray_cluster, tmp_path, capsys, monkeypatch):
    assert main([*ARGS, "--storage", str(tmp_path), "--run-name", "clean"]) == 0
    _inject(monkeypatch, DiesOnce)
    capsys.readouterr()
    assert main([*ARGS, "--storage", str(tmp_path), "--run-name", "killed"]) == 0
    out = capsys.readouterr().out
    pid = int((tmp_path / "killed.killed").read_text())
    checkpoint = str(tmp_path / "killed" / "checkpoints" / "ckpt-000001.pt")
    assert (f"replica 1 (pid {pid}) died in epoch {KILL_EPOCH + 1}; restarting from checkpoint {checkpoint} "
            f"(epoch {KILL_EPOCH}), failure 1 of at most 3") in out

    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["restarts"] == 1
    assert summary["failures"] == [{"epoch": KILL_EPOCH + 1, "rank": 1, "pid": pid, "error": "ActorDiedError",
                                    "restarted_from": checkpoint, "restarted_from_epoch": KILL_EPOCH}]
    assert [h["epoch"] for h in summary["history"]] == list(range(1, EPOCHS + 1))
    assert summary["train_samples"] == EPOCHS * STEPS * REPLICAS * BATCH

    # The redone epoch followed the same path as the run nobody killed.
    clean = json.loads((tmp_path / "clean" / "summary.json").read_text())
    assert clean["restarts"] == 0 and clean["test_errors"] == summary["test_errors"]
    a = torch.load(tmp_path / "clean" / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)["model"]
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max abs parameter difference, killed-and-restarted vs clean: {diff:.3g}")
    assert diff <= 1e-6

    # The half epoch before the kill left no duplicate points in TensorBoard.
    chunk_steps = [e * STEPS + min(s + LOG_EVERY, STEPS) for e in range(EPOCHS) for s in range(0, STEPS, LOG_EVERY)]
    assert len(chunk_steps) == EPOCHS * math.ceil(STEPS / LOG_EVERY)
    loss = _scalars(tmp_path / "killed", "train/loss")
    assert [s for s, _ in loss] == chunk_steps
    np.testing.assert_allclose([v for _, v in loss], [v for _, v in _scalars(tmp_path / "clean", "train/loss")],
                               rtol=0, atol=1e-6)


def test_with_max_failures_0_the_run_stops_with_a_clear_error(ray_cluster, tmp_path, monkeypatch, capsys):
    # gloo here: the survivor's collective fails too, and the death must still be what is reported.
    _inject(monkeypatch, DiesInFirstEpoch)
    argv = [*ARGS, "--storage", str(tmp_path), "--run-name", "fragile", "--max-failures", "0", "--allreduce", "gloo"]
    assert main(argv) == 1
    pid = int((tmp_path / "fragile.killed").read_text())
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ray_train: error: replica 1 (pid {pid}) died in epoch 1; giving up after 1 failure(s) (run.max_failures "
        f"is 0); continue with --resume {tmp_path / 'fragile'}"]
    assert not (tmp_path / "fragile" / "summary.json").exists()
