"""A ParameterShard, driven without Ray, must update its slice exactly as torch.optim updates the
same parameters on the same gradient sequence; snapshots restore it bit for bit."""
import asyncio

import numpy as np
import pytest
import torch

from ray_train.config import OptimConfig
from ray_train.strategies.downpour.parameter_server import ParameterShard, StalenessGate, decay_ranges, split_bounds

N, STEPS = 1000, 25


def _reference(cls, init, grads, **options):
    p = torch.nn.Parameter(torch.from_numpy(init.copy()))
    opt = cls([p], **options)
    for g in grads:
        p.grad = torch.from_numpy(g.copy())
        opt.step()
    return p.detach().numpy()


def _sequence(seed=0):
    rng = np.random.default_rng(seed)
    init = rng.standard_normal(N).astype(np.float32)
    grads = [rng.standard_normal(N).astype(np.float32) for _ in range(STEPS)]
    return init, grads


CASES = [
    ("momentum", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    ("adagrad", torch.optim.Adagrad, {"lr": 0.05}),
    ("adam", torch.optim.Adam, {"lr": 0.01}),
    ("sgd", torch.optim.SGD, {"lr": 0.05}),
]


@pytest.mark.parametrize("name,cls,options", CASES, ids=[c[0] for c in CASES])
def test_shard_step_equals_torch_optim(name, cls, options):
    init, grads = _sequence()
    # Two shards over the halves of the vector: each half must follow torch.optim on that half.
    bounds = split_bounds(N, 2)
    shards = [ParameterShard(k, init[lo:hi], OptimConfig(optimizer=name, lr=options["lr"], momentum=0.9))
              for k, (lo, hi) in enumerate(bounds)]
    for g in grads:
        for shard, (lo, hi) in zip(shards, bounds):
            shard.push(g[lo:hi], shard.version)
    got = np.concatenate([s.pull()[1] for s in shards])
    want = _reference(cls, init, grads, **options)
    assert np.abs(got - init).max() > 1e-2  # the sequence moved the parameters
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert [s.version for s in shards] == [STEPS, STEPS]


def test_weight_decay_applies_to_weights_only():
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2))  # w 24, b 4, w 8, b 2
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    lo, hi = 20, 33  # crosses weight / bias / weight boundaries
    ranges = decay_ranges(model, lo, hi)
    assert ranges == [(0, 4), (8, 13)]
    shard = ParameterShard(0, flat[lo:hi], OptimConfig(optimizer="sgd", lr=0.1, weight_decay=0.5), decay=ranges)
    shard.push(np.zeros(hi - lo, dtype=np.float32), 0)
    got = shard.pull()[1]
    scale = np.ones(hi - lo, dtype=np.float32)
    scale[0:4] = scale[8:13] = 1 - 0.1 * 0.5
    np.testing.assert_allclose(got, flat[lo:hi] * scale, atol=1e-7)


def test_staleness_is_recorded_and_scales_the_step():
    init = np.zeros(4, dtype=np.float32)
    shard = ParameterShard(0, init, OptimConfig(optimizer="sgd", lr=1.0), staleness_lr=True)
    one = np.ones(4, dtype=np.float32)
    assert shard.push(one, 0) == 1  # staleness 0: full step
    assert shard.push(one, 0) == 2  # staleness 1: full step
    assert shard.push(one, 0) == 3  # staleness 2: half step
    assert shard.push(one, 3) == 4  # fresh
    np.testing.assert_allclose(shard.pull()[1], -(1 + 1 + 0.5 + 1) * one)
    stats = shard.stats()
    assert (stats["count"], stats["sum"], stats["max"]) == (4, 3, 2)
    assert stats["recent"].tolist() == [0, 1, 2, 0] and stats["recent"].dtype == np.int32
    assert shard.stats()["recent"].size == 0  # cleared by the read


def test_snapshot_restores_params_optimizer_and_version(tmp_path):
    init, grads = _sequence(1)
    cfg = OptimConfig(optimizer="adam", lr=0.01)
    path = str(tmp_path / "shard-0.pt")
    shard = ParameterShard(0, init, cfg, snapshot_path=path, snapshot_every_s=1e9)
    for g in grads[:10]:
        shard.push(g, shard.version)
    shard.snapshot()
    for g in grads[10:12]:  # lost with the "crash"
        shard.push(g, shard.version)
    restored = ParameterShard(0, init, cfg, snapshot_path=path, snapshot_every_s=1e9)
    assert restored.restored_version == 10 and restored.version == 10
    fresh = ParameterShard(0, init, cfg)
    for g in grads[:10]:
        fresh.push(g, fresh.version)
    for g in grads[10:]:  # both continue identically: Adam's moments came back too
        restored.push(g, restored.version)
        fresh.push(g, fresh.version)
    np.testing.assert_array_equal(restored.pull()[1], fresh.pull()[1])


def test_split_bounds_are_near_equal_and_tile():
    bounds = split_bounds(10, 4)
    assert bounds == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert split_bounds(3, 3) == [(0, 1), (1, 2), (2, 3)]


def test_gate_holds_a_replica_more_than_s_pushes_ahead():
    async def scenario():
        gate = StalenessGate(bound=1)
        await gate.join(0)
        await gate.join(1)
        assert await gate.admit(0) == 0  # clocks 1, 0
        assert await gate.admit(0) == 1  # clocks 2, 0
        third = asyncio.ensure_future(gate.admit(0))  # would be 2 ahead: must wait
        await asyncio.sleep(0)  # let it reach the condition (scheduling, not synchronisation)
        assert not third.done()
        assert await gate.admit(1) == 0  # slowest is always admitted; releases replica 0
        assert await third == 1
        await gate.leave(1)  # a dead replica must not hold the others back
        assert await gate.admit(0) == 0
        return await gate.stats()

    stats = asyncio.run(scenario())
    assert stats["lead_max"] == 1 and stats["admitted"] == 5


def test_push_pull_returns_what_a_pull_after_the_push_would(ray_cluster):
    init, grads = _sequence(3)
    shard = ParameterShard(0, init, OptimConfig(optimizer="momentum", lr=0.05, momentum=0.9))
    twin = ParameterShard(0, init, OptimConfig(optimizer="momentum", lr=0.05, momentum=0.9))
    for g in grads[:3]:
        version, (ref,) = shard.push_pull(g, shard.version)
        twin.push(g, twin.version)
        want_version, want = twin.pull()
        assert version == want_version
        np.testing.assert_array_equal(ray_cluster.get(ref), want)
    assert not np.array_equal(want, init)
