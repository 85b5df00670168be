"""Synchronous data-parallel SGD: every step each replica computes gradients on its batch, the
gradients are averaged among the replicas, and every replica applies the same update. N replicas
with batch b therefore follow single-process SGD with batch N*b (tests/test_sync_equivalence.py)."""
from __future__ import annotations

import time

from ray_train.data import steps_per_epoch
from ray_train.group import ReplicaGroup
from ray_train.optim import Schedule
from ray_train.strategies.base import RunContext, chunk_metrics, epoch_record


def train(ctx: RunContext) -> dict:
    import ray

    cfg, data, sink = ctx.cfg, ctx.data, ctx.sink
    group = ReplicaGroup.create(cfg, ctx.data_ref)
    schedule = Schedule(cfg.optim)
    steps = steps_per_epoch(len(data.y_train), cfg.resources.replicas, cfg.run.batch_size)
    step, train_s, samples, evaluation = 0, 0.0, 0, None
    print(f"sync SGD: {cfg.resources.replicas} replicas on {sorted({i['device'] for i in group.info})}, "
          f"gradient averaging: {group.comm}", flush=True)
    try:
        for epoch in range(cfg.run.epochs):
            lr = schedule.lr(epoch)
            sink.start_epoch(epoch, cfg.run.epochs, steps)

            def on_chunk(results):
                nonlocal step
                step += len(results[0]["step_ms"])
                sink.train_chunk(step, *chunk_metrics(results))

            t0 = time.perf_counter()
            totals = group.train_epoch(epoch, lr, cfg.run.log_every, on_chunk)
            elapsed = time.perf_counter() - t0
            train_s, samples = train_s + elapsed, samples + totals["samples"]
            evaluation = None
            if (epoch + 1) % cfg.run.eval_every == 0 or epoch + 1 == cfg.run.epochs:
                evaluation = group.evaluate(data.y_test)
                schedule.observe(epoch, evaluation.accuracy)
            sink.end_epoch(epoch_record(epoch, lr, totals, elapsed, evaluation), step)
            sink.weights(ray.get(group.actors[0].weights.remote()), step)
            if schedule.should_stop:
                print(f"early stopping: no better test accuracy for {cfg.optim.early_stop} evaluations", flush=True)
                break
        if evaluation is None:
            evaluation = group.evaluate(data.y_test)
        sink.confusion(data.y_test, evaluation.preds, data.num_classes, step)
        ctx.save_model(ray.get(group.actors[0].state.remote()))
    finally:
        group.shutdown()
    return {"test_accuracy": evaluation.accuracy, "test_errors": evaluation.errors, "test_loss": evaluation.loss,
            "train_samples": samples, "train_s": train_s, "samples_per_s": samples / max(train_s, 1e-9),
            "steps": step, "allreduce": group.comm, "devices": [i["device"] for i in group.info]}
