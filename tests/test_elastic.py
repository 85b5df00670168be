"""Elastic replica counts (--replicas MIN-MAX, ray_train/run/scaling.py) on a fake cluster of
1-CPU nodes (ray.cluster_utils.Cluster, as tests/test_multinode.py): a sync run with --replicas
2-4 (half a CPU each, two per node) loses a node mid-run and goes on with two replicas, re-sharded,
then grows back to four at an epoch end after a node is added; a run whose MIN is busy elsewhere
waits for it, and starts when it frees or stops with one line after the stated wait; MIN > MAX and
a MIN the cluster can never hold are one line, exit 2, before any actor starts. The run is driven by fit() on the main thread; its on_epoch callback
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
        elif len(events) == 1 and record["replicas"] == 2:
            # the run noticed the loss and goes on with two replicas: now a node joins (a node added
            # before the loss was noticed, when an epoch ended before the kill landed, let the
            # restart take all of them at once: a clean-clone CI failure)
            node = c.add_node(num_cpus=1)
            c.wait_for_nodes()
            _free_cpus_at_least(1.0)
            events.append(("added", record["epoch"], node.node_id))

    cfg = {"run": {"strategy": "sync", "epochs": 6, "batch_size": BATCH, "seed": 0, "eval_every": 6,
                   "storage": str(tmp_path), "run_name": "elastic"},
           "model": {"name": "mlp30"}, "data": {"dataset": "mnist5k"},
           "resources": {"replicas": "2-4", "cpus_per_replica": 0.5, "placement": "SPREAD"}}
    summary = fit(cfg, progress=False, on_epoch=on_epoch)
    assert [e[0] for e in events] == ["removed", "added"], events
    counts = summary["replicas_history"]
    assert [r["replicas"] for r in counts] == [4, 2, 4], counts
    start, shrunk, grown = counts
    # the restart after the loss came from a checkpoint at or before the epoch it was lost in;
    # growing came at an epoch end once the node had joined (the same one, unless Ray was slow
    # to place the probe there)
    assert 1 <= shrunk["epoch"] <= events[0][1] and events[1][1] <= grown["epoch"] < 6, (counts, events)
    # per-replica batch fixed: two replicas take twice the steps of four over the same epochs
    four, two = steps_per_epoch(TRAIN, 4, BATCH), steps_per_epoch(TRAIN, 2, BATCH)
    assert shrunk["step"] == shrunk["epoch"] * four
    assert grown["step"] - shrunk["step"] == (grown["epoch"] - shrunk["epoch"]) * two
    assert summary["steps"] == grown["step"] + (6 - grown["epoch"]) * four
    assert summary["replicas"] == 4 and summary["epochs"] == 6 and summary["test_accuracy"] > 0.6
    assert summary["restarts"] == 1 and summary["failures"][0]["restarted_from_epoch"] == shrunk["epoch"]
    assert events[0][2] not in summary["nodes"]["replicas"] and events[1][2] in summary["nodes"]["replicas"]
    acc = EventAccumulator(str(tmp_path / "elastic"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("replicas")] == [(r["step"], r["replicas"]) for r in counts]


@pytest.fixture
def one_cpu_taken(cluster):
    """One of the cluster's two CPUs held by a placement group of the test's own (another job)."""
    from ray.util.placement_group import placement_group, remove_placement_group

    _free_cpus_at_least(2.0)
    pg = placement_group([{"CPU": 1}])
    ray.get(pg.ready(), timeout=60)
    yield pg
    remove_placement_group(pg)


def test_a_min_that_stays_busy_is_one_line_after_the_stated_wait(one_cpu_taken, capsys, tmp_path, monkeypatch):
    import ray_train.cluster

    monkeypatch.setattr(ray_train.cluster, "PLACEMENT_TIMEOUT_S", 2.0)
    t0 = time.monotonic()
    line = one_line_error(capsys, ["--replicas", "2-3", "--model", "mlp30", "--epochs", "1", "--storage",
                                   str(tmp_path), "--no-tensorboard", "--no-progress"])
    assert "could not place 2 replicas" in line and "within 2 s" in line, line
    assert time.monotonic() - t0 >= 2.0  # it waited for MIN before giving up
    assert not any(f.endswith(".pt") for _, _, fs in os.walk(tmp_path) for f in fs)  # no model, no checkpoint
    _free_cpus_at_least(1.0, timeout_s=10.0)
    assert ray.available_resources().get("CPU", 0.0) >= 1.0  # its placement group was given back


def test_a_run_waits_for_its_min_and_starts_when_it_frees(one_cpu_taken, tmp_path):
    """The CPU another job held is handed back 3 s into the run's wait: the run starts with MIN."""
    import threading

    from ray.util.placement_group import remove_placement_group

    from ray_train.api import fit

    threading.Timer(3.0, remove_placement_group, [one_cpu_taken]).start()
    t0 = time.monotonic()
    summary = fit({"run": {"epochs": 1, "batch_size": BATCH, "storage": str(tmp_path), "run_name": "waits"},
                   "model": {"name": "mlp30"}, "data": {"dataset": "mnist5k"},
                   "resources": {"replicas": "2-3", "cpus_per_replica": 1}}, progress=False)
    assert time.monotonic() - t0 >= 3.0
    assert summary["replicas"] == 2 and summary["epochs"] == 1 and summary["test_accuracy"] > 0.5
