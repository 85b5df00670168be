"""The run loop, one for every engine. Per epoch: lr from the schedule -> engine.train_epoch ->
evaluation when due -> metrics -> every stop rule -> the checkpoint policy; at the end a Summary.
It owns resume, the rewind to the last checkpoint after a replica died, and stopping mid-epoch
(a signal or the time limit: the engine finishes the chunks it handed out and the loop
checkpoints exactly there, so ``--resume`` loses nothing). With an elastic replica count
(run/scaling.py) each (re)start takes as many replicas as fit, and an epoch end with room for more
restarts the engine with more from the state just checkpointed."""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field, fields

from ray_train.engine import Chunk, Engine, StateMismatch
from ray_train.errors import CheckpointError, Diverged, Interrupted, ReplicaFailure, ResourceError
from ray_train.run.checkpoint import CheckpointStore
from ray_train.run.failure import Decision, ReplicaDied, actor_died
from ray_train.run.scaling import FixedScaling, with_replicas
from ray_train.worker.evaluation import EvalResult
from ray_train.worker.losses import Objective
from ray_train.worker.optim import Schedule

CHANCE_EPOCHS = 3  # epochs at chance-level training accuracy before the loop warns
# A chunk's mean training loss this many times where training started is divergence, as a
# non-finite one is: `--lr 50` took the default job's loss from 2.3 (ln 10, chance) to 4e20 within
# the first chunk and trained on at chance, exiting 0. Where it started: the loss at chance
# (losses.at_chance), or the first chunk's loss for a loss without one.
EXPLODED = 1000.0


@dataclass
class Progress:
    """The loop's counters; a checkpoint stores them, a restart rewinds them."""

    epoch: int = 0  # epochs completed
    step: int = 0  # TensorBoard step
    in_epoch: int = 0  # steps into the unfinished epoch (a run stopped mid-epoch)
    train_s: float = 0.0
    samples: int = 0
    comm_bytes: int = 0  # moved between processes so far (Chunk.comm_bytes)
    history: list = field(default_factory=list)
    window: dict = field(default_factory=lambda: {"loss_sum": 0.0, "correct": 0, "samples": 0, "elapsed": 0.0})
    best: dict | None = None  # the best-validation epoch: its figures and its model (model_state)
    first_loss: float | None = None  # where training started (the divergence rule's yardstick: EXPLODED)
    warnings: list = field(default_factory=list)  # what the run warned about (summary.json)
    replicas: list = field(default_factory=list)  # the replica count over time: {epoch, step, replicas}


class Grow(Exception):
    """An epoch end found room for more replicas: restart the engine with ``count`` of them from
    ``found`` (the state just checkpointed, and its path)."""

    def __init__(self, found: tuple[dict, str], count: int) -> None:
        super().__init__(found[1])
        self.found, self.count = found, count


@dataclass
class Summary:
    stopped: str  # epochs, target_accuracy, target_loss, early_stop, lr_floor, converged or time_limit
    stop_reason: str
    epochs: int
    steps: int
    train_samples: int
    comm_bytes: int
    train_s: float
    samples_per_s: float
    test_accuracy: float | None  # None for regression (test_mae instead)
    test_errors: int | None
    test_loss: float
    best_epoch: int | None  # the epoch of best validation accuracy (loss for regression; test without validation)
    val_accuracy: float | None  # at best_epoch
    best_test_accuracy: float | None  # test accuracy at best_epoch: the figure the texts report
    best_test_errors: int | None
    failures: list
    restarts: int
    history: list
    extras: dict
    evaluation: EvalResult  # the final test evaluation (probabilities for an ensemble's vote)
    model_state: dict  # the final network
    best_model_state: dict | None  # the network at best_epoch (model.pt); None without evaluations
    warnings: list = field(default_factory=list)  # what the run warned about (the at-chance warning)
    # regression (float targets): mean absolute errors, and the best epoch's losses
    test_mae: float | None = None
    val_loss: float | None = None  # at best_epoch
    best_test_loss: float | None = None
    best_test_mae: float | None = None
    replicas: int | None = None  # the count the run ended with
    replicas_history: list = field(default_factory=list)  # Progress.replicas

    def to_dict(self) -> dict:
        """summary.json's keys (asdict would deep-copy the model's tensors)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in out.items()
                if k not in ("extras", "evaluation", "model_state", "best_model_state")} | self.extras


class RunLoop:
    def __init__(self, engine: Engine, checkpoints: CheckpointStore | None, stop=None,
                 resume: tuple[dict, str] | None = None, resume_hint: str | None = None, on_epoch=None,
                 scaling: FixedScaling | None = None) -> None:
        self.engine, self.ctx = engine, engine.ctx
        self.scaling = scaling or FixedScaling(engine.ctx.cfg)
        self.base_cfg, self.replicas = engine.ctx.cfg, engine.ctx.cfg.resources.replicas
        self.on_epoch = on_epoch  # called with each epoch's history record (python -m ray_train search)
        self.cfg, self.sink = engine.ctx.cfg, engine.ctx.sink
        self.checkpoints, self.resume, self.resume_hint = checkpoints, resume, resume_hint
        self.stop_signal = stop or (lambda: False)
        self.spe = engine.epoch_steps()
        self.regression = bool(self.ctx.data.regression)
        self.chance = Objective.of(self.cfg.model, self.ctx.data).at_chance(self.ctx.data.num_classes)
        if resume is not None:
            self.ctx.failures.failures = list(resume[0].get("failures", []))

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> Summary:
        found, restarted, hint = self.resume, None, None
        try:
            while True:
                try:
                    self._begin(found, hint)
                    # a death in the final evaluation or summary too goes back to the last
                    # checkpoint (the final one: the run then has nothing left to train)
                    return self._finish(*self._train())
                except ReplicaDied as exc:
                    restarted, hint = "the failure", self.replicas
                    found = self._recover(exc)
                except Grow as grow:
                    self.engine.shutdown()
                    restarted, found, hint = "growing", grow.found, grow.count
                except ResourceError as exc:
                    if restarted is None:
                        raise  # the cluster never had room: the user's resources are wrong (exit 2)
                    raise self._cannot_restart(exc, found, restarted) from None
        finally:
            self.engine.shutdown()

    def _train(self) -> tuple[str, str]:
        cfg, p = self.cfg, self.progress
        stop = self._stop_rule(None)  # a resumed run may have nothing left to do
        while stop is None:
            epoch, lr = p.epoch, self.schedule.lr(p.epoch)
            self.sink.start_epoch(epoch, cfg.run.epochs, self.spe, p.in_epoch)
            self.t_epoch = time.perf_counter()
            complete = self.engine.train_epoch(epoch, lr, p.in_epoch, self._on_chunk, self._should_stop)
            t_trained = time.perf_counter()
            self._account_time(t_trained - self.t_epoch)
            if self.diverged:
                raise Diverged(self.diverged)
            if not complete:  # a signal or the time limit, mid-epoch
                self._checkpoint()
                return self._stop_rule(None) or ("interrupted", "stopped mid-epoch")
            due = ((epoch + 1) % cfg.run.eval_every == 0 or epoch + 1 == cfg.run.epochs or self.stop_signal()
                   or self._time_up())
            evaluation = self.engine.evaluate("test") if due else None
            validation = self.engine.evaluate("val") if self.ctx.data.has_validation else None
            watched = self._end_epoch(epoch, lr, evaluation, validation)
            stop = self._stop_rule(watched)
            saved = self._checkpoint() if stop is not None or p.epoch % cfg.run.checkpoint_every == 0 else None
            if self.engine.overlaps_evaluation:  # its actors trained on meanwhile
                self._account_time(time.perf_counter() - t_trained)
            grow = self.scaling.grow_to(self.replicas) if stop is None else None
            if grow is not None:
                raise Grow(saved or self._checkpoint(), grow)
        return stop

    def _on_chunk(self, chunk: Chunk) -> None:
        p, w = self.progress, self.progress.window
        p.step, p.in_epoch, p.samples = p.step + chunk.steps, p.in_epoch + chunk.steps, p.samples + chunk.samples
        p.comm_bytes += chunk.comm_bytes
        for key in ("loss_sum", "correct", "samples"):
            w[key] += getattr(chunk, key)
        samples = max(chunk.samples, 1)
        loss = chunk.loss_sum / samples
        if p.first_loss is None and math.isfinite(loss) and loss > 0:
            p.first_loss = self.chance or loss
        exploded = math.isfinite(loss) and p.first_loss is not None and loss > EXPLODED * p.first_loss
        if (exploded or not math.isfinite(loss)) and not self.diverged:
            what = f"{loss:.4g}, over {EXPLODED:g}x where it started ({p.first_loss:.4g})" if exploded else f"{loss}"
            self.diverged = (f"training diverged in epoch {p.epoch + 1}, step {p.step}: the loss is {what}; "
                             "lower the learning rate (--lr) or use an adaptive optimizer (--optimizer adagrad); "
                             + (f"--resume {self.resume_hint} continues from the last good checkpoint"
                                if self.resume_hint and self.checkpoints and self.checkpoints.paths()
                                else "no checkpoint was written"))
        self.sink.train_chunk(p.step, chunk.steps, loss, chunk.correct / samples, chunk.step_ms, p.comm_bytes,
                              chunk.wait_ms, metric="mae" if self.regression else "accuracy")

    def _should_stop(self) -> bool:
        """Asked by the engine between chunks."""
        return bool(self.diverged) or self.stop_signal() or self._time_up(time.perf_counter() - self.t_epoch)

    def _time_up(self, running: float = 0.0) -> bool:
        limit = self.cfg.run.time_limit
        return limit is not None and self.progress.train_s + running >= limit

    def _account_time(self, elapsed: float) -> None:
        self.progress.train_s += elapsed
        self.progress.window["elapsed"] += elapsed

    def _end_epoch(self, epoch: int, lr: float, evaluation: EvalResult | None,
                   validation: EvalResult | None) -> EvalResult | None:
        """Record the epoch; returns what schedules and stop rules read: the validation result,
        or the test result where the data has no validation split."""
        p, w = self.progress, self.progress.window
        for name, result in (("test", evaluation), ("validation", validation)):
            if result is not None and not math.isfinite(result.loss):
                raise Diverged(f"training diverged in epoch {epoch + 1}: the {name} loss is {result.loss}; "
                               "lower the learning rate (--lr)")
        samples = max(w["samples"], 1)
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": w["loss_sum"] / samples,
                  "train_accuracy": None if self.regression else w["correct"] / samples,
                  "samples_per_s": w["samples"] / max(w["elapsed"], 1e-9),
                  "epoch_s": w["elapsed"], "test_loss": None, "test_accuracy": None, "test_errors": None,
                  "val_loss": None, "val_accuracy": None,
                  # running totals, for plots against time, samples and bytes (python -m ray_train compare)
                  "train_s": p.train_s, "samples": p.samples, "comm_bytes": p.comm_bytes,
                  "replicas": self.replicas}  # this epoch's replica count (elastic runs: it moves)
        if self.regression:  # mean absolute errors where classes have accuracies
            record.update(train_mae=w["correct"] / samples, test_mae=None, val_mae=None)
        if evaluation is not None:
            record.update(test_loss=evaluation.loss, test_accuracy=evaluation.accuracy, test_errors=evaluation.errors)
            if self.regression:
                record["test_mae"] = evaluation.mae
            self.last_eval = (p.step, evaluation)
        if validation is not None:
            record.update(val_loss=validation.loss, val_accuracy=validation.accuracy)
            if self.regression:
                record["val_mae"] = validation.mae
        watched = validation if self.ctx.data.has_validation else evaluation
        if watched is not None:
            self.schedule.observe(epoch, watched.score)
            if p.best is None or watched.score > p.best["watched"]:
                self._keep_best(epoch, watched, validation, evaluation)
        p.history.append(record)
        self.sink.end_epoch(record, p.step)
        if self.on_epoch is not None:
            self.on_epoch(dict(record))
        weights = self.engine.weights()
        if weights is not None:
            self.sink.weights(weights, p.step)
        self._warn_at_chance(record)
        p.epoch, p.in_epoch, p.window = epoch + 1, 0, Progress().window
        return watched

    def _keep_best(self, epoch: int, watched: EvalResult, validation: EvalResult | None,
                   evaluation: EvalResult | None) -> None:
        """A new best (validation) accuracy, or loss for regression: keep its figures, the test result
        of this very model (evaluated now if this epoch's test evaluation was not due) and the model
        itself."""
        if evaluation is None:
            evaluation = self.engine.evaluate("test")
        self.progress.best = {"epoch": epoch + 1, "watched": watched.score,
                              "val_accuracy": None if validation is None else validation.accuracy,
                              "val_loss": None if validation is None else validation.loss,
                              "test_accuracy": evaluation.accuracy, "test_errors": evaluation.errors,
                              "test_loss": evaluation.loss, "test_mae": evaluation.mae,
                              "model_state": self.engine.model_state()}

    def _warn_at_chance(self, record: dict) -> None:
        if self.regression:
            return
        chance = 1.0 / self.ctx.data.num_classes
        recent = self.progress.history[-CHANCE_EPOCHS:]
        if (not self.warned and len(recent) == CHANCE_EPOCHS
                and all(r["train_accuracy"] <= 1.5 * chance for r in recent)):
            self.warned = True
            warning = (f"training accuracy has stayed at chance ({chance:.2f}) for {CHANCE_EPOCHS} epochs: the model "
                       "is not learning; try another learning rate (--lr) or optimizer")
            self.progress.warnings.append(warning)
            self.sink.say(f"warning: {warning}")

    def _stop_rule(self, evaluation: EvalResult | None) -> tuple[str, str] | None:
        cfg, p = self.cfg, self.progress
        target, limit = cfg.run.target_accuracy, cfg.run.time_limit
        if self.stop_signal():
            return "interrupted", "stopped by a signal"
        split = "validation" if self.ctx.data.has_validation else "test"
        if evaluation is not None and target is not None and evaluation.accuracy >= target:
            return "target_accuracy", (f"{split} accuracy {evaluation.accuracy:.4f} reached the target {target:g} "
                                       f"after epoch {p.epoch}")
        if evaluation is not None and cfg.run.target_loss is not None and evaluation.loss <= cfg.run.target_loss:
            return "target_loss", (f"{split} loss {evaluation.loss:.4g} reached the target {cfg.run.target_loss:g} "
                                   f"after epoch {p.epoch}")
        converged = self.engine.finished()
        if converged:
            return "converged", converged
        if self.schedule.should_stop:
            return "early_stop", f"no better {split} {self._watched} in {cfg.optim.early_stop} evaluations"
        if self.schedule.floor_reached:
            return "lr_floor", (f"the plateau schedule halved the learning rate down to eta0/{cfg.optim.lr_floor_div:g} "
                                f"({self.schedule.current:.3g}) and {split} {self._watched} still stalled")
        if self._time_up():
            return "time_limit", f"time limit of {limit:g} s reached after {p.epoch} epochs and {p.in_epoch} steps"
        if p.epoch >= cfg.run.epochs:
            return "epochs", f"{cfg.run.epochs} epochs completed"
        return None

    @property
    def _watched(self) -> str:
        return "loss" if self.regression else "accuracy"

    # -- state: begin, checkpoint, recover, finish ----------------------------------------------
    def _begin(self, found: tuple[dict, str] | None, hint: int | None = None) -> None:
        state = found[0] if found else None
        self.progress, self.schedule = Progress(), Schedule(self.cfg.optim)
        self.diverged, self.warned, self.last_eval, self.t_epoch = None, False, None, time.perf_counter()
        count = self.scaling.start_count(hint)
        self.ctx.cfg = self.base_cfg if count == self.base_cfg.resources.replicas else with_replicas(self.base_cfg, count)
        try:
            self.engine.start(None if state is None else state["engine"])
        except StateMismatch as exc:
            raise CheckpointError(f"checkpoint {found[1]} does not fit this run's model.name/optim.optimizer "
                                  f"({self.cfg.model.name}/{self.cfg.optim.optimizer}): {exc}") from None
        except Exception as exc:
            if not actor_died(exc):
                raise
            # a replica died while it started: Ray placed it on a node that was dying but not yet
            # declared dead (a restart right after a node loss); a failure like any other
            raise ReplicaDied({"rank": None, "pid": None, "error": type(exc).__name__, "starting": True,
                               "epoch": state["epoch"] + 1 if state else 1}) from exc
        if state is not None:
            self.progress = Progress(state["epoch"], state["step"], state["in_epoch"], state["train_s"],
                                     state["samples"], int(state.get("comm_bytes", 0)), list(state["history"]),
                                     dict(state["window"]), state.get("best"), state.get("first_loss"),
                                     list(state.get("warnings", [])), list(state.get("replicas_history", [])))
            self.schedule.load_state_dict(state["schedule"])
        self.replicas, self.spe = count, self.engine.epoch_steps()
        saved = state.get("replicas", count) if state is not None else count
        if self.progress.in_epoch and saved != count:  # stopped mid-epoch: as many examples in, re-sharded
            self.progress.in_epoch = min(self.spe, self.progress.in_epoch * saved // count)
        history = self.progress.replicas
        if not history or history[-1]["replicas"] != count:
            history.append({"epoch": self.progress.epoch, "step": self.progress.step, "replicas": count})
            self.sink.scalar("replicas", count, self.progress.step)
            if history[:-1]:
                self.sink.say(f"replicas: {history[-2]['replicas']} -> {count} after epoch {self.progress.epoch}")

    def _checkpoint(self) -> tuple[dict, str]:
        """Save the run's state (when there is a store) and return it with its path."""
        p = self.progress
        state = {
            "epoch": p.epoch, "step": p.step, "in_epoch": p.in_epoch, "train_s": p.train_s, "samples": p.samples,
            "comm_bytes": p.comm_bytes, "history": list(p.history), "window": dict(p.window), "schedule": self.schedule.state_dict(), "best": p.best,
            "first_loss": p.first_loss, "warnings": list(p.warnings), "failures": list(self.ctx.failures.failures),
            "replicas": self.replicas, "replicas_history": [dict(r) for r in p.replicas], "engine": self.engine.state()}
        if self.checkpoints is None:
            return state, f"the state after epoch {p.epoch} (in memory)"
        return state, self.checkpoints.save(p.epoch, state, p.in_epoch)

    def _recover(self, died: ReplicaDied) -> tuple[dict, str] | None:
        """Record the failure; past run.max_failures give up, else rewind to the last checkpoint."""
        self.engine.shutdown(graceful=False)
        rank, pid, epoch = died.info.get("rank"), died.info.get("pid"), died.info.get("epoch", self.progress.epoch + 1)
        who = f"replica {rank} (pid {pid})" if rank is not None else "a replica"
        if died.info.get("stage") is not None:
            who = f"stage {died.info['stage']} of {who}"
        found = self.checkpoints.load_latest() if self.checkpoints is not None else None
        failures = self.ctx.failures
        decision = failures.decide({"epoch": epoch, **died.info, "restarted_from": found[1] if found else None,
                                    "restarted_from_epoch": found[0]["epoch"] if found else 0})
        if decision is Decision.RAISE:
            raise failures.give_up(f"{who} died in epoch {epoch}", self.resume_hint) from died
        where = f"checkpoint {found[1]} (epoch {found[0]['epoch']})" if found else "the start (no checkpoint yet)"
        self.sink.say(f"{who} died in epoch {epoch}; restarting from {where}, failure {len(failures.failures)} "
                      f"of at most {failures.max_failures}")
        self.sink.rewind(found[0]["step"] if found else 0)
        return found

    def _cannot_restart(self, exc: ResourceError, found: tuple[dict, str] | None, after: str) -> ReplicaFailure:
        """After a death (or while growing), the cluster has no room for the replicas any more (a
        node was lost and not replaced): a failure (exit 1) naming the checkpoint to continue from,
        not a user error."""
        where = f"the last checkpoint is {found[1]} (epoch {found[0]['epoch']})" if found else "no checkpoint yet"
        hint = f"; continue with --resume {self.resume_hint} once there is room" if self.resume_hint and found else ""
        if after == "the failure":
            self.ctx.failures.failures[-1]["restart_error"] = str(exc)
        return ReplicaFailure(f"could not restart after {after}: {exc}; {where}{hint}")

    def _finish(self, stopped: str, reason: str) -> Summary:
        try:
            return self._summary(stopped, reason)
        except ReplicaDied as died:  # after the last epoch: the death belongs to it, not to the next
            died.info.setdefault("epoch", self.progress.epoch)
            raise

    def _summary(self, stopped: str, reason: str) -> Summary:
        p = self.progress
        if stopped == "interrupted":
            self.sink.flush()
            raise Interrupted(self.stop_signal.signum if hasattr(self.stop_signal, "signum") else signal.SIGINT,
                              self.resume_hint or self.ctx.run_dir)
        if stopped != "epochs":
            self.sink.say(f"stopped: {reason}")
        step, evaluation = self.last_eval or (None, None)
        if step != p.step:  # the last evaluation is not of the final parameters
            evaluation = self.engine.evaluate("test")
        data = self.ctx.data
        if not self.regression:
            labels = data.y_test if evaluation.labels is None else evaluation.labels  # streamed: as read
            self.sink.confusion(labels, evaluation.preds, data.num_classes, p.step)
        extras = self.engine.extras()  # first: an engine may record a failure it learns of only now
        failures, best = self.ctx.failures.failures, p.best or {}
        return Summary(stopped, reason, p.epoch, p.step, p.samples, p.comm_bytes, p.train_s,
                       p.samples / max(p.train_s, 1e-9),
                       evaluation.accuracy, evaluation.errors, evaluation.loss, best.get("epoch"),
                       best.get("val_accuracy"), best.get("test_accuracy"), best.get("test_errors"), list(failures),
                       len(failures), list(p.history), extras, evaluation, self.engine.model_state(),
                       best.get("model_state"), list(p.warnings), evaluation.mae, best.get("val_loss"),
                       best.get("test_loss"), best.get("test_mae"), self.replicas, [dict(r) for r in p.replicas])
