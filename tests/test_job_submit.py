"""The CLI as a Ray job, end to end with real components: a Ray head started by ``ray start --head``,
the default job submitted through scripts/submit.sh (``ray job submit --working-dir .
--runtime-env cluster/runtime_env.yaml -- python scripts/train.py ...``), its status and logs read
back from the job server, its event files and summary.json read from the --storage path.

The head is independent of the session's ``ray_cluster``: its own free ports, its own --temp-dir
(so no ray.init() elsewhere finds it through /tmp/ray/ray_current_cluster) and its own token
(RAY_AUTH_TOKEN_PATH, token authentication on). Every process it starts carries a marker in its
environment, and the teardown ends exactly those, on success or failure.
"""
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import ROOT

VENV_BIN = os.path.dirname(sys.executable)
MARKER = "RAY_TRAIN_TEST_MARKER"
HEAD_START_S = 90
JOB_S = 180
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries ``MARKER=marker``: exactly the ones this test started."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:  # gone, or not ours to read
            pass
    return pids


def stop_marked(proc: subprocess.Popen, marker: str, grace_s: float = 30.0) -> None:
    """SIGTERM to the process we started (``ray start --block`` then stops its node), then SIGKILL
    for anything still carrying the marker."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + grace_s
    while marked_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in marked_pids(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def http_json(url: str, token: str | None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, json.loads(resp.read() or b"null")


@pytest.fixture
def ray_head():
    """A real single-node Ray cluster from ``ray start --head`` with 2 CPUs and its job server."""
    tmp = tempfile.mkdtemp(prefix="rtj-", dir="/tmp")  # short: Ray's socket paths live under it
    token = secrets.token_hex(32)
    token_file = os.path.join(tmp, "auth_token")
    with open(token_file, "w") as fh:
        fh.write(token)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update({
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_file, MARKER: tmp,
        # the job's driver runs `python` from the PATH of `ray start`: this venv's, with torch
        "PATH": VENV_BIN + os.pathsep + env.get("PATH", ""),
    })
    dash = free_port()
    ports = {flag: free_port() for flag in (
        "--port", "--ray-client-server-port", "--node-manager-port", "--object-manager-port",
        "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
        "--runtime-env-agent-port")}
    cmd = [os.path.join(VENV_BIN, "ray"), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--temp-dir", os.path.join(tmp, "ray"),
           "--disable-usage-stats", *[str(x) for kv in ports.items() for x in kv]]
    log = open(os.path.join(tmp, "ray-start.log"), "w")
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + HEAD_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start --head exited with {proc.returncode}:\n{_tail(log.name)}")
            try:
                if http_json(f"{url}/api/jobs/", token)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the job server at {url} did not answer within {HEAD_START_S} s:\n{_tail(log.name)}")
            time.sleep(0.5)
        yield {"url": url, "token": token, "env": env, "tmp": tmp}
    finally:
        stop_marked(proc, tmp)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _tail(path: str, n: int = 40) -> str:
    with open(path, errors="replace") as fh:
        return "".join(fh.readlines()[-n:])


def test_default_job_under_ray_job_submit(ray_head):
    url, token, tmp = ray_head["url"], ray_head["token"], ray_head["tmp"]
    env = {**ray_head["env"], "RAY_ADDRESS": url, "RAY_TRAIN_JOB_ID": "ray-train-e2e"}

    # token authentication is on: the job server turns away a request without the token
    with pytest.raises(urllib.error.HTTPError) as denied:
        http_json(f"{url}/api/jobs/", None)
    assert denied.value.code == 401

    storage = os.path.join(tmp, "shared-runs")
    submit = subprocess.run(
        ["bash", "scripts/submit.sh", "--config", "configs/default.yaml", "--epochs", "1", "--storage", storage,
         "--run-name", "job", "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stderr[-3000:]
    assert "job id: ray-train-e2e" in submit.stdout
    assert "ray job logs -f ray-train-e2e" in submit.stdout
    assert f"tensorboard --logdir {storage}" in submit.stdout

    deadline = time.monotonic() + JOB_S
    while (info := http_json(f"{url}/api/jobs/ray-train-e2e", token)[1])["status"] not in TERMINAL:
        assert time.monotonic() < deadline, f"job still {info['status']} after {JOB_S} s"
        time.sleep(1)
    logs = subprocess.run([os.path.join(VENV_BIN, "ray"), "job", "logs", "ray-train-e2e"], env=env,
                          capture_output=True, text=True, timeout=60).stdout
    assert info["status"] == "SUCCEEDED", f"{info['status']}: {info.get('message')}\n{logs[-3000:]}"

    # the driver joined the job's cluster (no local one), trained an epoch, pointed at TensorBoard
    assert "Connecting to existing Ray cluster" in logs
    assert "Started a local Ray instance" not in logs
    assert re.search(r"^epoch\s+1\s+loss \d+\.\d+\s+train acc 0\.\d+\s+val acc 0\.\d+\s+test loss \d+\.\d+ acc 0\.\d+", logs, re.M), logs
    assert f"watch it: tensorboard --logdir {storage}" in logs

    run_dir = os.path.join(storage, "job")
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    assert (summary["strategy"], summary["model"], summary["replicas"], summary["epochs"]) == ("sync", "net_d", 2, 1)
    assert summary["test_accuracy"] > 0.5  # one epoch of net D on mnist5k reaches ~0.7; chance is 0.1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [f for f in os.listdir(run_dir) if f.startswith("events.out.tfevents.")]
    assert len(events) == 1, os.listdir(run_dir)
    acc = EventAccumulator(run_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "test/accuracy", "throughput/samples_per_s"} <= tags, tags
    assert len(acc.Scalars("train/loss")) >= 2
    assert acc.Scalars("test/accuracy")[-1].value == pytest.approx(summary["test_accuracy"], abs=1e-6)


def test_submit_without_an_address_is_a_one_line_error():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    out = subprocess.run(["bash", "scripts/submit.sh", "--epochs", "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("submit.sh: error: RAY_ADDRESS is not set")
    assert out.stdout == ""
