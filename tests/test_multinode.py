"""Several Ray nodes on this one machine, as Ray's own tests make them (ray.cluster_utils.Cluster): a
head with no CPUs for the driver and two worker nodes of 1 CPU each, so that every replica of a
2-replica run lands on a node of its own. Every strategy runs across the nodes through its
cross-node path (gloo between nodes for sync and local, Downpour's Ray-call transport, Sandblaster's
work units, ensemble members on different nodes; hogwild refuses), and summary.json says which node
ran each replica and shard. The fake nodes share this machine's /dev/shm and IP address: "same
node" is decided by Ray's node id only.

The single-node reference runs of the same jobs go to a third node of 2 CPUs added afterwards (PACK
puts both replicas there). The module shuts down the suite's local cluster first; the next module's
``ray_cluster`` fixture starts a new one."""
import json
import os

import pytest
import torch

from tests.conftest import one_line_error, vanish

ray = pytest.importorskip("ray")

JOB = {"run": {"epochs": 2, "batch_size": 32, "seed": 0, "eval_every": 2},
       "model": {"name": "mlp30"}, "data": {"dataset": "mnist5k"},
       "resources": {"replicas": 2, "cpus_per_replica": 1}}
ACROSS = ("sync", "async", "local", "sandblaster", "ensemble")
EXTRA = {"ensemble": {"ensemble": {"members": 2}}, "sandblaster": {"sandblaster": {"iterations": 4}}}


def _config(strategy: str, storage, name: str, placement: str) -> dict:
    cfg = {k: dict(v) for k, v in JOB.items()}
    cfg["run"].update(strategy=strategy, storage=str(storage), run_name=name)
    cfg["resources"]["placement"] = placement
    cfg.update(EXTRA.get(strategy, {}))
    return cfg


def _four(storage, name: str, placement: str) -> dict:
    """Sync with four replicas of half a CPU: two on each 1-CPU node (SPREAD), or four on one node."""
    cfg = _config("sync", storage, name, placement)
    cfg["resources"].update(replicas=4, cpus_per_replica=0.5)
    return cfg


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the suite's local cluster, if an earlier module started it
    os.environ.pop("RAY_ADDRESS", None)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c, [w.node_id for w in workers]
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """Each strategy across the two 1-CPU nodes, then the same jobs on one 2-CPU node."""
    from ray_train.api import fit

    c, worker_ids = cluster
    storage = tmp_path_factory.mktemp("multinode")
    across = {s: fit(_config(s, storage, f"{s}-across", "SPREAD"), tensorboard=False, progress=False)
              for s in ACROSS}
    across["sync4"] = fit(_four(storage, "sync4-across", "SPREAD"), tensorboard=False, progress=False)
    big = c.add_node(num_cpus=2)
    c.wait_for_nodes()
    try:
        single = {s: fit(_config(s, storage, f"{s}-single", "PACK"), tensorboard=False, progress=False)
                  for s in ACROSS}
        single["sync4"] = fit(_four(storage, "sync4-single", "PACK"), tensorboard=False, progress=False)
    finally:
        c.remove_node(big)
    return storage, worker_ids, big.node_id, across, single


def _replica_nodes(summary: dict) -> list[str]:
    if summary["strategy"] == "ensemble":
        return [n for m in summary["members"] for n in m["nodes"]["replicas"]]
    return summary["nodes"]["replicas"]


@pytest.mark.parametrize("strategy", ACROSS)
def test_every_strategy_runs_with_its_replicas_on_different_nodes(runs, strategy):
    _, worker_ids, _, across, _ = runs
    summary = across[strategy]
    nodes = _replica_nodes(summary)
    assert len(nodes) == 2 and set(nodes) == set(worker_ids), (nodes, worker_ids)
    assert summary["test_accuracy"] > 0.6, summary["test_accuracy"]


@pytest.mark.parametrize("strategy", ACROSS)
def test_across_nodes_trains_as_well_as_on_one_node(runs, strategy):
    """One-sided, 1.5 points to spare: the same job with both replicas on one 2-CPU node (async is
    not deterministic; the others are, to the averaging's rounding)."""
    _, _, big_id, across, single = runs
    if strategy != "ensemble":  # members are actors of their own, placed wherever there is room (they never talk)
        assert set(_replica_nodes(single[strategy])) == {big_id}
    assert across[strategy]["test_accuracy"] >= single[strategy]["test_accuracy"] - 0.015, \
        (across[strategy]["test_accuracy"], single[strategy]["test_accuracy"])


def test_sync_crosses_nodes_over_gloo_with_the_numbers_of_one_node(runs):
    storage, _, big_id, across, single = runs
    assert across["sync"]["allreduce"] == "GradBuckets"  # gloo between the nodes, in buckets during backward
    assert single["sync"]["allreduce"] == "SharedMemoryAllreduce"
    assert single["sync"]["nodes"]["replicas"] == [big_id, big_id]
    a = torch.load(storage / "sync-across" / "model-last.pt", weights_only=False)["model"]
    b = torch.load(storage / "sync-single" / "model-last.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    # local mixes over the same cross-node process group
    assert across["local"]["allreduce"] == "DistAllreduce"


def test_sync_with_two_replicas_on_each_of_two_nodes_averages_in_two_levels(runs):
    """Shared memory inside each node, gloo between the two nodes' leaders: the parameters of the
    same job with its four replicas on one node (shared memory alone), to 1e-5."""
    storage, worker_ids, big_id, across, single = runs
    summary = across["sync4"]
    assert sorted(summary["nodes"]["replicas"]) == sorted(worker_ids * 2)
    assert summary["allreduce"] == "HierarchicalAllreduce"
    assert single["sync4"]["allreduce"] == "SharedMemoryAllreduce"
    assert single["sync4"]["nodes"]["replicas"] == [big_id] * 4
    a = torch.load(storage / "sync4-across" / "model-last.pt", weights_only=False)["model"]
    b = torch.load(storage / "sync4-single" / "model-last.pt", weights_only=False)["model"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert summary["test_accuracy"] > 0.6


def test_downpour_reaches_shards_on_other_nodes_by_ray_calls(runs):
    _, worker_ids, big_id, across, single = runs
    summary = across["async"]
    replicas, shards = summary["nodes"]["replicas"], summary["nodes"]["shards"]
    assert len(shards) == 2 and all(shards)
    # shared memory only between a replica and a shard with the same node id, although the fake
    # nodes share /dev/shm: with no replica beside a shard, every pair talks through Ray calls
    assert summary["transport"] == ("ray" if not set(shards) & set(replicas) else "mixed"), summary
    assert single["async"]["nodes"]["replicas"] == [big_id, big_id]


def test_summary_json_names_the_nodes(runs):
    storage, worker_ids, _, _, _ = runs
    written = json.loads((storage / "async-across" / "summary.json").read_text())
    assert set(written["nodes"]["replicas"]) == set(worker_ids)


def test_hogwild_across_nodes_is_one_line_and_exit_2(cluster, tmp_path, capsys):
    line = one_line_error(capsys, ["--strategy", "hogwild", "--model", "mlp30", "--epochs", "1",
                                   "--placement", "SPREAD", "--storage", str(tmp_path), "--no-progress",
                                   "--no-tensorboard"])
    assert "nodes" in line and "hogwild" in line, line


def _busy_node(c):
    """A worker node with a replica on it (none of its CPU free)."""
    free = ray._private.state.available_resources_per_node()
    return next(n for n in c.worker_nodes if free.get(n.node_id, {}).get("CPU", 0.0) < 1.0)


def _remove_when(c, node, path, timeout_s: float = 300.0):
    """Remove ``node`` (or ``node(c)`` when it is a function) from the cluster as soon as ``path``
    exists (a checkpoint the run wrote): a node lost mid-run. Runs beside the driver's fit() in a
    thread (which must not start nodes: Ray sets signal handlers then); returns the thread, whose
    ``removed`` is the node id."""
    import threading
    import time

    def watch():
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)  # polling a file another process writes; no event to wait on
        victim = node(c) if callable(node) else node
        t.removed = victim.node_id
        vanish(c, victim)  # its daemons and the replicas on it die at once, as a machine vanishes

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def _three_nodes(cluster, n: int = 3):
    """The module's cluster topped up to ``n`` 1-CPU worker nodes (three: room for a replacement)."""
    c, _ = cluster
    for _ in range(n - len(c.worker_nodes)):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    return c


def _node(c, node_id):
    return next(n for n in c.worker_nodes if n.node_id == node_id)


def test_async_goes_on_without_a_lost_node(cluster, tmp_path):
    """A worker node removed mid-run and not replaced: the replica on it cannot be restarted (no
    room), the survivor takes its steps and the run finishes; the failure is in the summary."""
    from ray_train.api import fit

    c, worker_ids = cluster
    cfg = _config("async", tmp_path, "a", "SPREAD")
    cfg["run"].update(epochs=5, eval_every=5)
    watcher = _remove_when(c, _node(c, worker_ids[1]), tmp_path / "a" / "checkpoints" / "ckpt-000002.pt")
    summary = fit(cfg, tensorboard=False, progress=False)
    watcher.join(timeout=60)
    lost = summary["nodes"]["replicas"].index(None)
    assert summary["replicas_down"] == [lost]
    assert [f["rank"] for f in summary["failures"] if f["kind"] == "replica"] == [lost]
    assert summary["epochs"] == 5 and summary["test_accuracy"] > 0.6


def test_sync_restarts_on_a_replacement_node(cluster, tmp_path):
    """Three 1-CPU nodes for two replicas: one that runs a replica is removed mid-run, and the
    group restarts from the checkpoint on the two left."""
    from ray_train.api import fit

    c = _three_nodes(cluster)
    cfg = _config("sync", tmp_path, "r", "SPREAD")
    cfg["run"].update(epochs=4, eval_every=4)
    watcher = _remove_when(c, _busy_node, tmp_path / "r" / "checkpoints" / "ckpt-000002.pt")
    summary = fit(cfg, tensorboard=False, progress=False)
    watcher.join(timeout=60)
    assert len(summary["failures"]) == 1 and summary["failures"][0]["restarted_from_epoch"] >= 2, summary["failures"]
    assert summary["epochs"] == 4 and summary["test_accuracy"] > 0.6
    assert watcher.removed not in summary["nodes"]["replicas"]
    assert set(summary["nodes"]["replicas"]) == {n.node_id for n in c.worker_nodes}


def test_an_ensemble_finishes_with_every_member_when_a_node_is_lost(cluster, tmp_path):
    """Two members on two of three 1-CPU nodes: a node running one of them vanishes mid-run; that
    member restarts from its own checkpoint on the node left free, and the vote has both."""
    from ray_train.api import fit

    c = _three_nodes(cluster)
    cfg = _config("ensemble", tmp_path, "e", "SPREAD")
    cfg["run"].update(epochs=4, eval_every=4)
    watcher = _remove_when(c, _busy_node, tmp_path / "e" / "members" / "member_0" / "checkpoints" / "ckpt-000002.pt")
    summary = fit(cfg, tensorboard=False, progress=False)
    watcher.join(timeout=60)
    members = summary["members"]
    assert [m["status"] for m in members] == ["ok", "ok"] and summary["members_voting"] == 2, members
    assert all(m["epochs"] == 4 and m["test_accuracy"] > 0.6 for m in members), members
    restarted = [m for m in members if m["restarts"]]
    assert len(restarted) == 1, members  # the member on the lost node, once
    assert watcher.removed not in restarted[0]["nodes"]["replicas"], (watcher.removed, restarted[0]["nodes"])
    assert summary["vote_errors"] is not None


def test_sandblaster_reissues_the_units_of_a_lost_node_and_ends_as_undisturbed(runs, cluster, tmp_path, monkeypatch):
    """Two replicas on two 1-CPU nodes and no room for a third: the node running replica 1 vanishes
    as a unit is handed to it in the second epoch. The replica cannot be restarted; its outstanding
    unit is evaluated by the survivor and the run ends with the parameters of the undisturbed run
    across nodes (L-BFGS sums the units in unit order, whoever evaluates them: exact, not statistical)."""
    from ray_train.api import fit
    from ray_train.strategies.sandblaster.engine import SandblasterEngine

    storage = runs[0]
    c = _three_nodes(cluster, 2)
    lost = []

    def hook(event, info):
        engine = info["engine"]
        if event == "dispatch" and info["rank"] == 1 and engine.iteration == 5 and not lost:
            node_id = engine.node_ids[1]
            lost.append(node_id)
            vanish(c, _node(c, node_id))

    monkeypatch.setattr(SandblasterEngine, "hooks", staticmethod(hook))
    cfg = _config("sandblaster", tmp_path, "s", "SPREAD")
    summary = fit(cfg, tensorboard=False, progress=False)
    assert lost, "the hook never fired"
    assert summary["stopped"] == "epochs" and summary["iterations"] == 8, summary
    assert [f["rank"] for f in summary["failures"]] == [1], summary["failures"]
    assert summary["reissued_units"] + summary["backup_wins"] >= 1, summary
    assert summary["nodes"]["replicas"][1] is None and summary["nodes"]["replicas"][0] not in (None, lost[0])
    a = torch.load(storage / "sandblaster-across" / "model-last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "s" / "model-last.pt", weights_only=False)["model"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_sync_losing_a_node_with_no_replacement_fails_naming_the_checkpoint(cluster, tmp_path, monkeypatch):
    """Last in the module: it takes a worker node away. Exit 1 (ReplicaFailure), never a hang and
    never the user-error status; the checkpoint it names loads. The restart's wait for room is cut
    from 60 s to 5 s (the suite's time; what is waited for does not change)."""
    import ray_train.cluster
    from ray_train.api import fit
    from ray_train.errors import ReplicaFailure
    from ray_train.run.checkpoint import load_checked

    c = _three_nodes(cluster, 2)
    monkeypatch.setattr(ray_train.cluster, "PLACEMENT_TIMEOUT_S", 5.0)
    cfg = _config("sync", tmp_path, "lost", "SPREAD")
    cfg["run"].update(epochs=40, eval_every=40)
    watcher = _remove_when(c, _busy_node, tmp_path / "lost" / "checkpoints" / "ckpt-000002.pt")
    with pytest.raises(ReplicaFailure) as info:
        fit(cfg, tensorboard=False, progress=False)
    watcher.join(timeout=60)
    message = str(info.value)
    assert "could not restart" in message and "resources" in message, message
    ckpt = message.split("the last checkpoint is ")[1].split(" (epoch")[0]
    assert os.path.exists(ckpt) and load_checked(ckpt)["epoch"] >= 2
