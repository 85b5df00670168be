"""What one run hands its strategy (Job), and the runner most strategies use: the run loop over
the strategy's engine, then model.pt. A strategy with another shape of run (the ensemble: K loops,
then the vote) names its own runner (strategies.base.Strategy.runner)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ray_train.config import TrainConfig
from ray_train.data.dataset import Dataset
from ray_train.engine import EngineContext
from ray_train.metrics.sink import MetricsSink
from ray_train.run.checkpoint import CheckpointStore
from ray_train.run.failure import FailurePolicy
from ray_train.run.loop import RunLoop
from ray_train.run.outputs import save_models
from ray_train.run.scaling import scaling_policy


@dataclass
class Job:
    strategy: Any  # strategies.base.Strategy
    cfg: TrainConfig
    data: Dataset
    data_ref: Any  # the dataset's object-store reference, put once by the driver
    model: Callable  # zero-argument factory of the network
    custom: Callable | None  # the user's own factory handed to fit(model=...), if any
    sink: MetricsSink
    run_dir: str
    checkpoints: CheckpointStore
    resume: tuple[dict, str] | None  # the checkpoint to continue from, and its path
    stop: Callable[[], bool]  # true once a signal asked the run to stop
    on_epoch: Callable[[dict], None] | None = None  # each epoch's history record (python -m ray_train search)


def run_loop(job: Job) -> dict:
    """The run loop over ``job.strategy``'s engine; model.pt and model-last.pt at the end."""
    cfg = job.cfg
    ctx = EngineContext(cfg, job.data, job.data_ref, job.model, job.sink, job.run_dir,
                        FailurePolicy(cfg.run.max_failures))
    summary = RunLoop(job.strategy.engine_class()(ctx), job.checkpoints, job.stop, job.resume,
                      resume_hint=job.run_dir, on_epoch=job.on_epoch,
                      scaling=scaling_policy(cfg, job.strategy)).run()
    save_models(job.run_dir, summary, job.data, {"model_name": cfg.model.name})
    return summary.to_dict()
