"""GPU readiness that runs on the CPU (issue 24): the one helper everything an actor returns goes
through (to_host), the staging buffers Downpour exchanges (no copy on the CPU), batches from a
training set kept on the device equal the batches gathered on the host, mixed precision (bf16 and
fp16's loss scale), the allreduce/GPU combinations refused in one line, and a tiny bf16 run of every
strategy whose checkpoints and results hold CPU tensors only. The GPU side is tests/test_gpu.py."""
import glob
import io
import os

import numpy as np
import pytest
import torch

from ray_train.api import fit
from ray_train.cluster import ReplicaContext
from ray_train.config import build_config, load_yaml
from ray_train.data.loaders import load_dataset
from ray_train.network import model_factory
from ray_train.worker.device import Inputs, Precision, Staging, keep_on_device, tensor_devices, to_host
from ray_train.worker.replica import Replica
from tests.conftest import ROOT, one_line_error

# -- to_host ----------------------------------------------------------------------------------------


def test_to_host_walks_dicts_lists_and_tuples_and_leaves_cpu_tensors_and_arrays_alone():
    t, a = torch.ones(3, requires_grad=True), np.zeros(2)
    state = {"model": {"w": t}, "optimizer": {"state": {0: {"momentum_buffer": [t, (t, 1.5)]}}}, "probs": a, "n": 3}
    out = to_host(state)
    assert out["probs"] is a and out["n"] == 3
    assert out["model"]["w"].data_ptr() == t.data_ptr() and not out["model"]["w"].requires_grad  # detached, no copy
    assert isinstance(out["optimizer"]["state"][0]["momentum_buffer"][1], tuple)
    assert tensor_devices(out) == {"cpu"}


def test_to_host_copies_every_tensor_off_its_device():
    # A tensor on another device must be copied to the CPU: a 'meta' tensor (no data) shows the
    # copy is attempted wherever it sits in the structure.
    meta = torch.empty(4, device="meta")
    assert tensor_devices({"a": [1, (meta,)]}) == {"meta"}
    with pytest.raises(NotImplementedError, match="meta"):
        to_host({"a": [1, (meta,)]})


def test_staging_on_the_cpu_is_the_tensor_itself():
    flat = torch.arange(6, dtype=torch.float32)
    stage = Staging(flat)
    host = stage.writable()
    host[:] = 7  # what a fetch writes lands in the parameters, without an upload copy
    stage.upload(flat)
    assert torch.equal(flat, torch.full((6,), 7.0))
    assert stage.download(flat) is not None and np.shares_memory(stage.download(flat), host)


# -- inputs ------------------------------------------------------------------------------------------


def test_batches_from_the_training_set_on_the_device_equal_batches_from_host_memory():
    cfg = build_config(overrides={"data": {"dataset": "mnist5k"}})
    data = load_dataset(cfg.data, seed=0)
    cpu = torch.device("cpu")
    resident, gathered = Inputs(data, cpu, "on", 0), Inputs(data, cpu, "off", 0)
    assert resident.resident is not None and gathered.resident is None
    idx = np.array([5, 0, 17, 3499, 5])
    for batch in (idx, slice(10, 30)):
        (xa, ya), (xb, yb) = resident(batch), gathered(batch)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.dtype == torch.float32
    assert not keep_on_device("auto", 10, cpu, 0), "auto keeps the data on GPUs only"


# -- precision ----------------------------------------------------------------------------------------


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def test_bf16_autocast_computes_in_bf16_and_keeps_fp32_parameters_and_gradients():
    net = _net()
    prec = Precision("bf16", torch.device("cpu"), torch.optim.SGD(net.parameters(), lr=0.1))
    with prec.autocast():
        out = net(torch.randn(4, 8))
    assert out.dtype == torch.bfloat16
    prec.backward(out.float().sum())
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in net.parameters())
    assert Precision("fp32", torch.device("cpu"), None).scale() == 1.0


def test_fp16_scales_the_loss_and_skips_a_step_whose_gradients_overflow():
    net, x = _net(), torch.randn(4, 8)
    net(x).sum().backward()
    plain = net[0].weight.grad.clone()
    net.zero_grad()
    prec = Precision("fp16", torch.device("cpu"), torch.optim.SGD(net.parameters(), lr=0.1))
    prec.backward(net(x).sum())
    assert prec.scale() > 1 and torch.allclose(net[0].weight.grad, plain * prec.scale(), rtol=1e-5)
    before, scale = [p.detach().clone() for p in net.parameters()], prec.scale()
    net[0].weight.grad[0, 0] = float("inf")  # an overflow
    prec.step()
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters())), "the step was skipped"
    assert prec.scale() == scale / 2, "and the scale backed off"
    net.zero_grad()
    prec.backward(net(x).sum())
    net[2].bias.grad[0] = float("nan")
    assert not prec.unscale_(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    assert prec.state_dict()["scale"] == scale / 4


def test_a_replica_in_bf16_takes_steps_close_to_fp32():
    cfg32 = build_config(overrides={"data": {"dataset": "mnist5k"}, "model": {"name": "mlp30"},
                                    "resources": {"replicas": 1}})
    cfg16 = build_config(overrides={"data": {"dataset": "mnist5k"}, "model": {"name": "mlp30"},
                                    "resources": {"replicas": 1}, "run": {"precision": "bf16"}})
    data = load_dataset(cfg32.data, seed=0)
    params = []
    for cfg in (cfg32, cfg16):
        r = Replica(ReplicaContext(0, 1, 1, 0, 0), cfg, data, model_factory(cfg, data))
        start = r.flat_params()
        r.set_epoch(0, cfg.optim.lr)
        out = r.train_steps(20)
        assert np.isfinite(out["loss_sum"]) and tensor_devices(r.state()) == {"cpu"}
        assert tensor_devices([out, r.evaluate(), r.rng_state(), r.weights()]) <= {"cpu"}
        params.append(r.flat_params() - start)
    moved = np.abs(params[0]).max()
    assert moved > 1e-3
    assert np.abs(params[0] - params[1]).max() < 0.2 * moved, "bf16 moves the parameters where fp32 does"


def test_local_and_sandblaster_replicas_return_host_values_only():
    from ray_train.strategies.local.engine import LocalReplica
    from ray_train.strategies.sandblaster.worker import SandblasterWorker

    cfg = build_config(overrides={"run": {"strategy": "local", "precision": "bf16"}, "data": {"dataset": "mnist5k"},
                                  "model": {"name": "mlp30"}, "resources": {"replicas": 1}})
    data = load_dataset(cfg.data, seed=0)
    local = LocalReplica(ReplicaContext(0, 1, 1, 0, 0), cfg, data, model_factory(cfg, data))
    local.set_epoch(0, cfg.optim.lr)
    local.train_steps(3)
    own = local.local_state()
    assert tensor_devices(own) == {"cpu"} and own["params"].data_ptr() != local.flat.data_ptr()
    cfg = build_config(overrides={"run": {"strategy": "sandblaster", "precision": "bf16"},
                                  "data": {"dataset": "mnist5k"}, "model": {"name": "mlp30"}})
    worker = SandblasterWorker(ReplicaContext(0, 1, 1, 0, 0), cfg, model_factory(cfg, data))
    worker.setup(data)
    worker.version = 0  # the parameters are loaded: no object store needed
    unit = worker.evaluate(0, [None], -1, 0, 32)
    assert isinstance(unit["grad"], np.ndarray) and unit["grad"].dtype == np.float32
    assert np.isfinite(unit["grad"]).all() and np.abs(unit["grad"]).max() > 0 and unit["n"] == 32
    assert tensor_devices(unit) == set()


# -- config --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,needle", [
    (["--allreduce", "shm", "--gpus-per-replica", "1"], "run.allreduce: shm averages gradients in host memory"),
    (["--allreduce", "nccl", "--gpus-per-replica", "0.5"], "nccl needs a whole GPU per replica"),
    (["--allreduce", "hier", "--gpus-per-replica", "0.5"], "hier on GPUs runs NCCL"),
    (["--allreduce", "nccl"], "resources.gpus_per_replica is 0"),
    (["--precision", "fp8"], "run.precision"),
    (["--data-on-device", "yes"], "resources.data_on_device"),
])
def test_allreduce_and_device_combinations_that_cannot_work_are_one_line_errors(capsys, tmp_path, argv, needle):
    line = one_line_error(capsys, [*argv, "--storage", str(tmp_path), "--no-tensorboard"])
    assert needle in line
    assert os.listdir(tmp_path) == []


# -- every strategy in bf16: CPU tensors only in checkpoints -----------------------------------------

STRATEGIES = {
    "sync": {},
    "local": {},
    "hogwild": {},
    "async": {},
    "sandblaster": {"sandblaster": {"work_units": 4, "iterations": 3}},
    "ensemble": {"ensemble": {"members": 2}},
}


def _checkpoints(run_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(run_dir, "**", "ckpt-*.pt"), recursive=True))


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_trains_in_bf16_and_checkpoints_cpu_tensors_only(ray_cluster, tmp_path, strategy):
    cfg = {"run": {"strategy": strategy, "epochs": 1, "storage": str(tmp_path), "run_name": "r", "precision": "bf16"},
           "data": {"dataset": "mnist5k"}, "model": {"name": "mlp30"},
           "resources": {"replicas": 2, "cpus_per_replica": 0.5}, **STRATEGIES[strategy]}
    summary = fit(cfg, tensorboard=False, progress=False, out=io.StringIO())
    assert summary["test_accuracy"] > 0.3, summary["test_accuracy"]  # chance: 0.1
    files = _checkpoints(str(tmp_path / "r"))
    assert files, "a checkpoint was written"
    for path in files:
        assert tensor_devices(torch.load(path, weights_only=True)) == {"cpu"}, path


def test_the_default_job_in_bf16_is_within_a_point_of_fp32(ray_cluster, tmp_path):
    values = load_yaml(os.path.join(ROOT, "configs", "default.yaml"))
    acc = {}
    for precision in ("fp32", "bf16"):
        values["run"] = {**values["run"], "epochs": 3, "storage": str(tmp_path), "run_name": precision,
                         "precision": precision}
        acc[precision] = fit(build_config(values), tensorboard=False, progress=False, out=io.StringIO())["test_accuracy"]
    assert acc["fp32"] > 0.85, acc
    assert acc["bf16"] >= acc["fp32"] - 0.01, acc
