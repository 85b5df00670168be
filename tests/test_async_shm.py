"""Downpour's same-node transport (async.transport): a shard's ShardServer serves pushes and pulls
through each replica's shared-memory mailbox exactly as its actor calls do; one replica gets the
same parameters over shared memory as over Ray calls; a killed replica's connection is dropped
and its restart reconnects; nothing has a name in /dev/shm that could outlive the run."""
import os
import signal
import time

import numpy as np
import pytest
import torch

from ray_train.cli import main
from ray_train.cli.train import parse_config
from ray_train.config import OptimConfig, build_config
from ray_train.data.loaders import load_dataset
from ray_train.network import model_factory
from ray_train.strategies.downpour import engine as downpour
from ray_train.strategies.downpour.parameter_server import ParameterShard, split_bounds
from ray_train.strategies.downpour.replica import Mailbox, ShardGone, ShmChannel

N, STEPS = 1000, 12


def _sequence(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(N).astype(np.float32),
            [rng.standard_normal(N).astype(np.float32) for _ in range(STEPS)])


def _until(condition, timeout_s=10.0):
    """Polls a condition another thread makes true (not a timing assertion: it waits for it)."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


# -- the server alone, no Ray ----------------------------------------------------------------------
def test_shard_server_applies_pushes_and_serves_pulls_like_the_actor_calls():
    init, grads = _sequence()
    optim = OptimConfig(optimizer="adam", lr=0.01)
    bounds = split_bounds(N, 2)
    shards = [ParameterShard(k, init[lo:hi], optim) for k, (lo, hi) in enumerate(bounds)]
    twins = [ParameterShard(k, init[lo:hi], optim) for k, (lo, hi) in enumerate(bounds)]
    boxes = [Mailbox(N), Mailbox(N)]  # two replicas
    channels = [[ShmChannel(s.endpoint()["address"], box, rank, lo, hi) for s, (lo, hi) in zip(shards, bounds)]
                for rank, box in enumerate(boxes)]
    try:
        got = np.empty(N, dtype=np.float32)
        for i, g in enumerate(grads):
            rank = i % 2
            for ch, twin, (lo, hi) in zip(channels[rank], twins, bounds):
                if i == 5:  # a push without parameters, then a pull
                    ch.push(g[lo:hi], 0, rank, pull=False)
                    assert ch.wait() == twin.push(g[lo:hi], 0)
                    ch.pull()
                else:
                    ch.push(g[lo:hi], 0, rank, pull=True)
                    twin.push(g[lo:hi], 0)
                assert ch.wait() == twin.version == i + 1
                ch.read(got[lo:hi])
            np.testing.assert_array_equal(got, np.concatenate([t.pull()[1] for t in twins]))
        assert not np.array_equal(got, init)
        stats = [s.stats() for s in shards]
        assert [(s["version"], s["count"], s["max"]) for s in stats] == [(STEPS, STEPS, STEPS - 1)] * 2
        assert stats[0]["recent"].tolist() == list(range(STEPS))  # every push claimed version 0

        assert all(len(s.server.peers) == 2 for s in shards)
        for ch in channels[1]:  # a replica goes away: its shards drop it
            ch.close()
        assert _until(lambda: all(len(s.server.peers) == 1 for s in shards))
        with pytest.raises(RuntimeError, match="refused"):  # a slice that is not the shard's
            ShmChannel(shards[0].endpoint()["address"], boxes[0], 0, 0, bounds[0][1] + 1)
    finally:
        for s in shards:
            s.server.close()
    with pytest.raises(ShardGone):  # the shard's end is gone: a request fails, it does not hang
        channels[0][0].push(grads[0][: bounds[0][1]], 0, 0, pull=True)
        channels[0][0].wait()


# -- one replica: both transports give the same parameters -------------------------------------
def test_one_replica_gets_the_same_parameters_over_shm_and_over_ray(ray_cluster):
    steps, batch, seed = 30, 16, 5
    got = {}
    for transport in ("shm", "ray"):
        cfg = build_config(overrides={
            "run": {"batch_size": batch, "seed": seed},
            "data": {"dataset": "synthetic", "synthetic_train": batch * 25, "synthetic_test": 64},
            "model": {"name": "mlp30"}, "optim": {"optimizer": "adagrad", "lr": 0.05},
            "resources": {"replicas": 1, "cpus_per_replica": 0.5},
            "async": {"ps_shards": 2, "n_fetch": 1, "n_push": 1, "ps_cpus": 0.1, "transport": transport}})
        data = load_dataset(cfg.data, seed=seed)
        factory = model_factory(cfg, data)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = factory()
        dp = downpour.Downpour(cfg, ray_cluster.put(data), factory, model)
        try:
            assert dp.transports == [[transport] * 2]
            first = ray_cluster.get(dp.replicas[0].run.remote(0, 20))
            second = ray_cluster.get(dp.replicas[0].run.remote(20, steps - 20))  # crosses an epoch
            stats = ray_cluster.get([s.stats.remote() for s in dp.shards])
            got[transport] = (dp.params(), first["comm_bytes"] + second["comm_bytes"], first["versions"].tolist(),
                              [(s["version"], s["count"], s["sum"]) for s in stats])
        finally:
            dp.shutdown()
    (shm, shm_bytes, shm_versions, shm_stats), (ray_params, ray_bytes, _, ray_stats) = got["shm"], got["ray"]
    np.testing.assert_array_equal(shm, ray_params)
    assert shm_stats == ray_stats == [(steps, steps, 0)] * 2
    assert shm_versions == [20] * 2
    # every step pushed and pulled the whole vector: the same payload counted either way
    assert shm_bytes == ray_bytes == 2 * steps * 4 * len(shm)


# -- a killed replica, through the whole engine ---------------------------------------------------
def _shm_files(pid: int) -> set[str]:
    """Files under /dev/shm that a process maps, other than Ray's object store."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    names = {line.split(None, 5)[5].replace(" (deleted)", "") for line in lines if len(line.split(None, 5)) == 6}
    return {n for n in names if n.startswith("/dev/shm/") and not n.startswith("/dev/shm/plasma")}


def _maps_mailbox(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "memfd:ray_train-mailbox" in f.read()


def test_a_killed_replica_is_dropped_and_its_restart_reconnects(ray_cluster):
    import ray

    cfg = build_config(overrides={
        "run": {"batch_size": 16},
        "data": {"dataset": "synthetic", "synthetic_train": 16 * 50, "synthetic_test": 64},
        "model": {"name": "mlp30"}, "resources": {"replicas": 2, "cpus_per_replica": 0.5},
        "async": {"ps_shards": 2, "ps_cpus": 0.1}})
    data = load_dataset(cfg.data)
    factory = model_factory(cfg, data)
    dp = downpour.Downpour(cfg, ray.put(data), factory, factory())
    named: set[str] = set()

    def peers():
        return [i["shm_peers"] for i in ray.get([s.info.remote() for s in dp.shards])]

    try:
        assert dp.transports == [["shm", "shm"]] * 2
        ray.get([r.run.remote(0, 10) for r in dp.replicas])
        pids = [i["pid"] for i in ray.get([a.info.remote() for a in [*dp.replicas, *dp.shards]])]
        assert [_maps_mailbox(p) for p in pids] == [True] * 4  # replicas and shards map the mailboxes
        for p in pids:
            named |= _shm_files(p)
        assert peers() == [2, 2]
        os.kill(pids[1], signal.SIGKILL)
        assert _until(lambda: peers() == [1, 1])  # the dead replica's connections are dropped
        assert ray.get(dp.setup(1)) == ["shm", "shm"]  # waits for Ray's restart, then reconnects
        assert ray.get(dp.replicas[1].info.remote())["pid"] != pids[1]
        assert peers() == [2, 2]
        runs = ray.get([r.run.remote(10, 10) for r in dp.replicas])
        assert [r["pushes"] for r in runs] == [10, 10] and all(r["shard_errors"] == [] for r in runs)
        # every push the live replicas made was applied: 2 x 10 before, 2 x 10 after
        assert [s["count"] for s in ray.get([s.stats.remote() for s in dp.shards])] == [40, 40]
    finally:
        dp.shutdown()
    assert all(not os.path.exists(name) for name in named)
    assert not [n for n in named if "ray_train" in n]


# -- the setting ----------------------------------------------------------------------------------
def test_transport_flag(capsys):
    cfg, _ = parse_config(["--strategy", "async", "--transport", "ray"])
    assert cfg.async_.transport == "ray"
    assert main(["--strategy", "async", "--transport", "tcp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "async.transport" in err[0] and "auto, shm, ray" in err[0], err
