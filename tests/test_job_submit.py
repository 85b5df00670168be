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
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from ray_train.cluster import free_port
from tests.conftest import MARKER, ROOT, kill_marked

VENV_BIN = os.path.dirname(sys.executable)
HEAD_START_S = 90
JOB_S = 180
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


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
    kill_marked(marker, grace_s)


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
    # docs/cluster.md's `ray start --head` line, on free ports and a temp dir of its own, plus the
    # ports of the head's other processes (other clusters run on this machine)
    cmd, dash = recipe_head(tmp)
    ports = {flag: free_port() for flag in (
        "--ray-client-server-port", "--node-manager-port", "--object-manager-port",
        "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
        "--runtime-env-agent-port")}
    cmd += ["--block", "--num-gpus", "0", *[str(x) for kv in ports.items() for x in kv]]
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


def recipe() -> list[str]:
    """The lines of docs/cluster.md's local-head recipe."""
    with open(os.path.join(ROOT, "docs", "cluster.md"), encoding="utf-8") as fh:
        text = fh.read()
    block = text[text.index("<!-- local-head:begin -->"):text.index("<!-- local-head:end -->")]
    return [line.split("  #")[0].strip() for line in block.splitlines()[1:] if line.strip()]


def recipe_head(tmp: str) -> tuple[list[str], int]:
    """The recipe's `ray start --head` command with its ports and temp dir swapped for free ones."""
    line = next(ln for ln in recipe() if " start --head" in ln)
    words = line.split()
    assert words[0] == ".venv/bin/ray", line
    words[0] = os.path.join(VENV_BIN, "ray")
    swap = {"--port": str(free_port()), "--dashboard-port": str(free_port()), "--temp-dir": os.path.join(tmp, "ray")}
    for i, word in enumerate(words[:-1]):
        if word in swap:
            words[i + 1] = swap[word]
    return words, int(swap["--dashboard-port"])


def _tail(path: str, n: int = 40) -> str:
    with open(path, errors="replace") as fh:
        return "".join(fh.readlines()[-n:])


def test_default_job_under_ray_job_submit(ray_head):
    """docs/cluster.md's local-head recipe: its submit line, then the commands submit.sh prints,
    pasted into a shell that has neither RAY_ADDRESS nor RAY_AUTH_MODE."""
    url, token, tmp = ray_head["url"], ray_head["token"], ray_head["tmp"]
    env = {**ray_head["env"], "RAY_ADDRESS": url, "RAY_TRAIN_JOB_ID": "ray-train-e2e"}
    assert "export RAY_AUTH_MODE=token" in recipe()

    # token authentication is on: the job server turns away a request without the token
    with pytest.raises(urllib.error.HTTPError) as denied:
        http_json(f"{url}/api/jobs/", None)
    assert denied.value.code == 401

    storage = os.path.join(tmp, "shared-runs")
    line = next(ln for ln in recipe() if ln.startswith("scripts/submit.sh "))
    args = [storage if a == "$PWD/runs" else a for a in line.split()[1:]]
    submit = subprocess.run(["bash", "scripts/submit.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert submit.returncode == 0, submit.stderr[-3000:]
    assert submit.stderr == ""
    assert "job id: ray-train-e2e" in submit.stdout
    assert f"RAY_ADDRESS={url} RAY_AUTH_MODE=token ray job logs -f ray-train-e2e" in submit.stdout
    assert f"tensorboard --logdir {storage}" in submit.stdout
    pasted = {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_API_SERVER_ADDRESS")}

    deadline = time.monotonic() + JOB_S
    while (info := http_json(f"{url}/api/jobs/ray-train-e2e", token)[1])["status"] not in TERMINAL:
        assert time.monotonic() < deadline, f"job still {info['status']} after {JOB_S} s"
        time.sleep(1)
    follow = next(ln for ln in submit.stdout.splitlines() if ln.startswith("follow its logs:")).split(":", 1)[1]
    done = subprocess.run(["bash", "-c", follow.strip()], env=pasted, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "AuthenticationError" not in done.stderr, done.stderr[-3000:]
    assert "done: test accuracy" in done.stdout  # the driver's lines, after `ray job logs`' own header
    logs = http_json(f"{url}/api/jobs/ray-train-e2e/logs", token)[1]["logs"]  # the driver's lines alone
    assert info["status"] == "SUCCEEDED", f"{info['status']}: {info.get('message')}\n{logs[-3000:]}"
    status = next(ln for ln in submit.stdout.splitlines() if ln.startswith("status / stop:")).split(":", 1)[1]
    asked = subprocess.run(["bash", "-c", status.split(" / ")[0].strip()], env=pasted, capture_output=True, text=True,
                           timeout=120)
    assert asked.returncode == 0 and "succeeded" in (asked.stdout + asked.stderr).lower(), asked.stderr[-2000:]

    # the driver joined the job's cluster (no local one) and said so first, trained an epoch, pointed at
    # TensorBoard; Ray's own lines went to the run folder's ray.log
    # the job server's own lines ("Runtime env is setting up", "Running entrypoint ...") come first
    ours = [ln for ln in logs.split("Running entrypoint for job", 1)[1].splitlines()[1:] if ln.strip()]
    assert re.match(r"cluster: joined the Ray cluster at \S+, 1 node, 2 CPUs \(RAY_ADDRESS=", ours[0]), ours[:3]
    assert "Connecting to existing Ray cluster" not in logs and "Started a local Ray instance" not in logs
    assert re.search(r"^epoch\s+1\s+loss \d+\.\d+\s+train acc 0\.\d+\s+val acc 0\.\d+\s+test loss \d+\.\d+ acc 0\.\d+", logs, re.M), logs
    assert f"watch it: tensorboard --logdir {storage}" in logs

    run_dir = os.path.join(storage, "first-job")
    assert "Connecting to existing Ray cluster" in open(os.path.join(run_dir, "ray.log")).read()
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


def _fake_ray(tmp_path) -> dict:
    """An environment whose `ray` only records its arguments: submit.sh's own logic, no cluster."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "ray"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'ray-args'}\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE")}
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "RAY_ADDRESS": "http://127.0.0.1:8266",
                "RAY_TRAIN_JOB_ID": "job-1"})
    return env


def test_an_absolute_resume_path_is_the_storage_and_the_hints_are_complete(tmp_path):
    run = tmp_path / "shared" / "sync-run"
    out = subprocess.run(["bash", "scripts/submit.sh", "--resume", str(run)], cwd=ROOT, env=_fake_ray(tmp_path),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "no --storage given" not in out.stderr and out.stderr == ""
    assert (tmp_path / "ray-args").read_text().split()[-2:] == ["--resume", str(run)]
    assert "follow its logs:  RAY_ADDRESS=http://127.0.0.1:8266 RAY_AUTH_MODE=token ray job logs -f job-1" in out.stdout
    assert f"tensorboard --logdir {tmp_path / 'shared'} " in out.stdout
    # a relative one names no shared folder: the warning stays
    rel = subprocess.run(["bash", "scripts/submit.sh", "--resume", "runs/x"], cwd=ROOT, env=_fake_ray(tmp_path),
                         capture_output=True, text=True, timeout=60)
    assert "no --storage given" in rel.stderr


def test_an_entrypoint_python_without_torch_says_why_in_one_line():
    """A head started outside the virtual environment runs the job with a Python that lacks torch;
    here: this Python without its site-packages (-S)."""
    out = subprocess.run([sys.executable, "-S", "scripts/train.py", "--epochs", "1"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"ray_train: error: this Python ({sys.executable}) has no torch")
    assert "Start the head from the project's virtual environment (.venv/bin/ray start --head" in lines[0]
