"""Shared fixtures. Ray starts slowly, so one local cluster serves the whole session; tests that
need Ray ask for ``ray_cluster``. Everything runs on CPU."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RAY_CPUS = 2


@pytest.fixture(scope="session")
def _ray_down_at_the_end():
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster(_ray_down_at_the_end):
    """The suite's local cluster, started by the first module that asks and kept for the next ones
    (tests/test_multinode.py replaces it with a cluster of fake nodes and shuts that down: the next
    module starts a local one again)."""
    import ray

    from ray_train.cluster import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=RAY_CPUS)
    return ray


def one_line_error(capsys, argv) -> str:
    """Run the CLI on ``argv``: it must exit 2 with exactly one line on stderr, the
    "ray_train: error: ..." line, and no traceback. Returns the line for the test to check."""
    from ray_train.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("ray_train: error:") and "Traceback" not in err[0], err[0]
    return err[0]


def vanish(cluster, node) -> None:
    """Remove a fake node as a machine vanishes: its Ray daemons and every process its raylet
    started (the replicas on it) die at once. ``remove_node`` alone kills the daemons; the workers
    noticed seconds later, and epochs went on ending on them meanwhile (tests raced that)."""
    import signal

    from scripts.profile_cli import descendants

    raylet = node.all_processes["raylet"][0].process.pid
    workers = descendants(raylet)[1:]  # [0] is the raylet itself
    cluster.remove_node(node, allow_graceful=False)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


MARKER = "RAY_TRAIN_TEST_MARKER"  # an environment variable set on processes a test starts (ray start, TensorBoard)


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries ``MARKER=marker``: exactly the ones this test started,
    and what they started in turn."""
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


def kill_marked(marker: str, grace_s: float) -> None:
    """Wait up to ``grace_s`` for the marked processes to end by themselves, then SIGKILL the rest."""
    import signal
    import time

    deadline = time.monotonic() + grace_s
    while marked_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in marked_pids(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
