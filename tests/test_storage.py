"""Remote storage (ray_train/run/storage.py) against an S3-compatible server started here on
127.0.0.1 (moto's server mode, with credentials checked): a sync run with ``--storage
s3://bucket/runs`` whose driver is SIGKILLed mid-run and resumed by a new driver process ends with
the parameters of an uninterrupted run; TensorBoard's own reader reads its scalars from the bucket;
a parameter shard restarted elsewhere finds its snapshot there; a missing bucket, refused
credentials and an unknown scheme are one-line errors (exit 2) before Ray starts."""
import io
import json
import os
import socket
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import torch

from ray_train.cli import main
from ray_train.run import storage
from tests.conftest import ROOT, one_line_error

pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")

BUCKET, EPOCHS = "bucket", 3
ARGS = ["--model", "mlp30", "--dataset", "mnist5k", "--dropout", "0.2", "--lr", "0.05", "--batch-size", "64",
        "--replicas", "2", "--seed", "3", "--log-every", "20", "--epochs", str(EPOCHS), "--no-progress"]
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(proc: subprocess.Popen, port: int) -> None:
    """Until the server accepts connections (or exits: then the test fails at once)."""
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            try:
                proc.wait(timeout=0.1)  # returns only if the server died
                raise AssertionError(f"moto server exited with {proc.returncode}")
            except subprocess.TimeoutExpired:
                pass
    raise AssertionError("moto server did not start")


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1, a user with an access key allowed everything, the bucket, then
    authentication switched on (unknown keys are refused from then on). The environment points
    pyarrow, boto3 and TensorBoard at it: AWS_ENDPOINT_URL and the key."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    mp = pytest.MonkeyPatch()
    try:
        _wait_listening(proc, port)
        mp.setenv("AWS_ENDPOINT_URL", url)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ACCESS_KEY_ID", "setup")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "setup")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "S3_ENDPOINT"):
            mp.delenv(name, raising=False)
        setup = boto3.session.Session()  # not boto3's default session: it would keep these credentials
        iam = setup.client("iam")
        iam.create_user(UserName="trainer")
        iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(ALLOW_ALL))
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        setup.client("s3").create_bucket(Bucket=BUCKET)
        urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset-auth", data=b"0", method="POST",
                                                      headers={"Content-Type": "text/plain"}))
        mp.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        mp.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        yield url
    finally:
        mp.undo()
        proc.terminate()
        proc.wait(timeout=30)


def _cli(*argv, env=None, **popen):
    env = {**(env or os.environ), "PYTHONPATH": ROOT, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ray_train", *argv], cwd=ROOT, env=env, text=True, **popen)


def _model(uri: str) -> dict:
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def runs(s3, ray_cluster):
    """The same job twice in the bucket: "killed" (driver SIGKILLed once epoch 2 began, then
    ``--resume`` by a new driver process) and "straight" (uninterrupted, in this process). The
    drivers join the module's cluster, as a user's would on a real one."""
    address = ("--address", ray_cluster.get_runtime_context().gcs_address)
    proc = _cli(*ARGS, *address, "--storage", f"s3://{BUCKET}/runs", "--run-name", "killed", stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT)
    seen = []
    for line in proc.stdout:  # epoch 1's line, checkpoint and event files are in the bucket once epoch 2 starts
        seen.append(line)
        if line.startswith("epoch   2"):
            break
    proc.kill()
    proc.wait(timeout=60)
    proc.stdout.close()
    assert any(line.startswith("epoch   2") for line in seen), "".join(seen)
    run = f"s3://{BUCKET}/runs/killed"
    assert not storage.exists(f"{run}/summary.json"), "the run finished before the kill"
    before_resume = _scalars(run)
    resumed = _cli("--resume", run, "--no-progress", *address, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert main([*ARGS, "--storage", f"s3://{BUCKET}/runs", "--run-name", "straight"]) == 0
    return {"killed": run, "straight": f"s3://{BUCKET}/runs/straight", "out": out, "before_resume": before_resume}


def _scalars(run: str) -> dict:
    """What TensorBoard shows: its EventAccumulator reading the s3:// run folder itself (through
    boto3, which takes AWS_ENDPOINT_URL)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_killed_driver_resumed_from_the_bucket_ends_as_the_uninterrupted_run(runs):
    assert f"resuming from {runs['killed']}/checkpoints/ckpt-" in runs["out"]
    a, b = _model(f"{runs['straight']}/model.pt"), _model(f"{runs['killed']}/model.pt")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"resumed from the bucket vs uninterrupted: max abs parameter difference {diff:.3g}")
    assert diff <= 1e-6
    summary = json.loads(storage.read_bytes(f"{runs['killed']}/summary.json"))
    assert summary["epochs"] == EPOCHS and summary["test_accuracy"] > 0.5
    names = storage.listdir(f"{runs['killed']}/checkpoints")
    assert f"ckpt-{EPOCHS:06d}.pt" in names and all(n.startswith("ckpt-") for n in names)
    assert {"run.json", "model.pt", "model-last.pt", "ray.log"} <= set(storage.listdir(runs["killed"]))
    from ray_train.prediction import predict

    assert predict(runs["killed"])["accuracy"] == pytest.approx(summary["best_test_accuracy"])  # model.pt, read back


def test_tensorboard_reads_the_runs_scalars_from_the_bucket(runs):
    early = runs["before_resume"]["train/loss"]
    assert early and max(s for s, _ in early) > 0  # the killed driver's points were already up there
    final = _scalars(runs["killed"])
    straight = _scalars(runs["straight"])
    summary = json.loads(storage.read_bytes(f"{runs['killed']}/summary.json"))
    steps = [s for s, _ in final["test/accuracy"]]
    assert len(steps) == len(set(steps)) == EPOCHS and max(steps) == summary["steps"]
    assert [s for s, _ in final["train/loss"]] == [s for s, _ in straight["train/loss"]]
    assert np.allclose([v for _, v in final["test/accuracy"]], [v for _, v in straight["test/accuracy"]], atol=1e-6)


def test_a_shard_restarted_anywhere_finds_its_snapshot_in_the_bucket(s3):
    """A new ParameterShard (what Ray builds when it restarts the actor, on any node) with the same
    snapshot URI comes back with the slice, version and optimizer state the dead one snapshotted."""
    from ray_train.config import OptimConfig
    from ray_train.strategies.downpour.parameter_server import ParameterShard

    path = f"s3://{BUCKET}/runs/async-x/ps/shard-0.pt"
    optim = OptimConfig(optimizer="momentum", lr=0.1)
    first = ParameterShard(0, 6, optim, snapshot_path=path, snapshot_every_s=0.0)
    first.assign(np.arange(6, dtype=np.float32))
    for version in range(3):
        first.push(np.ones(6, dtype=np.float32), version)
    assert first.version == 3 and storage.isfile(path)
    again = ParameterShard(0, 6, optim, snapshot_path=path)
    assert again.restored_version == 3
    assert torch.equal(again.param.detach(), first.param.detach())
    assert float(again.param.detach()[0]) < 0.0  # three momentum steps moved it from 0
    storage.remove(path)
    assert ParameterShard(0, 6, optim, snapshot_path=path).restored_version is None


def test_a_shard_on_a_node_without_access_says_so_in_one_line(s3, monkeypatch):
    from ray_train.config import OptimConfig
    from ray_train.errors import StorageError
    from ray_train.strategies.downpour.parameter_server import ParameterShard

    """What Ray's restart of a shard on a node without credentials for the bucket does: a clear
    line (the engine turns it into the run's one-line error), never a shard started from nothing."""
    path = f"s3://{BUCKET}/runs/y/ps/shard-0.pt"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAKEY")
    with pytest.raises(StorageError, match=f"parameter shard 0 cannot read its snapshot {path}") as err:
        ParameterShard(0, 6, OptimConfig(optimizer="sgd", lr=0.1), snapshot_path=path)
    assert "\n" not in str(err.value) and "AWS_ENDPOINT_URL" in str(err.value)


def test_a_missing_bucket_is_one_line(s3, capsys):
    line = one_line_error(capsys, [*ARGS, "--storage", "s3://no-such-bucket/runs"])
    assert "bucket no-such-bucket does not exist" in line


def test_refused_credentials_are_one_line_before_ray_starts(s3):
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIANOTAKEY", "AWS_SECRET_ACCESS_KEY": "wrong"}
    proc = _cli(*ARGS, "--storage", f"s3://{BUCKET}/runs", stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert err.strip().splitlines() == [err.strip()] and err.startswith("ray_train: error: run.storage:"), err
    assert f"access to bucket {BUCKET} denied" in err
    assert "cluster:" not in out  # the cluster line is the first thing a started run prints


def test_an_unknown_scheme_a_resume_of_nothing_and_compare_on_a_uri_are_one_line(s3, capsys):
    assert "unknown scheme foo://" in one_line_error(capsys, [*ARGS, "--storage", "foo://somewhere/runs"])
    line = one_line_error(capsys, ["--resume", f"s3://{BUCKET}/runs/never-ran"])
    assert "no such run folder" in line
    line = one_line_error(capsys, ["compare", "--storage", f"s3://{BUCKET}/runs"])
    assert "compare writes to a local folder" in line


def test_a_shard_restarted_without_access_ends_the_run_with_that_line(s3, ray_cluster):
    """The same shard as a Ray actor on a worker whose environment has no valid key: its death
    carries the line, which the engine raises as the run's StorageError (one line, exit 2)."""
    import ray

    from ray_train.config import OptimConfig
    from ray_train.strategies.downpour.engine import _storage_failure
    from ray_train.strategies.downpour.parameter_server import ParameterShard

    path = f"s3://{BUCKET}/runs/z/ps/shard-1.pt"
    env = {"AWS_ENDPOINT_URL": s3, "AWS_ACCESS_KEY_ID": "AKIANOTAKEY", "AWS_SECRET_ACCESS_KEY": "wrong"}
    shard = ray.remote(ParameterShard).options(num_cpus=0, max_restarts=0, runtime_env={"env_vars": env}).remote(
        1, 6, OptimConfig(optimizer="sgd", lr=0.1), None, False, path)
    with pytest.raises(ray.exceptions.RayActorError) as err:
        ray.get(shard.info.remote(), timeout=300)
    line = _storage_failure(err.value)
    assert line is not None and line.startswith(f"parameter shard 1 cannot read its snapshot {path}"), str(err.value)
