"""Synchronous data-parallel SGD: every step each replica computes gradients on its batch, the
gradients are averaged among the replicas, and every replica applies the same update. N replicas
with batch b therefore follow single-process SGD with batch N*b (tests/test_sync_equivalence.py).

A checkpoint holds everything the next epoch depends on: parameters, optimizer state (momentum),
the schedule, every replica's RNG (dropout masks) and the driver's counters. A resumed run, or a
group rebuilt after a replica died, therefore continues exactly as the uninterrupted run would
(tests/test_resume.py, tests/test_sync_faults.py)."""
from __future__ import annotations

import time
from dataclasses import dataclass

from ray_train.checkpoint import CheckpointError
from ray_train.data import steps_per_epoch
from ray_train.group import ReplicaGroup
from ray_train.metrics import TensorBoardLogger
from ray_train.optim import Schedule
from ray_train.replica import Replica
from ray_train.strategies.base import RunContext, chunk_metrics, epoch_record


class ReplicaFailure(RuntimeError):
    """Replicas died more often than run.max_failures allows."""


@dataclass
class Progress:
    """The driver's counters; a checkpoint stores them and a restart rewinds them."""

    epoch: int = 0  # epochs completed
    step: int = 0  # TensorBoard step: steps every replica has taken
    train_s: float = 0.0
    samples: int = 0


def train(ctx: RunContext, replica_cls=Replica) -> dict:
    """``replica_cls`` lets a test swap in a Replica subclass that injects faults."""
    import ray
    from ray.exceptions import RayActorError

    cfg = ctx.cfg
    found = (ctx.resume_state, ctx.checkpoints.path(ctx.resume_state["epoch"])) if ctx.resume_state else None
    group, schedule, progress = start(ctx, replica_cls, found)
    failures: list[dict] = []
    evaluation = None
    print(f"sync SGD: {cfg.resources.replicas} replicas on {sorted({i['device'] for i in group.info})}, "
          f"gradient averaging: {group.comm}", flush=True)
    try:
        while progress.epoch < cfg.run.epochs and not schedule.should_stop:
            try:
                evaluation = run_epoch(ctx, group, schedule, progress)
                if checkpoint_due(ctx, schedule, progress):
                    ctx.checkpoints.save(progress.epoch, checkpoint_state(ctx, group, schedule, progress))
            except RayActorError as exc:
                dead, group = group, None
                found = recover(ctx, dead, exc, progress.epoch, failures)
                group, schedule, progress = start(ctx, replica_cls, found)
                evaluation = None
        if schedule.should_stop:
            print(f"early stopping: no better test accuracy for {cfg.optim.early_stop} evaluations", flush=True)
        if evaluation is None:
            evaluation = group.evaluate(ctx.data.y_test)
        ctx.sink.confusion(ctx.data.y_test, evaluation.preds, ctx.data.num_classes, progress.step)
        ctx.save_model(ray.get(group.actors[0].state.remote()))
    finally:
        if group is not None:
            group.shutdown()
    return {"test_accuracy": evaluation.accuracy, "test_errors": evaluation.errors, "test_loss": evaluation.loss,
            "train_samples": progress.samples, "train_s": progress.train_s,
            "samples_per_s": progress.samples / max(progress.train_s, 1e-9), "steps": progress.step,
            "allreduce": group.comm, "devices": [i["device"] for i in group.info],
            "failures": failures, "restarts": len(failures)}


def run_epoch(ctx: RunContext, group: ReplicaGroup, schedule: Schedule, progress: Progress):
    """One pass over the training data, the evaluation when due, and the epoch's metrics."""
    import ray

    cfg, sink, epoch = ctx.cfg, ctx.sink, progress.epoch
    lr = schedule.lr(epoch)
    sink.start_epoch(epoch, cfg.run.epochs, steps_per_epoch(len(ctx.data.y_train), cfg.resources.replicas,
                                                            cfg.run.batch_size))

    def on_chunk(results):
        progress.step += len(results[0]["step_ms"])
        sink.train_chunk(progress.step, *chunk_metrics(results))

    t0 = time.perf_counter()
    totals = group.train_epoch(epoch, lr, cfg.run.log_every, on_chunk)
    elapsed = time.perf_counter() - t0
    evaluation = None
    if (epoch + 1) % cfg.run.eval_every == 0 or epoch + 1 == cfg.run.epochs:
        evaluation = group.evaluate(ctx.data.y_test)
        schedule.observe(epoch, evaluation.accuracy)
    sink.end_epoch(epoch_record(epoch, lr, totals, elapsed, evaluation), progress.step)
    sink.weights(ray.get(group.actors[0].weights.remote()), progress.step)
    progress.epoch, progress.train_s = epoch + 1, progress.train_s + elapsed
    progress.samples += totals["samples"]
    return evaluation


def checkpoint_due(ctx: RunContext, schedule: Schedule, progress: Progress) -> bool:
    last = progress.epoch == ctx.cfg.run.epochs or schedule.should_stop
    return ctx.checkpoints is not None and (progress.epoch % ctx.cfg.run.checkpoint_every == 0 or last)


def checkpoint_state(ctx: RunContext, group: ReplicaGroup, schedule: Schedule, progress: Progress) -> dict:
    return {"epoch": progress.epoch, "step": progress.step, "history": list(ctx.sink.history),
            "train_s": progress.train_s, "samples": progress.samples, "schedule": schedule.state_dict(),
            **group.state()}


def start(ctx: RunContext, replica_cls, found: tuple[dict, str] | None):
    """A new group and the driver's schedule and counters, all from checkpoint ``found`` (a
    (state, path) pair) or, without one, fresh: fresh replicas repeat the run's initial state."""
    from ray.exceptions import RayTaskError

    group = ReplicaGroup.create(ctx.cfg, ctx.data_ref, replica_cls=replica_cls)
    schedule, progress = Schedule(ctx.cfg.optim), Progress()
    if found is None:
        return group, schedule, progress
    state, path = found
    try:
        group.load_state(state)
    except RayTaskError as exc:
        group.shutdown()
        cause = " ".join(str(exc.cause or exc).split())[:240]
        raise CheckpointError(f"checkpoint {path} does not fit this run's model.name/optim.optimizer "
                              f"({ctx.cfg.model.name}/{ctx.cfg.optim.optimizer}): {cause}") from None
    schedule.load_state_dict(state["schedule"])
    progress = Progress(state["epoch"], state["step"], state.get("train_s", 0.0), state.get("samples", 0))
    return group, schedule, progress


def recover(ctx: RunContext, group: ReplicaGroup, exc, epoch: int, failures: list[dict]):
    """After a replica died: tear its group down, record the failure, give up past
    run.max_failures, else rewind the metrics to the last checkpoint and return it."""
    rank = group.rank_of(exc)
    who = f"replica {rank} (pid {group.info[rank]['pid']})" if rank is not None else "a replica"
    group.shutdown(graceful=False)
    limit = ctx.cfg.run.max_failures
    found = ctx.checkpoints.load_latest() if ctx.checkpoints is not None else None
    failures.append({"epoch": epoch + 1, "rank": rank, "pid": None if rank is None else group.info[rank]["pid"],
                     "error": type(exc).__name__, "restarted_from": found[1] if found else None})
    if len(failures) > limit:
        raise ReplicaFailure(f"{who} died in epoch {epoch + 1}; giving up after {len(failures)} failure(s) "
                             f"(run.max_failures is {limit}); continue with --resume {ctx.run_dir}") from exc
    where = f"checkpoint {found[1]} (epoch {found[0]['epoch']})" if found else "the start (no checkpoint yet)"
    print(f"{who} died in epoch {epoch + 1}; restarting from {where}, failure {len(failures)} of at most "
          f"{limit}", file=ctx.sink.out, flush=True)
    rewind_sink(ctx, found[0] if found else None)
    return found


def rewind_sink(ctx: RunContext, state: dict | None) -> None:
    """Metrics back to the checkpoint: its history, and a TensorBoard writer whose purge_step
    drops the points written after it, so the redone steps leave no duplicates."""
    sink = ctx.sink
    if sink.bar is not None:
        sink.bar.close()
        sink.bar = None
    sink.history = list(state["history"]) if state else []
    if isinstance(sink.logger, TensorBoardLogger):
        sink.logger.close()
        sink.logger = TensorBoardLogger(ctx.run_dir, purge_step=(state["step"] if state else 0) + 1)
