"""The Engine interface the run loop drives, the context an engine is built with, and the Chunk of
results it reports. An engine owns its actors and how parameters or gradients move between them;
the loop (ray_train/run/loop.py) owns the schedule, evaluation, metrics, stop rules, checkpoints,
resume and recovery. strategies/sync/engine.py is the worked example of docs/writing-a-strategy.md."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ray_train.config import TrainConfig
from ray_train.data.dataset import Dataset
from ray_train.metrics.sink import MetricsSink
from ray_train.run.failure import FailurePolicy
from ray_train.worker.batches import steps_per_epoch
from ray_train.worker.evaluation import EvalResult


@dataclass
class EngineContext:
    cfg: TrainConfig
    data: Dataset
    data_ref: Any  # the dataset's object-store reference, put once by the driver
    model: Callable  # zero-argument factory of the network (picklable: it travels to the actors)
    sink: MetricsSink  # for the engine's own tags (ps/*); the loop writes the common ones
    run_dir: str
    failures: FailurePolicy  # engines that heal in place (Downpour) ask it; the loop asks for the others


@dataclass
class Chunk:
    """A few steps' results, summed over the replicas that ran them."""

    steps: int  # TensorBoard steps these results advance
    samples: int
    loss_sum: float
    correct: int
    step_ms: dict[int, float]  # mean step time per replica rank
    comm_bytes: int = 0  # bytes these steps moved between processes (docs/summary.md, communication accounting)
    wait_ms: dict[int, float] | None = None  # streamed data: mean wait for a batch per replica rank

    @classmethod
    def of(cls, results: list[dict], steps: int | None = None) -> "Chunk":
        """From the dicts Replica.train_steps (or AsyncReplica.run) returned, one per replica."""
        step_ms = {r["rank"]: float(np.mean(r["step_ms"])) if len(r["step_ms"]) else 0.0 for r in results}
        wait_ms = {r["rank"]: float(np.mean(r["wait_ms"])) for r in results if len(r.get("wait_ms", ()))}
        return cls(len(results[0]["step_ms"]) if steps is None else steps, sum(r["samples"] for r in results),
                   sum(r["loss_sum"] for r in results), sum(r["correct"] for r in results), step_ms,
                   sum(int(r.get("comm_bytes", 0)) for r in results), wait_ms or None)


class StateMismatch(Exception):
    """A checkpoint's engine state does not fit this run (another model or optimizer); the loop
    names the checkpoint file in the error the user sees."""


class Engine(abc.ABC):
    """One training regime. The loop calls start, then train_epoch / evaluate / state as it needs,
    and shutdown at the end (also after a failure). Methods run on the driver; the work happens
    in the engine's actors."""

    #: True when the actors keep training while the loop evaluates and checkpoints (Downpour's
    #: replicas run on through them): the loop then counts those seconds as training time.
    overlaps_evaluation = False

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx

    def epoch_steps(self) -> int:
        """Steps (TensorBoard steps) in one epoch: every replica takes this many."""
        cfg = self.ctx.cfg
        return steps_per_epoch(len(self.ctx.data.y_train), cfg.resources.replicas, cfg.run.batch_size)

    @abc.abstractmethod
    def start(self, state: dict | None) -> None:
        """Create the actors. ``state`` (what ``state()`` returned, from a checkpoint) is to be
        continued exactly; None starts from the seeded initial model. Raise StateMismatch when the
        state does not fit. Say what was started with ``ctx.sink.say``."""

    @abc.abstractmethod
    def train_epoch(self, epoch: int, lr: float, start: int, on_chunk: Callable[[Chunk], None],
                    should_stop: Callable[[], bool]) -> bool:
        """Train 0-based ``epoch`` at rate ``lr`` from its step ``start`` (0 unless the run was
        stopped mid-epoch), calling ``on_chunk`` with each Chunk as it completes. Once
        ``should_stop()`` is true, hand out no more work and return when what was handed out is
        done. Return True when the epoch is complete. Raise failure.ReplicaDied when a replica's
        death can only be healed by restarting from the last checkpoint."""

    @abc.abstractmethod
    def evaluate(self, split: str) -> EvalResult:
        """The current model on the whole of ``split`` ("test")."""

    @abc.abstractmethod
    def state(self) -> dict:
        """Everything the next step depends on besides the loop's counters and schedule:
        parameters, optimizer state, RNG. Tensors, numbers, strings, lists and dicts only
        (checkpoints load with weights_only=True)."""

    @abc.abstractmethod
    def model_state(self) -> dict:
        """What model.pt holds: {"model": the network's state_dict (CPU tensors)}, plus
        "optimizer" where the engine has one optimizer state to give."""

    @abc.abstractmethod
    def shutdown(self, graceful: bool = True) -> None:
        """Tear the actors down; a second call does nothing. ``graceful=False`` after a failure."""

    def weights(self) -> dict[str, np.ndarray] | None:
        """Named parameter arrays for the weights/ histograms, or None."""
        return None

    def extras(self) -> dict:
        """Keys this engine adds to summary.json."""
        return {}

    def finished(self) -> str | None:
        """Why training cannot make progress any more (L-BFGS at a stationary point), or None; the
        loop then stops with ``stopped: converged``."""
        return None
