"""Where the CPU goes during a CLI run (issue 23 item 10): runs ``python -m ray_train ARGS`` in a
fresh process (its own local cluster, as ``make train``) and, every ``--every`` seconds, reads the
CPU seconds of every process of that run from /proc: the driver, the replicas, and each of Ray's
own processes (gcs_server, raylet, the autoscaler monitor, the dashboard, the log monitor, the
agents). Prints one JSON document: CPU seconds per role over the run, and the run's samples/s.

    python scripts/profile_cli.py -- --model net_b --optimizer sgd --lr 0.05 --epochs 3 --no-progress

Linux only (/proc). On a shared machine the absolute figures move with the load; the shares of
the run's own CPU time are what to read.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")
ROLES = (("gcs_server", "gcs_server"), ("raylet/raylet", "raylet"), ("monitor.py", "autoscaler monitor"),
         ("dashboard/dashboard.py", "dashboard"), ("log_monitor.py", "log monitor"),
         ("dashboard/agent.py", "dashboard agent"), ("runtime_env/agent", "runtime env agent"),
         ("ray::Replica", "replicas"), ("ray::IDLE", "idle workers"), ("default_worker.py", "workers"))


def children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                tree.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def cpu_and_role(pid: int, driver: int) -> tuple[float, str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    seconds = (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
    if pid == driver:
        return seconds, "driver"
    # a worker whose title Ray has not set (or reset) is a worker all the same: the replicas, mostly
    role = next((name for needle, name in ROLES if needle in cmd), cmd.split(" ")[0].rsplit("/", 1)[-1] or "workers")
    return seconds, role


TRAINING_STARTS = re.compile(r"^[\w ()-]+: \d+ replicas? on ")  # the strategy's describe line


def by_role(cpu: dict[int, tuple[float, str]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for seconds, role in cpu.values():
        out[role] = out.get(role, 0.0) + seconds
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--every", type=float, default=0.5, help="seconds between samples (default 0.5)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the CLI's arguments, after --")
    a = p.parse_args()
    args = [x for x in a.args if x != "--"]
    storage = tempfile.mkdtemp(prefix="profile-cli-")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ray_train", *args, "--storage", storage, "--run-name", "run"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    marks: dict[str, dict[int, tuple[float, str]]] = {}

    def snapshot() -> dict[int, tuple[float, str]]:
        return {pid: got for pid in descendants(proc.pid) if (got := cpu_and_role(pid, proc.pid)) is not None}

    def read() -> None:  # the run's lines as they come: the training window opens and closes on them
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if TRAINING_STARTS.search(line) and "start" not in marks:
                marks["start"] = snapshot()
            if line.startswith(("best validation accuracy", "done:")) and "end" not in marks:
                marks["end"] = snapshot()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    last: dict[int, tuple[float, str]] = {}
    while proc.poll() is None:
        last.update(snapshot())  # CPU seconds only grow: the last sample of a process is its total
        time.sleep(a.every)
    reader.join()
    wall = time.perf_counter() - t0
    output = "\n".join(lines)
    per_role = by_role(last)
    window = {}
    if "start" in marks and "end" in marks:
        start = marks["start"]
        window = by_role({pid: (sec - start.get(pid, (0.0, role))[0], role) for pid, (sec, role) in marks["end"].items()})
    total = sum(per_role.values())
    summary = {}
    try:
        with open(os.path.join(storage, "run", "summary.json")) as fh:
            summary = json.load(fh)
    except OSError:
        pass
    replicas = window.get("replicas", 0.0) + window.get("workers", 0.0)
    print(json.dumps({"command": "python -m ray_train " + " ".join(args), "status": proc.returncode,
                      "training_window_cpu_s": {k: round(v, 2) for k, v in sorted(window.items(), key=lambda kv: -kv[1])},
                      "training_window_cpu_per_replica_cpu_s": {k: round(v / replicas, 3) for k, v in window.items()
                                                                if replicas and k not in ("replicas", "workers")},
                      "wall_s": round(wall, 1), "train_s": summary.get("train_s"),
                      "samples_per_s": summary.get("samples_per_s"),
                      "cpu_s": {k: round(v, 2) for k, v in sorted(per_role.items(), key=lambda kv: -kv[1])},
                      "cpu_share": {k: round(v / total, 3) for k, v in sorted(per_role.items(), key=lambda kv: -kv[1])},
                      "output_tail": output.splitlines()[-3:]}, indent=2))


if __name__ == "__main__":
    main()
