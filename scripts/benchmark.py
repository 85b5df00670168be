"""Benchmark (``make bench``): samples/s of the same job run by

  (a) a plain single-process PyTorch loop, 1 thread (batch 64) and 2 threads (batch 128), and
      two 1-thread loops side by side (what two cores give two workers that never communicate),
  (b) this project's sync SGD with 1 and with 2 replicas (batch 64 per replica), through its own
      harness (a ReplicaGroup driven as the sync engine drives it) and through the CLI
      (``python -m ray_train``, what a user runs: evaluation, checkpoints and TensorBoard each epoch,
      samples/s from its summary.json; ``--ray-defaults`` adds the CLI cases with Ray's own
      background settings on their local cluster),
  (c) Ray Train's TorchTrainer with 2 workers (DDP over gloo, batch 64 per worker),

all on Nielsen's net B and MNIST-5k with plain SGD, 300 timed steps after a warm-up, in one run.
Each system runs in a fresh subprocess, so its whole-run wall time (interpreter, imports, Ray
start-up, data) is measured too. Every case runs once per round, ``--repeat`` rounds (default 3):
the report gives each case's median and the ratios per round. The async, ensemble, regimes, pipeline and data
sections come from scripts/bench_async.py, scripts/bench_ensemble.py, scripts/bench_regimes.py,
scripts/bench_pipeline.py and scripts/bench_data.py; the multinode section (sync across two fake Ray nodes
against one node and against Ray Train) from scripts/bench_multinode.py, in a process of its own.

Prints one JSON document on stdout and writes a PNG bar chart (``--out``, default bench/).
Compare ratios within one run only: the machines are shared and noisy.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODEL, LR = "net_b", 0.05


# -- the cases, each run in its own subprocess ------------------------------------------------
def _mnist5k():
    from ray_train.config import DataConfig
    from ray_train.data.loaders import load_dataset

    return load_dataset(DataConfig(dataset="mnist5k"))


def case_plain(threads: int, batch: int, steps: int, warmup: int) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from models import build_model
    from ray_train.cluster import tune_malloc
    from ray_train.worker.batches import to_tensor

    # The same allocator settings as this project's replicas, so that the ratios against this
    # baseline measure distribution alone (untuned, this loop page-faults its buffers back in
    # every step: ray_train.cluster.tune_malloc). Ray Train's workers run as Ray Train runs them.
    tune_malloc()
    torch.set_num_threads(threads)
    data = _mnist5k()
    torch.manual_seed(0)
    model = build_model(MODEL)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rng = np.random.default_rng(0)

    def batches():
        while True:
            perm = rng.permutation(len(data.y_train))
            for s in range(0, len(perm) - batch + 1, batch):
                yield perm[s : s + batch]

    it = batches()

    def step():
        idx = next(it)
        x, y = to_tensor(data.x_train[idx]), torch.from_numpy(data.y_train[idx])
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - t0
    return {"samples_per_s": steps * batch / elapsed, "timed_s": elapsed}


def case_plain_cold(threads: int, batch: int, steps: int, warmup: int) -> dict:
    """The plain loop timed as the CLI case is (case_cli): the same whole epochs, from its first
    step (no warm-up left out), a fresh permutation per epoch: what a user's own loop over the
    same job would measure."""
    spe = TRAIN // batch
    epochs = -(-(steps + warmup) // spe)
    return {**case_plain(threads, batch, epochs * spe, 0), "epochs": epochs}


def case_ours(replicas: int, batch: int, steps: int, warmup: int) -> dict:
    import ray

    from ray_train.cluster import init_ray

    init_ray(num_cpus=2, preload=("ray_train.worker.group", "ray_train.data.loaders"))  # as the CLI does

    from ray_train.config import build_config
    from ray_train.network import model_factory
    from ray_train.worker.group import ReplicaGroup

    cfg = build_config({}, {"run": {"batch_size": batch, "log_every": 10},
                            "model": {"name": MODEL}, "optim": {"optimizer": "sgd", "lr": LR},
                            "resources": {"replicas": replicas, "cpus_per_replica": 1}})
    data = _mnist5k()
    group = ReplicaGroup.create(cfg, ray.put(data), model_factory(cfg, data))
    try:
        state = {"epoch": 0, "position": 0, "done": 0, "busy_ms": 0.0}

        def on_chunk(results) -> None:
            state["done"] += len(results[0]["step_ms"])
            state["busy_ms"] += max(float(sum(r["step_ms"])) for r in results)

        def run(n: int) -> int:
            """At least n steps, as the sync engine runs them (ReplicaGroup.train_epoch: chunks of
            log_every, two queued per replica); returns the steps taken (a chunk may overshoot)."""
            start, target = state["done"], state["done"] + n
            while state["done"] < target:
                before = state["done"]
                complete = group.train_epoch(state["epoch"], LR, state["position"], 10, on_chunk,
                                             lambda: state["done"] >= target)
                state["position"] = 0 if complete else state["position"] + state["done"] - before
                state["epoch"] += complete
            return state["done"] - start

        run(warmup)
        state["busy_ms"] = 0.0
        t0 = time.perf_counter()
        steps = run(steps)
        elapsed = time.perf_counter() - t0
    finally:
        comm = group.comm
        group.shutdown()
    return {"samples_per_s": steps * batch * replicas / elapsed, "timed_s": elapsed, "allreduce": comm,
            "busy_share": state["busy_ms"] / 1000 / elapsed}


TRAIN = 3500  # mnist5k's training split (less its validation)


def case_cli(replicas: int, batch: int, steps: int, warmup: int) -> dict:
    """What a user gets: ``python -m ray_train`` on the same job, in this process as a user runs
    it (its own local cluster, evaluation and checkpoints each epoch, TensorBoard on), as many
    epochs as cover warm-up + steps. samples/s is the run's own (summary.json: training time
    only, evaluation excluded); it includes the first epoch's warm-up, as a user's run does."""
    import tempfile

    from ray_train.cli import main as cli

    spe = TRAIN // replicas // batch
    epochs = -(-(steps + warmup) // spe)
    storage = tempfile.mkdtemp(prefix="cli-bench-")
    argv = ["--model", MODEL, "--optimizer", "sgd", "--lr", str(LR), "--batch-size", str(batch), "--replicas",
            str(replicas), "--epochs", str(epochs), "--no-progress", "--storage", storage, "--run-name", "bench"]
    if cli(argv) != 0:
        raise SystemExit("the CLI run failed")
    with open(os.path.join(storage, "bench", "summary.json")) as fh:
        summary = json.load(fh)
    later = summary["history"][1:]  # the epochs after the first: the run's steady state
    steady = ({"steady_samples_per_s": sum(h["samples_per_s"] * h["epoch_s"] for h in later)
               / sum(h["epoch_s"] for h in later)} if later else {})
    return {"samples_per_s": summary["samples_per_s"], "timed_s": summary["train_s"], "epochs": epochs, **steady,
            "epoch_samples_per_s": [h["samples_per_s"] for h in summary["history"]],
            "steps": summary["steps"], "allreduce": summary.get("allreduce"),
            "busy_share": busy_seconds(os.path.join(storage, "bench"), replicas) / summary["train_s"]}


def busy_seconds(run_dir: str, replicas: int) -> float:
    """Seconds the slowest replica spent in its steps (each chunk's mean step time x its steps,
    from the run's TensorBoard scalars): over the training time, the share not lost between
    steps (driver round trips, epoch boundaries)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    per_rank = []
    for r in range(replicas):
        points = acc.Scalars(f"time/step_ms/replica_{r}")
        steps = [p.step for p in points]
        sizes = [b - a for a, b in zip([0] + steps[:-1], steps)]
        per_rank.append([p.value * n / 1000 for p, n in zip(points, sizes)])
    return sum(max(chunk) for chunk in zip(*per_rank))


def _raytrain_loop(config: dict) -> None:
    """Ray Train's worker function: DDP (gloo) over the same model, data and SGD (here and in
    bench_multinode.py). Each rank writes its figures and node to ``out.<rank>``."""
    import numpy as np
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.nn.functional as F

    from models import build_model
    from ray_train.worker.batches import to_tensor

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    data = _mnist5k()
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(build_model(MODEL))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    batch, rng = config["batch"], np.random.default_rng(rank)
    shard = np.arange(rank, len(data.y_train), world)

    def step():
        idx = rng.choice(shard, batch, replace=False)
        x, y = to_tensor(data.x_train[idx]), torch.from_numpy(data.y_train[idx])
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(config["warmup"]):
        step()
    t0 = time.perf_counter()
    for _ in range(config["steps"]):
        step()
    elapsed = time.perf_counter() - t0
    node = ray.get_runtime_context().get_node_id()
    with open(f"{config['out']}.{rank}", "w") as fh:  # Ray Train v2 keeps reported metrics only with checkpoints
        json.dump({"samples_per_s": config["steps"] * batch * world / elapsed, "timed_s": elapsed, "node": node}, fh)


def case_raytrain(workers: int, batch: int, steps: int, warmup: int) -> dict:
    import tempfile

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_train.cluster import init_ray

    init_ray(num_cpus=2)
    storage = tempfile.mkdtemp(prefix="raytrain-bench-")
    out = os.path.join(storage, "figures.json")
    trainer = TorchTrainer(
        _raytrain_loop, train_loop_config={"batch": batch, "steps": steps, "warmup": warmup, "out": out},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=storage, name="bench"))
    trainer.fit()
    with open(f"{out}.0") as fh:
        return json.load(fh)


CASES = {"plain": case_plain, "plain_cold": case_plain_cold, "ours": case_ours, "cli": case_cli, "raytrain": case_raytrain}


# -- the driver ---------------------------------------------------------------------------------
def _command(name: str, width: int, batch: int, steps: int, warmup: int) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--case", name, "--width", str(width),
            "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup)]


def run_case(name: str, width: int, batch: int, steps: int, warmup: int, copies: int = 1, env: dict | None = None,
             retries: int = 1) -> dict:
    """One case in a fresh interpreter (``copies`` of it side by side): its figures plus the
    whole run's wall time. With copies > 1 the samples/s add up and the wall is the longest."""
    t0 = time.perf_counter()
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    environ.update(env or {})
    procs = [subprocess.Popen(_command(name, width, batch, steps, warmup), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env=environ)
             for _ in range(copies)]
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - t0
    figures = []
    for proc, (stdout, stderr) in zip(procs, outs):
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(stderr[-3000:])
            if retries > 0:  # on a loaded machine Ray's node may miss its 30 s start-up deadline
                print(f"[bench] case {name} (width {width}) failed with status {proc.returncode}; once more",
                      file=sys.stderr, flush=True)
                return run_case(name, width, batch, steps, warmup, copies, env, retries - 1)
            raise SystemExit(f"benchmark case {name} (width {width}) failed with status {proc.returncode}")
        figures.append(json.loads(lines[-1]))
    out = {**figures[0], "wall_s": wall}
    if copies > 1:
        out["samples_per_s"] = sum(f["samples_per_s"] for f in figures)
        out["copies"] = [f["samples_per_s"] for f in figures]
    return out


# label -> (case, width, batch, side-by-side copies)
PLAN = {
    "plain_1thread": ("plain", 1, 64, 1),
    # two independent 1-thread loops at once: what two cores give two workers that never talk
    "plain_1thread_x2": ("plain", 1, 64, 2),
    "plain_2threads": ("plain", 2, 128, 1),
    # one plain loop timed as the CLI cases are: whole epochs from the first step
    "plain_1thread_cold": ("plain_cold", 1, 64, 1),
    "sync_1replica": ("ours", 1, 64, 1),
    "sync_2replicas": ("ours", 2, 64, 1),
    # the same through the CLI, as a user runs it
    "cli_sync_1replica": ("cli", 1, 64, 1),
    "cli_sync_2replicas": ("cli", 2, 64, 1),
    "raytrain_2workers": ("raytrain", 2, 64, 1),
}
# Ray's own settings for the periodic background work the CLI's local cluster turns down
# (ray_train.cluster.QUIET_LOCAL_CLUSTER): --ray-defaults runs the CLI cases with these too, to measure it
RAY_DEFAULTS = {"AUTOSCALER_UPDATE_INTERVAL_S": "5", "REPORTER_UPDATE_INTERVAL_MS": "5000",
                "RAY_enable_metrics_collection": "1", "RAY_USAGE_STATS_ENABLED": "0"}


RATIOS = {  # name: (numerator, denominator, of: samples/s or wall), each where both cases ran
    "sync2_vs_2x_plain1": ("sync_2replicas", "2x plain_1thread", "samples_per_s"),
    "sync2_vs_plain1_x2": ("sync_2replicas", "plain_1thread_x2", "samples_per_s"),
    "plain1_x2_vs_2x_plain1": ("plain_1thread_x2", "2x plain_1thread", "samples_per_s"),
    "sync2_vs_raytrain": ("sync_2replicas", "raytrain_2workers", "samples_per_s"),
    "sync1_vs_plain1": ("sync_1replica", "plain_1thread", "samples_per_s"),
    "cli_sync2_vs_plain1_x2": ("cli_sync_2replicas", "plain_1thread_x2", "samples_per_s"),
    "cli_sync1_vs_plain1": ("cli_sync_1replica", "plain_1thread", "samples_per_s"),
    "cli_sync1_vs_plain1_cold": ("cli_sync_1replica", "plain_1thread_cold", "samples_per_s"),
    "cli_sync1_steady_vs_plain1": ("cli_sync_1replica", "plain_1thread", "steady_samples_per_s"),
    "cli_sync2_vs_harness_sync2": ("cli_sync_2replicas", "sync_2replicas", "samples_per_s"),
    "cli_sync2_ray_defaults_vs_plain1_x2": ("cli_sync_2replicas_ray_defaults", "plain_1thread_x2", "samples_per_s"),
    "cli_sync2_vs_cli_sync2_ray_defaults": ("cli_sync_2replicas", "cli_sync_2replicas_ray_defaults", "samples_per_s"),
    "sync2_wall_vs_raytrain_wall": ("sync_2replicas", "raytrain_2workers", "wall_s"),
}


def core_ratios(figures: dict) -> dict:
    """The issue's targets as ratios, for the cases that ran: ``figures`` maps each case to its
    samples/s, whole-run wall seconds and (CLI cases) steady-state samples/s; the top's ``of``
    over the bottom's (the bottom's samples/s where the top's is a steady state)."""
    out = {}
    for name, (top, bottom, of) in RATIOS.items():
        times, bottom = (2, bottom[3:]) if bottom.startswith("2x ") else (1, bottom)
        under = "samples_per_s" if of == "steady_samples_per_s" else of
        if top in figures and bottom in figures and of in figures[top]:
            out[name] = figures[top][of] / (times * figures[bottom][under])
    return out


FIGURES = ("samples_per_s", "wall_s", "steady_samples_per_s")


def core(steps: int, warmup: int, repeat: int, cases: list[str] | None = None, ray_defaults: bool = False) -> dict:
    """Every case once per round, ``repeat`` rounds; the figures are each case's median, and the
    ratios are also given per round (cases of one round ran minutes apart at most)."""
    plan = {k: v for k, v in PLAN.items() if cases is None or k in cases}
    if ray_defaults:  # the CLI cases again, their local cluster with Ray's own background settings
        plan.update({f"{k}_ray_defaults": v for k, v in plan.items() if v[0] == "cli"})
    rounds: list[dict] = []
    for k in range(repeat):
        results = {}
        for label, (case, width, batch, copies) in plan.items():
            print(f"[bench] round {k + 1}/{repeat} {label} ...", file=sys.stderr, flush=True)
            env = RAY_DEFAULTS if label.endswith("_ray_defaults") else {}
            results[label] = run_case(case, width, batch, steps, warmup, copies, env)
            print(f"[bench] round {k + 1}/{repeat} {label}: {results[label]['samples_per_s']:,.0f} samples/s, "
                  f"{results[label]['wall_s']:.1f} s wall", file=sys.stderr, flush=True)
        rounds.append(results)
    median = {label: {key: statistics.median(r[label][key] for r in rounds) for key in FIGURES if key in rounds[0][label]}
              for label in plan}
    per_round = [core_ratios(r) for r in rounds]
    return {"results": median, "ratios": core_ratios(median), "rounds": rounds, "ratios_per_round": per_round}


def extras(names: list[str], steps: int, warmup: int, repeat: int = 3) -> dict:
    """The async, ensemble, regimes, pipeline and data sections, in this process on one local Ray cluster."""
    out = {}
    for name in names:
        path = os.path.join(ROOT, "scripts", f"bench_{name}.py")
        if not os.path.exists(path):
            continue
        if name == "multinode":  # a cluster of fake nodes of its own, with drivers joining it
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, path, "--steps", str(steps), "--warmup", str(warmup), "--repeat",
                                   str(repeat), "--four"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"benchmark section {name} failed with status {proc.returncode}")
            out[name] = json.loads(proc.stdout)
            continue
        import importlib.util

        from ray_train.cluster import init_ray

        init_ray(num_cpus=2)
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        out[name] = module.bench(steps=steps, warmup=warmup) if name == "async" else module.bench()
    return out


def chart(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["core"]["results"]
    labels = list(res)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(labels, [res[k]["samples_per_s"] for k in labels], color="tab:blue")
    a.set_title("throughput, net B, batch 64 per worker (samples/s)")
    b.bar(labels, [res[k]["wall_s"] for k in labels], color="tab:orange")
    b.set_title(f"whole-run wall time, {report['steps']} steps (s)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
        for lab in ax.get_xticklabels():
            lab.set_ha("right")
    fig.suptitle(f"ray-train benchmark {report['date']} on {report['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def latest_table(report: dict) -> str:
    """docs/bench-latest.md: the core cases' medians and ratios of this run, with date, machine and command."""
    lines = ["# Latest `make bench`", "", "<!-- written by scripts/benchmark.py; docs/benchmarks.md explains the cases -->",
             "", f"{report['date']}, {report['machine']}: `{report['command']}` ({report['repeat']} rounds, "
             f"{report['steps']} timed steps after {report['warmup']} warm-up, {report['model']}; medians).", ""]
    if "core" in report:
        lines += ["| case | samples/s | whole-run wall s |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['samples_per_s']:,.0f} | {v['wall_s']:.1f} |" for k, v in report["core"]["results"].items()]
        lines += ["", "| ratio | median | per round |", "|---|---:|---|"]
        lines += [f"| {k} | {v:.2f} | {', '.join(f'{r[k]:.2f}' for r in report['core']['ratios_per_round'])} |"
                  for k, v in report["core"]["ratios"].items()]
    if "multinode" in report:
        m = report["multinode"]
        lines += ["", f"Multinode (fake Ray nodes on this machine{', loaded' if m['loaded'] else ''}: load average "
                  f"{m['load_average']['min']:.1f}-{m['load_average']['max']:.1f} on {m['load_average']['cores']} cores):",
                  "", "| case | samples/s |", "|---|---:|"]
        lines += [f"| {k} | {v:,.0f} |" for k, v in m["samples_per_s"].items()]
        lines += ["", "| ratio | median | per round | target |", "|---|---:|---|---:|"]
        lines += [f"| {k} | {v:.2f} | {', '.join(f'{r[k]:.2f}' for r in m['ratios_per_round'])} | {m['targets'][k] or ''} |"
                  for k, v in m["ratios"].items()]
    others = [k for k in ("async", "ensemble", "regimes", "pipeline") if k in report]
    if others:
        lines += ["", "Sections " + ", ".join(others) + " are in bench/benchmark.json."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="timed steps per system (default 300)")
    p.add_argument("--warmup", type=int, default=10, help="untimed warm-up steps (default 10)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of the core cases; medians reported (default 3)")
    p.add_argument("--only", nargs="+", default=["core", "async", "ensemble", "regimes", "pipeline", "data", "multinode"],
                   choices=["core", "async", "ensemble", "regimes", "pipeline", "data", "multinode"],
                   help="sections to run (default all)")
    p.add_argument("--cases", nargs="+", choices=list(PLAN), default=None,
                   help="core cases to run (default all; ratios only where both sides ran)")
    p.add_argument("--ray-defaults", action="store_true",
                   help="run the CLI cases a second time with Ray's own background settings on their local cluster "
                   "(ray_train.cluster.QUIET_LOCAL_CLUSTER turns them down)")
    p.add_argument("--out", default="bench", help="folder for benchmark.json and benchmark.png")
    p.add_argument("--docs", default=os.path.join(ROOT, "docs", "bench-latest.md"),
                   help="the markdown table of this run (default docs/bench-latest.md; '' for none)")
    p.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=64, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:  # a subprocess of the driver below
        print(json.dumps(CASES[args.case](args.width, args.batch, args.steps, args.warmup)), flush=True)
        return
    report = {"date": dt.date.today().isoformat(), "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, "
              f"{platform.system()}", "command": "python " + " ".join(sys.argv), "steps": args.steps,
              "warmup": args.warmup, "repeat": args.repeat, "model": MODEL}
    if "core" in args.only:
        report["core"] = core(args.steps, args.warmup, args.repeat, args.cases, args.ray_defaults)
    report.update(extras([n for n in ("async", "ensemble", "regimes", "pipeline", "data", "multinode") if n in args.only],
                         args.steps, args.warmup, args.repeat))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "benchmark.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    if "core" in report:
        chart(report, os.path.join(args.out, "benchmark.png"))
    if args.docs:
        with open(args.docs, "w", encoding="utf-8") as fh:
            fh.write(latest_table(report))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
