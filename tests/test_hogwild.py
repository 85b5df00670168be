"""Hogwild (--strategy hogwild): replicas on one node update one shared-memory parameter vector
without locks. What a replica writes the others read; the segment's name leaves /dev/shm as soon
as the replicas have attached; every replica's momentum is checkpointed and a resumed run trains
on; one replica is plain SGD (sync's numbers exactly); at equal epochs it trains at least about as
well as sync; replicas on several nodes are a one-line error."""
import io
import json
import os

import numpy as np
import pytest
import torch

import ray_train.strategies.hogwild.engine as hogwild
from ray_train.api import fit
from ray_train.cli import main
from ray_train.config import build_config
from ray_train.data.loaders import load_dataset
from ray_train.errors import ConfigError
from ray_train.network import model_factory
from ray_train.strategies.hogwild.engine import HogwildGroup, HogwildReplica, check_one_node

EPOCHS, HALF = 4, 2
# Measured (mlp30, momentum 0.05, batch 64, 2 replicas, 4 epochs, seeds 0-3): sync 84.7-86.3%,
# hogwild 3.1-4.5 points above sync (it takes twice the updates, each on half the batch), and two
# hogwild runs of one seed 0.0-0.3 points apart (the races). The margins sit well outside both.
# A run resumed after epoch 2 against an uninterrupted one (2026-12-07, seed 0): uninterrupted 0.886,
# 0.887 and 0.897 (a clean-clone CI run), resumed 0.881, 0.888, 0.890: up to 1.6 points apart, so
# the resumed margin is 3 points (still far from a restart from scratch: 0.71-0.72 after one epoch).
MARGIN_VS_SYNC, MARGIN_RESUMED = 0.015, 0.03


def _rt_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("rt_")} if os.path.isdir("/dev/shm") else set()


def _cfg(storage, name, strategy, epochs=EPOCHS, replicas=2):
    return {"run": {"strategy": strategy, "epochs": epochs, "storage": str(storage), "run_name": name},
            "model": {"name": "mlp30"}, "resources": {"replicas": replicas, "cpus_per_replica": 0.5}}


def _fit(storage, name, strategy, **kw):
    return fit(_cfg(storage, name, strategy, **kw), tensorboard=False, progress=False, out=io.StringIO())


def test_replicas_on_several_nodes_are_refused_in_one_line():
    check_one_node(["node-a", "node-a", "node-a"])
    with pytest.raises(ConfigError, match=r"3 replicas were placed on 2 nodes.*--strategy async") as exc:
        check_one_node(["node-a", "node-b", "node-a"])
    assert "\n" not in str(exc.value)


def test_a_run_spread_over_two_nodes_exits_2_and_frees_its_replicas(ray_cluster, tmp_path, monkeypatch, capsys):
    checked = []

    def two_nodes(ids):  # the test cluster has one node: the second replica "lands" elsewhere
        checked.append(list(ids))
        check_one_node(ids[:1] + ["another-node"] * (len(ids) - 1))

    monkeypatch.setattr(hogwild, "check_one_node", two_nodes)
    before = set(ray_cluster.util.placement_group_table())
    assert main(["--strategy", "hogwild", "--model", "mlp30", "--epochs", "1", "--replicas", "2",
                 "--cpus-per-replica", "0.5", "--storage", str(tmp_path), "--no-progress", "--no-tensorboard"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(checked) == 1 and len(err) == 1 and "placed on 2 nodes" in err[0], err
    groups = ray_cluster.util.placement_group_table()
    assert all(groups[g]["state"] == "REMOVED" for g in set(groups) - before), "the replicas' placement group leaked"


def test_replicas_write_into_one_vector_and_keep_their_own_momentum(ray_cluster):
    ray = ray_cluster
    cfg = build_config(overrides={"run": {"strategy": "hogwild", "batch_size": 32}, "model": {"name": "mlp30"},
                                  "resources": {"replicas": 2, "cpus_per_replica": 0.5}})
    data = load_dataset(cfg.data)
    group = HogwildGroup.create(cfg, ray.put(data), model_factory(cfg, data), HogwildReplica)
    try:
        assert group.shm_name.startswith("rt_") and not os.path.exists(f"/dev/shm/{group.shm_name}"), \
            "the segment's name must be gone once both replicas attached"
        initial = ray.get(group.actors[0].flat_params.remote())
        ray.get([a.set_epoch.remote(0, 0.05) for a in group.actors])
        moved = ray.get(group.actors[1].train_steps.remote(5))  # rank 1 alone trains
        p0, p1 = ray.get([a.flat_params.remote() for a in group.actors])
        assert np.abs(p1 - initial).max() > 1e-4 and np.array_equal(p0, p1), "rank 0 must see rank 1's updates"
        assert moved["comm_bytes"] == 5 * initial.nbytes
        state = group.state()
        assert len(state["optimizer"]) == len(state["rng"]) == 2
        assert not state["optimizer"][0]["state"] and state["optimizer"][1]["state"], "rank 1's momentum, not rank 0's"
        assert np.array_equal(torch.cat([v.reshape(-1) for v in state["model"].values()]).numpy(), p1)
        ray.get([a.close.remote() for a in group.actors])  # the mappings go, the models stay
        assert all(np.array_equal(p, p1) for p in ray.get([a.flat_params.remote() for a in group.actors]))
    finally:
        group.shutdown()


def test_one_replica_is_plain_sgd_exactly_as_sync(ray_cluster, tmp_path):
    runs = {s: _fit(tmp_path, s, s, epochs=1, replicas=1) for s in ("sync", "hogwild")}
    a, b = (torch.load(tmp_path / s / "model-last.pt", weights_only=True)["model"] for s in runs)
    assert all(torch.equal(a[k], b[k]) for k in a) and runs["hogwild"]["comm_bytes"] == 0


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    storage = tmp_path_factory.mktemp("hogwild")
    before = _rt_segments()
    sync, straight = _fit(storage, "sync", "sync"), _fit(storage, "straight", "hogwild")
    _fit(storage, "resumed", "hogwild", epochs=HALF)
    assert main(["--resume", str(storage / "resumed"), "--epochs", str(EPOCHS), "--no-progress",
                 "--no-tensorboard"]) == 0
    resumed = json.loads((storage / "resumed" / "summary.json").read_text())
    return sync, straight, resumed, _rt_segments() - before


def test_hogwild_trains_about_as_well_as_sync_at_equal_epochs(runs):
    sync, hog, _, leaked = runs
    print(f"{EPOCHS} epochs: sync {sync['test_accuracy']:.4f}, hogwild {hog['test_accuracy']:.4f}")
    assert hog["stopped"] == "epochs" and hog["test_accuracy"] >= sync["test_accuracy"] - MARGIN_VS_SYNC
    # each replica wrote S bytes per step: steps (per replica) x replicas x S
    assert hog["comm_bytes"] == hog["steps"] * 2 * 4 * (784 * 30 + 30 + 30 * 10 + 10)
    assert not leaked, f"left in /dev/shm: {leaked}"


def test_a_resumed_run_continues_from_its_checkpoint(runs):
    _, straight, resumed, _ = runs
    history = resumed["history"]
    accuracy = [h["test_accuracy"] for h in history]
    print(f"resumed after epoch {HALF}: test accuracy by epoch {[round(a, 4) for a in accuracy]}, "
          f"uninterrupted {straight['test_accuracy']:.4f}")
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1)) and resumed["steps"] == straight["steps"]
    # from the checkpoint, not from scratch: the first epoch after the resume is no worse than the one before it
    assert accuracy[HALF] >= accuracy[HALF - 1] - MARGIN_RESUMED
    assert resumed["test_accuracy"] >= straight["test_accuracy"] - MARGIN_RESUMED
