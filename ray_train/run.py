"""One run, start to finish: cluster, data in the object store, run folder, metrics, the
strategy's loop, and summary.json. The CLI, scripts and tests all come through ``execute``."""
from __future__ import annotations

import os
import sys
import time

from ray_train.checkpoint import RUN_FILE, CheckpointStore, write_run_file
from ray_train.config import TrainConfig, UserError
from ray_train.metrics import MetricsSink, NullLogger, TensorBoardLogger, logged_steps, write_json


def make_run_dir(cfg: TrainConfig, name: str) -> str:
    run_dir = os.path.join(cfg.run.storage, name)
    if cfg.run.resume:
        return run_dir  # the CLI checked it is a run folder of this strategy
    if os.path.exists(os.path.join(run_dir, RUN_FILE)):
        raise UserError(f"run.run_name: {run_dir} already holds a run; choose another --run-name "
                        f"or continue it with --resume {run_dir}")
    os.makedirs(run_dir, exist_ok=True)
    write_run_file(run_dir, cfg.run.strategy, cfg.to_dict())
    return run_dir


def execute(cfg: TrainConfig, tensorboard: bool = True, progress: bool = True, out=None) -> dict:
    import ray

    out = out or sys.stdout

    from ray_train.cluster import check_resources, init_ray
    from ray_train.strategies import CHECKPOINTS, MODULES, get_strategy

    t_start = time.perf_counter()
    # torch and the strategy's modules load while Ray starts its processes
    init_ray(preload=("ray_train.data", f"ray_train.strategies.{MODULES[cfg.run.strategy]}"))
    strategy = get_strategy(cfg.run.strategy)

    from ray_train.data import load_dataset
    from ray_train.strategies.base import RunContext

    check_resources(cfg.resources)
    data = load_dataset(cfg.data, seed=cfg.run.seed)
    name = cfg.run_name
    run_dir = make_run_dir(cfg, name)
    data_ref = ray.put(data)
    checkpoints = CheckpointStore(run_dir, keep=cfg.run.keep_checkpoints)
    resume_state, skip_logged = None, {}
    if cfg.run.resume and CHECKPOINTS[cfg.run.strategy] == "members":
        # Members resume from their own checkpoints, each at its own step: no single purge step
        # fits them all, so the points the interrupted run wrote are kept and not written again
        # (a resumed member repeats them exactly).
        skip_logged = logged_steps(run_dir)
    elif cfg.run.resume:
        found = checkpoints.load_latest()
        if found is None:
            print(f"warning: {run_dir} has no readable checkpoint; starting from scratch", file=sys.stderr, flush=True)
        else:
            resume_state, path = found
            print(f"resuming from {path} (epoch {resume_state['epoch']}, step {resume_state['step']})",
                  file=out, flush=True)
    # purge_step drops any event the interrupted run wrote after its checkpoint: no duplicate points.
    # TensorBoard purges steps >= purge_step; the checkpointed epoch's own points sit at "step".
    purge = resume_state["step"] + 1 if resume_state else None
    logger = TensorBoardLogger(run_dir, purge_step=purge) if tensorboard else NullLogger()
    sink = MetricsSink(logger, out=out, progress=progress, skip_logged=skip_logged)
    if resume_state:
        sink.history = list(resume_state.get("history", []))
    print(f"run {name}: {cfg.run.strategy} {cfg.model.name} on {data.name} "
          f"({len(data.y_train)} train / {len(data.y_test)} test), logs in {run_dir}", file=out, flush=True)
    try:
        result = strategy(RunContext(cfg, data, data_ref, sink, run_dir, checkpoints, resume_state))
    finally:
        sink.logger.flush()
    summary = {
        "run_name": name, "strategy": cfg.run.strategy, "model": cfg.model.name, "dataset": data.name,
        "replicas": cfg.resources.replicas, "epochs": len(sink.history), **result,
        "wall_s": time.perf_counter() - t_start, "history": sink.history, "config": cfg.to_dict(),
    }
    sink.finish(hparams=_flat_hparams(cfg),
                metrics={"hparams/test_accuracy": summary["test_accuracy"], "hparams/wall_s": summary["wall_s"]})
    write_json(os.path.join(run_dir, "summary.json"), summary)
    print(f"done: test accuracy {summary['test_accuracy']:.4f} ({summary['test_errors']} errors), "
          f"{summary['samples_per_s']:,.0f} samples/s, {summary['wall_s']:.1f} s wall; "
          f"summary in {run_dir}/summary.json", file=out, flush=True)
    if tensorboard:
        print(f"watch it: tensorboard --logdir {cfg.run.storage}", file=out, flush=True)
    return summary


def _flat_hparams(cfg: TrainConfig) -> dict:
    return {f"{section}.{k}": v for section, values in cfg.to_dict().items() for k, v in values.items()
            if v is not None}
