"""Elastic replica counts (--replicas MIN-MAX, ray_train/run/scaling.py) on a fake cluster of
1-CPU nodes (ray.cluster_utils.Cluster, as tests/test_multinode.py): a sync run with --replicas
1-2 loses a node mid-run and goes on with one replica, re-sharded, then grows back to two at an
epoch end after a node is added; MIN > MAX and a MIN the cluster can never hold are one line, exit
2, before any actor starts. The run is driven by fit() on the main thread; its on_epoch callback
removes and adds the nodes at known epochs (nodes are started from the main thread only)."""
import os
import time

import pytest

from tests.conftest import one_line_error, vanish

ray = pytest.importorskip("ray")

TRAIN = 3500  # mnist5k's training split (500 of the 4,000 held out for validation)
BATCH = 32


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the suite's local cluster, if an earlier module started it
    os.environ.pop("RAY_ADDRESS", None)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def _free_cpus_at_least(n: float, timeout_s: float = 60.0) -> None:
    """Wait until Ray's view of the free CPUs shows ``n`` (a node just added reports its own)."""
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < n and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the cluster's resource view; no event to wait on


def test_replicas_take_one_number_or_a_range():
    from ray_train.config import build_config
    from ray_train.run.scaling import with_replicas

    res = build_config(overrides={"resources": {"replicas": "2-4"}}).resources
    assert (res.replicas, res.min_replicas, res.fewest, res.elastic) == (4, 2, 2, True)
    # what run.json keeps builds the same config again
    again = build_config(build_config(overrides={"resources": {"replicas": "2-4"}}).to_dict()).resources
    assert (again.replicas, again.min_replicas) == (4, 2)
    # a single number on the command line is a fixed count, whatever the YAML said
    fixed = build_config({"resources": {"replicas": 4, "min_replicas": 2}}, {"resources": {"replicas": "3"}}).resources
    assert (fixed.replicas, fixed.min_replicas, fixed.elastic) == (3, None, False)
    assert build_config(overrides={"resources": {"replicas": "2-2"}}).resources.elastic is False
    # the engine gets the count; a --slow-replica rank the smaller group lacks goes with it
    cfg = build_config(overrides={"resources": {"replicas": "1-2"}, "run": {"slow_replica": "1:3"}})
    assert with_replicas(cfg, 1).resources.replicas == 1 and with_replicas(cfg, 1).run.slow_replica is None


def test_min_more_than_max_is_one_line_and_exit_2(capsys, tmp_path):
    line = one_line_error(capsys, ["--replicas", "4-2", "--storage", str(tmp_path), "--no-tensorboard"])
    assert "MIN 4 is more than MAX 2" in line and "2-4" in line, line


def test_elastic_for_a_strategy_that_does_not_resize_is_one_line(capsys, tmp_path):
    line = one_line_error(capsys, ["--replicas", "1-2", "--strategy", "hogwild", "--storage", str(tmp_path)])
    assert "MIN-MAX" in line and "sync" in line and "hogwild" in line, line


def test_a_min_the_cluster_can_never_hold_is_one_line_at_once(cluster, capsys, tmp_path):
    line = one_line_error(capsys, ["--replicas", "3-4", "--model", "mlp30", "--epochs", "1", "--storage",
                                   str(tmp_path), "--no-progress", "--no-tensorboard"])
    assert "3 replicas (the MIN of --replicas 3-4)" in line and "2 CPU in all" in line, line
    assert not os.listdir(tmp_path)  # refused before the run folder, before any actor


def test_sync_shrinks_on_a_node_loss_and_grows_back_when_a_node_is_added(cluster, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ray_train.api import fit
    from ray_train.worker.batches import steps_per_epoch

    c = cluster
    events = []

    def on_epoch(record):
        if not events and record["epoch"] == 2:  # a node lost, not replaced
            victim = next(iter(c.worker_nodes))
            events.append(("removed", record["epoch"], victim.node_id))
            vanish(c, victim)
        elif len(events) == 1 and record["replicas"] == 1:
            # the run noticed the loss and goes on with one replica: now a node joins (a node added
            # before the loss was noticed, when an epoch ended before the kill landed, let the
            # restart take two replicas at once: a clean-clone CI failure)
            node = c.add_node(num_cpus=1)
            c.wait_for_nodes()
            _free_cpus_at_least(1.0)
            events.append(("added", record["epoch"], node.node_id))

    cfg = {"run": {"strategy": "sync", "epochs": 6, "batch_size": BATCH, "seed": 0, "eval_every": 6,
                   "storage": str(tmp_path), "run_name": "elastic"},
           "model": {"name": "mlp30"}, "data": {"dataset": "mnist5k"},
           "resources": {"replicas": "1-2", "cpus_per_replica": 1, "placement": "SPREAD"}}
    summary = fit(cfg, progress=False, on_epoch=on_epoch)
    assert [e[0] for e in events] == ["removed", "added"], events
    counts = summary["replicas_history"]
    assert [r["replicas"] for r in counts] == [2, 1, 2], counts
    start, shrunk, grown = counts
    # the restart after the loss came from a checkpoint at or before the epoch it was lost in;
    # growing came at an epoch end once the node had joined (the same one, unless Ray was slow
    # to place the probe there)
    assert 1 <= shrunk["epoch"] <= events[0][1] and events[1][1] <= grown["epoch"] < 6, (counts, events)
    # per-replica batch fixed: one replica takes twice the steps of two over the same epochs
    two, one = steps_per_epoch(TRAIN, 2, BATCH), steps_per_epoch(TRAIN, 1, BATCH)
    assert shrunk["step"] == shrunk["epoch"] * two
    assert grown["step"] - shrunk["step"] == (grown["epoch"] - shrunk["epoch"]) * one
    assert summary["steps"] == grown["step"] + (6 - grown["epoch"]) * two
    assert summary["replicas"] == 2 and summary["epochs"] == 6 and summary["test_accuracy"] > 0.6
    assert summary["restarts"] == 1 and summary["failures"][0]["restarted_from_epoch"] == shrunk["epoch"]
    assert events[0][2] not in summary["nodes"]["replicas"] and events[1][2] in summary["nodes"]["replicas"]
    acc = EventAccumulator(str(tmp_path / "elastic"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("replicas")] == [(r["step"], r["replicas"]) for r in counts]
