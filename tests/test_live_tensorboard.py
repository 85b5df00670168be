"""Live metrics, end to end with real components: a run that is still training
(``python -m ray_train`` as a subprocess) and a real ``tensorboard --logdir`` server on 127.0.0.1,
read over TensorBoard's HTTP API twice while training goes on. The second read must show more
train/loss steps than the first: points stream in as the run trains (the writer flushes every
FLUSH_SECS), not as files at the end.

Every process the test starts carries a marker in its environment (the trainer's local Ray
cluster, TensorBoard's data server); the teardown ends exactly those, on success or failure.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from ray_train.cluster import free_port
from ray_train.metrics.tensorboard import FLUSH_SECS
from tests.conftest import MARKER, ROOT, kill_marked

VENV_BIN = os.path.dirname(sys.executable)
RUN = "live"
FIRST_POINTS_S = 120  # Ray start + data + first flush, on a busy 2-core machine
GROWTH_S = 10 * FLUSH_SECS


def stop(procs: list[subprocess.Popen], marker: str, grace_s: float = 30.0) -> None:
    """SIGINT to the trainer (KeyboardInterrupt: it shuts its Ray cluster down), SIGTERM to
    TensorBoard, then SIGKILL for anything still carrying the marker."""
    for proc, sig in zip(procs, (signal.SIGINT, signal.SIGTERM)):
        if proc.poll() is None:
            proc.send_signal(sig)
    for proc in procs:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    kill_marked(marker, grace_s)


def read_steps(base: str, tag: str) -> list[int]:
    """Steps of one scalar series over TensorBoard's HTTP API ([wall_time, step, value] rows);
    [] while TensorBoard does not know the run or tag yet."""
    query = urllib.parse.urlencode({"run": RUN, "tag": tag})
    try:
        with urllib.request.urlopen(f"{base}/data/plugin/scalars/scalars?{query}", timeout=10) as resp:
            rows = json.loads(resp.read())
    except (urllib.error.URLError, ConnectionError, OSError, ValueError):
        return []
    return [int(step) for _, step, _ in rows]


@pytest.fixture
def workdir():
    tmp = tempfile.mkdtemp(prefix="rtb-", dir="/tmp")  # short: the trainer's Ray sockets live under it
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def test_tensorboard_serves_scalars_while_the_run_trains(workdir):
    storage = os.path.join(workdir, "runs")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update({MARKER: workdir, "RAY_TMPDIR": workdir})
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # 12 epochs of 31 steps: ~20-40 s of training on 2 cores, far longer than two flush intervals
    log_path = os.path.join(workdir, "train.log")
    log = open(log_path, "w")
    trainer = subprocess.Popen(
        [sys.executable, "-m", "ray_train", "--epochs", "12", "--log-every", "2", "--storage", storage,
         "--run-name", RUN, "--no-progress"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    board = subprocess.Popen(
        [os.path.join(VENV_BIN, "tensorboard"), "--logdir", storage, "--port", str(port), "--host", "127.0.0.1",
         "--reload_interval", "1"],
        cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + FIRST_POINTS_S
        while not (first := read_steps(base, "train/loss")):
            assert trainer.poll() is None, f"training ended before TensorBoard showed a point:\n{_tail(log_path)}"
            assert board.poll() is None, f"tensorboard exited with {board.returncode}"
            assert time.monotonic() < deadline, f"no train/loss points over HTTP within {FIRST_POINTS_S} s"
            time.sleep(0.5)
        assert trainer.poll() is None, "the first read must happen while the run trains"

        deadline = time.monotonic() + GROWTH_S
        while max(second := read_steps(base, "train/loss")) <= max(first):
            assert time.monotonic() < deadline, f"no new steps within {GROWTH_S} s (still at {max(first)})"
            time.sleep(0.5)
        still_training = trainer.poll() is None

        assert len(second) > len(first)
        assert second[:len(first)] == first  # the same series, extended: no rewritten history
        assert second == sorted(second) and len(set(second)) == len(second)
        assert still_training, "the second read must also happen while the run trains"
        with urllib.request.urlopen(f"{base}/data/runs", timeout=10) as resp:
            assert RUN in json.loads(resp.read())
    finally:
        stop([trainer, board], workdir)
        log.close()


def _tail(path: str, n: int = 40) -> str:
    with open(path, errors="replace") as fh:
        return "".join(fh.readlines()[-n:])
