"""Downpour SGD on the shared 2-CPU Ray cluster: exact equivalence with sequential SGD for one
replica, staleness with several, the bounded-staleness gate, convergence against sync SGD, and
surviving the death of a replica process and of a parameter-shard process.

Actor start-up dominates on a 2-core machine, so the 4-replica runs are few and shared by
module-scoped fixtures; every assertion checks a number."""
import io
import json
import os
import signal

import numpy as np
import pytest
import torch

from ray_train import strategies
from ray_train.api import fit
from ray_train.cli import main
from ray_train.cluster import ReplicaContext, first_ready
from ray_train.config import build_config
from ray_train.data.loaders import load_dataset
from ray_train.network import model_factory
from ray_train.strategies.downpour import engine as downpour
from ray_train.worker.batches import shard_batches
from ray_train.worker.replica import Replica

# 20 epochs: the accuracies compared below must sit where the curve has flattened. Measured
# (2026-11-24, 2 cores): after 3 epochs undisturbed runs spread over 91.1-93.2%; after 10, over
# 95.3-96.5% with killed-replica runs at 95.1-97.3% (one pair 1.7 points apart); after 20,
# undisturbed 96.5-96.7%, killed 96.6-97.2%, sync 96.7%. Actor start-up dominates: 20 epochs cost
# ~15 s more per run than 10.
# Net D, not net B: the sigmoid net B sits at chance for its first ~800 steps here (4 replicas x
# batch 64 reach 10% in both strategies after 10 epochs), which would make the comparison vacuous.
EPOCHS, MODEL, OPT, LR, BOUND = 20, "net_d", "adagrad", 0.01, 2
FOUR = {"replicas": 4, "cpus_per_replica": 0.35}


def _cfg(storage, name, strategy="async", resources=FOUR, asyncs=None, **run):
    return build_config(overrides={
        "run": {"strategy": strategy, "epochs": EPOCHS, "storage": str(storage), "run_name": name, **run},
        "model": {"name": MODEL}, "optim": {"optimizer": OPT, "lr": LR},
        "resources": resources, "async": {"ps_cpus": 0.1, "warm_start_steps": 0, **(asyncs or {})}})


class HookedEngine(downpour.DownpourEngine):
    hooks = None  # set per test: sees every completed chunk


def _execute(cfg, monkeypatch=None, hooks=None) -> dict:
    """ray_train.fit (summary.json and all); ``hooks`` reach the Downpour engine through the registry."""
    if hooks is not None:
        monkeypatch.setattr(HookedEngine, "hooks", staticmethod(hooks))
        monkeypatch.setattr(strategies.get("async"), "engine", f"{__name__}:HookedEngine")
    summary = fit(cfg, tensorboard=hooks is None, progress=False, out=io.StringIO())
    on_disk = json.loads(open(os.path.join(cfg.run.storage, cfg.run.run_name, "summary.json")).read())
    assert on_disk["test_accuracy"] == summary["test_accuracy"]
    return on_disk


# -- one replica: exactly sequential SGD ----------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_one_replica_fetch_push_every_step_equals_sequential_sgd(ray_cluster, optimizer):
    steps, batch, seed = 40, 16, 5
    cfg = build_config(overrides={
        "run": {"batch_size": batch, "seed": seed},
        "data": {"dataset": "synthetic", "synthetic_train": batch * 25, "synthetic_test": 64},
        "model": {"name": "mlp30"}, "optim": {"optimizer": optimizer, "lr": 0.1, "momentum": 0.9},
        "resources": {"replicas": 1, "cpus_per_replica": 0.5},
        "async": {"ps_shards": 3, "n_fetch": 1, "n_push": 1, "ps_cpus": 0.1}})
    data = load_dataset(cfg.data, seed=seed)
    factory = model_factory(cfg, data)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = factory()
    dp = downpour.Downpour(cfg, ray_cluster.put(data), factory, model)
    try:
        first = ray_cluster.get(dp.replicas[0].run.remote(0, 30))  # crosses an epoch (25 steps)
        second = ray_cluster.get(dp.replicas[0].run.remote(30, steps - 30))
        got = dp.params()
        stats = ray_cluster.get([s.stats.remote() for s in dp.shards])
    finally:
        dp.shutdown()
    single = Replica(ReplicaContext(0, 1, 1, 0, seed), cfg, data, factory)
    initial = single.flat_params()
    for s in range(steps):
        epoch, pos = divmod(s, 25)
        single.step(shard_batches(len(data.y_train), 1, 0, batch, seed, epoch)[pos])
    want = single.flat_params()
    assert np.abs(want - initial).max() > 1e-2
    assert np.abs(got - want).max() <= 1e-6
    assert first["pushes"] + second["pushes"] == steps
    assert [s["version"] for s in stats] == [steps] * 3
    # Alone, a replica always pushes against the version it just fetched.
    assert [(s["count"], s["max"], s["sum"]) for s in stats] == [(steps, 0, 0)] * 3


# -- four replicas: convergence, staleness, the gate, and a killed replica ------------------------
@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    storage = tmp_path_factory.mktemp("async-runs")
    sync = _execute(_cfg(storage, "sync", strategy="sync"))
    plain = _execute(_cfg(storage, "async", asyncs={"max_staleness": BOUND}))
    return storage, sync, plain


def test_four_replicas_converge_like_sync(runs):
    _, sync, plain = runs
    print(f"sync {sync['test_accuracy']:.4f} async {plain['test_accuracy']:.4f}")
    assert sync["test_accuracy"] > 0.8  # both really learned
    assert plain["test_accuracy"] >= sync["test_accuracy"] - 0.015
    assert plain["steps"] == EPOCHS * (3500 // 64) and plain["train_samples"] == plain["steps"] * 64  # 500 validate
    assert plain["failures"] == [] and plain["restarts"] == 0
    assert len(plain["history"]) == EPOCHS
    assert plain["transport"] == "shm"  # the default (auto) on one node


def test_staleness_with_four_replicas_is_positive_and_bounded(runs):
    _, _, plain = runs
    assert plain["updates"] == plain["steps"]  # n_push = 1: one update per step
    assert plain["staleness_mean"] > 0 and plain["staleness_max"] >= 1
    # --max-staleness bounds how far a replica runs ahead of the slowest (in pushes).
    assert 0 <= plain["lead_max"] <= BOUND


def test_tensorboard_holds_the_ps_tags(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    storage, _, _ = runs
    acc = EventAccumulator(str(storage / "async"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    for tag in ("ps/staleness_mean", "ps/updates_per_s", "test/accuracy", "test/loss", "train/loss",
                "train/accuracy", *(f"throughput/steps_per_s/replica_{r}" for r in range(4))):
        assert len(acc.Scalars(tag)) >= (EPOCHS if not tag.startswith("train/") else EPOCHS * (3500 // 64) // 10), tag
    assert len(acc.Histograms("ps/staleness")) == EPOCHS
    assert all(e.value > 0 for e in acc.Scalars("ps/updates_per_s"))


def test_a_ready_rejoin_is_taken_before_ready_chunks(ray_cluster):
    # ray.wait's ready list follows no order: behind chunks that were always ready, a restarted
    # replica's setup call once waited for the end of the run (a clean-clone CI failure)
    chunks = [ray_cluster.put(i) for i in range(32)]
    rejoin = ray_cluster.put("setup")
    ray_cluster.get([*chunks, rejoin])
    assert all(first_ready({rejoin: 1}, chunks) == rejoin for _ in range(20))
    pending = ray_cluster.remote(lambda: __import__("time").sleep(30)).remote()  # a restart under way
    assert first_ready({pending: 1}, chunks) in chunks
    ray_cluster.cancel(pending, force=True)


def test_a_killed_replica_is_restarted_and_the_run_completes(runs, monkeypatch):
    storage, _, plain = runs
    killed = []

    def kill_replica_1(event, progress):
        if not killed and progress["step"] >= 20:  # early: time for the restart to rejoin
            killed.append(progress["replica_pids"][1])
            os.kill(killed[0], signal.SIGKILL)

    summary = _execute(_cfg(storage, "killed", asyncs={"max_staleness": BOUND}), monkeypatch, kill_replica_1)
    print(f"undisturbed {plain['test_accuracy']:.4f} killed {summary['test_accuracy']:.4f} {summary['failures']}")
    assert summary["restarts"] == 1 and len(summary["failures"]) == 1
    failure = summary["failures"][0]
    assert failure["kind"] == "replica" and failure["rank"] == 1 and failure["pid"] == killed[0]
    assert failure["restarted_pid"] not in (None, killed[0])
    assert summary["steps"] == plain["steps"]  # the lost chunks were handed out again
    # One-sided: a run that lost a replica must not end worse than the undisturbed run by more than
    # the margin. Measured spread (2026-11-24, 20 epochs): undisturbed 96.5-96.7%, killed 96.6-97.5%
    # over 7 runs; a killed run ending *better* is noise, not a failure (a two-sided band failed on it).
    assert summary["test_accuracy"] >= plain["test_accuracy"] - 0.015
    assert summary["lead_max"] <= BOUND  # the gate let the dead replica go and took it back


@pytest.mark.parametrize("transport", ["auto", "ray"])  # shared memory, and the actor calls used across nodes
def test_a_killed_shard_is_restored_from_its_snapshot(ray_cluster, tmp_path, monkeypatch, transport):
    killed = []

    def kill_shard_0(event, progress):
        if not killed and progress["step"] >= 60:
            killed.append(progress["shard_pids"][0])
            os.kill(killed[0], signal.SIGKILL)

    cfg = _cfg(tmp_path, "shard", resources={"replicas": 2, "cpus_per_replica": 0.5}, epochs=2,
               asyncs={"ps_shards": 2, "snapshot_every_s": 0.05, "transport": transport})
    summary = _execute(cfg, monkeypatch, kill_shard_0)
    print(summary["failures"], summary["test_accuracy"])
    assert summary["transport"] == {"auto": "shm", "ray": "ray"}[transport]
    assert len(summary["failures"]) == 1 and summary["restarts"] == 1
    failure = summary["failures"][0]
    assert failure["kind"] == "shard" and failure["shard"] == 0 and failure["pid"] == killed[0]
    assert 0 < failure["restored_version"] <= 2 * (3500 // 64)
    assert 0 <= failure["updates_lost_min"] <= failure["updates_lost"] <= 2 * (3500 // 64) - failure["restored_version"]
    assert summary["steps"] == 2 * (3500 // 64)
    assert summary["test_accuracy"] > 0.7  # training went on from the restored parameters


def test_a_restarted_shard_takes_the_freshest_copy_a_replica_holds(ray_cluster, tmp_path, monkeypatch):
    """No snapshot since the start (as on a node whose shard snapshot is out of reach): the shard
    comes back at version 0, and the replicas' copies of its slice bring it back to the version
    they last fetched; only the updates in flight are lost (issue: 118 of 118 were)."""
    killed = []

    def kill_shard_0(event, progress):
        if not killed and progress["step"] >= 60:
            killed.append(progress["step"])
            os.kill(progress["shard_pids"][0], signal.SIGKILL)

    cfg = _cfg(tmp_path, "offer", resources={"replicas": 2, "cpus_per_replica": 0.5}, epochs=2,
               asyncs={"ps_shards": 2, "snapshot_every_s": 3600.0})
    summary = _execute(cfg, monkeypatch, kill_shard_0)
    failure = summary["failures"][0]
    print(failure)
    assert failure["kind"] == "shard" and failure["restored_version"] == 0
    assert failure["adopted_version"] >= killed[0] - 2 * 2  # at least what the replicas had fetched
    assert 0 <= failure["updates_lost"] <= 4, failure  # in flight: a push or two per replica
    assert summary["test_accuracy"] > 0.7


def test_resume_continues_from_the_checkpoint(ray_cluster, tmp_path):
    one = {"replicas": 1, "cpus_per_replica": 0.5}
    first = _execute(_cfg(tmp_path, "resumed", resources=one, epochs=1))
    cfg = build_config({**_cfg(tmp_path, "resumed", resources=one).to_dict()},
                       {"run": {"epochs": 2, "resume": str(tmp_path / "resumed")}})
    second = _execute(cfg)
    assert [h["epoch"] for h in second["history"]] == [1, 2]
    assert second["history"][0]["test_accuracy"] == first["test_accuracy"]
    assert second["steps"] == second["updates"] == 2 * (3500 // 64)  # the shards' versions came back too
    assert second["train_samples"] == 2 * first["train_samples"]
    assert second["test_accuracy"] > first["test_accuracy"]


# -- bad input -------------------------------------------------------------------------------------
BAD = [
    (["--n-fetch", "0"], "async.n_fetch"),
    (["--n-push", "0"], "async.n_push"),
    (["--ps-shards", "0"], "async.ps_shards"),
    (["--max-staleness", "-1"], "async.max_staleness"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_async_flags(capsys, argv, needle):
    assert main(["--strategy", "async", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ray_train: error:") and needle in err[0], err


def test_more_shards_than_parameters_fails_before_any_actor(ray_cluster, tmp_path, capsys, monkeypatch):
    started = []
    monkeypatch.setattr(downpour.Downpour, "__init__", lambda self, *a, **k: started.append(a))
    argv = ["--strategy", "async", "--model", "mlp30", "--ps-shards", "23861", "--storage", str(tmp_path),
            "--no-progress", "--no-tensorboard"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "async.ps_shards" in err[0] and "23860" in err[0], err
    assert started == []
