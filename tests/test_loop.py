"""The run loop (ray_train/run/loop.py) driven with a scripted in-process engine, no Ray: every stop
rule stops where it should, checkpoints there and says why; a run stopped mid-epoch resumes
exactly; divergence stops at once without checkpointing the broken state; a replica death rewinds
to the last checkpoint; the failure policy gives up past run.max_failures."""
import io
import math

import numpy as np
import pytest

from ray_train.config import build_config
from ray_train.data.dataset import Dataset
from ray_train.engine import Chunk, Engine, EngineContext
from ray_train.errors import Diverged, Interrupted, ReplicaFailure
from ray_train.metrics.sink import MetricsSink
from ray_train.run import loop as loop_module
from ray_train.run.checkpoint import CheckpointStore
from ray_train.run.failure import FailurePolicy, ReplicaDied
from ray_train.run.loop import RunLoop
from ray_train.worker.evaluation import EvalResult

TRAIN, TEST, BATCH, CHUNK = 160, 20, 8, 5  # 20 steps per epoch with one replica
STEP_S = 0.1  # seconds of the fake clock per step


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class ScriptedEngine(Engine):
    """``params`` sums the indices of the steps taken (so an exact resume gives the same sum);
    test accuracy after epoch e is ``accuracies[e - 1]``; hooks inject deaths, NaNs and signals."""

    def __init__(self, ctx, accuracies, clock, die_at=None, nan_at=None, stop_at=None, stop=None, boom_at=None):
        super().__init__(ctx)
        self.accuracies, self.clock = accuracies, clock
        self.die_at, self.nan_at, self.stop_at, self.stop, self.boom_at = die_at, nan_at, stop_at, stop, boom_at
        self.starts, self.shutdowns, self.step = 0, 0, 0

    def start(self, state):
        self.starts += 1
        self.counts = getattr(self, "counts", []) + [self.ctx.cfg.resources.replicas]
        self.params, self.epochs_done, self.step = (state["params"], state["epochs_done"], state["step"]) if state \
            else (0, 0, 0)

    def train_epoch(self, epoch, lr, start, on_chunk, should_stop):
        position, spe = start, self.epoch_steps()
        while position < spe:
            n = min(CHUNK, spe - position)
            if self.die_at is not None and self.step + n > self.die_at:
                self.die_at = None  # once
                raise ReplicaDied({"rank": 0, "pid": 4242, "error": "ActorDiedError"})
            self.params += sum(range(self.step, self.step + n))
            self.step += n
            position += n
            self.clock.now += n * STEP_S
            loss = math.nan if self.nan_at is not None and self.step >= self.nan_at else 1.0
            if self.boom_at is not None and self.step >= self.boom_at:
                loss = 1e6  # finite, but far above where training started
            if self.stop_at is not None and self.step >= self.stop_at:
                self.stop.signum, self.stop_at = 15, None
            on_chunk(Chunk(n, n * BATCH, loss * n * BATCH, n * BATCH // 2, {0: 1.0}))
            if should_stop():
                break
        self.epochs_done += position == spe
        return position == spe

    def evaluate(self, split):
        acc = self.accuracies[min(self.epochs_done, len(self.accuracies)) - 1]
        probs = np.full((TEST, 2), 0.5, dtype=np.float32)
        return EvalResult(0.5, acc, round((1 - acc) * TEST), probs)

    def state(self):
        return {"params": self.params, "epochs_done": self.epochs_done, "step": self.step}

    def model_state(self):
        return {"model": {}}

    def shutdown(self, graceful=True):
        self.shutdowns += 1


class Signals:
    signum = None

    def __call__(self):
        return self.signum is not None


def _data():
    rng = np.random.default_rng(0)
    return Dataset("tiny", rng.standard_normal((TRAIN, 4), dtype=np.float32), rng.integers(0, 2, TRAIN),
                   rng.standard_normal((TEST, 4), dtype=np.float32), rng.integers(0, 2, TEST), num_classes=2)


def _run(tmp_path, monkeypatch, accuracies=(0.5,), max_failures=3, early_stop=0, optim=None, replicas=1, **run):
    clock = Clock()
    monkeypatch.setattr(loop_module.time, "perf_counter", clock)
    cfg = build_config(overrides={"run": {"epochs": 6, "batch_size": BATCH, "checkpoint_every": 10,
                                          "max_failures": max_failures, **run},
                                  "optim": {"early_stop": early_stop, **(optim or {})},
                                  "resources": {"replicas": replicas}})
    out = io.StringIO()
    failures = FailurePolicy(cfg.run.max_failures)
    ctx = EngineContext(cfg, _data(), None, None, MetricsSink(out=out, progress=False), str(tmp_path), failures)
    store = CheckpointStore(str(tmp_path))
    signals = Signals()
    return ctx, store, signals, out, clock, accuracies


def _loop(ctx, store, signals, accuracies, clock, found=None, scaling=None, **engine):
    engine = ScriptedEngine(ctx, list(accuracies), clock, stop=signals, **engine)
    return RunLoop(engine, store, signals, found, resume_hint="runs/x", scaling=scaling), engine


def _names(store):
    return [p.rsplit("/", 1)[1] for p in store.paths()]


def test_target_accuracy_stops_at_the_first_epoch_that_reaches_it(tmp_path, monkeypatch):
    ctx, store, signals, out, clock, acc = _run(tmp_path, monkeypatch, (0.5, 0.7, 0.9, 0.95), target_accuracy=0.85)
    loop, engine = _loop(ctx, store, signals, acc, clock)
    summary = loop.run()
    assert (summary.stopped, summary.epochs, summary.test_accuracy) == ("target_accuracy", 3, 0.9)
    assert "stopped: test accuracy 0.9000 reached the target 0.85 after epoch 3" in out.getvalue()
    assert _names(store) == ["ckpt-000003.pt"]  # written on the stop although checkpoint_every is 10
    assert engine.shutdowns >= 1


def test_early_stop_after_n_evaluations_without_improvement(tmp_path, monkeypatch):
    ctx, store, signals, out, clock, acc = _run(tmp_path, monkeypatch, (0.5, 0.6, 0.6, 0.55, 0.9), early_stop=2)
    summary = _loop(ctx, store, signals, acc, clock)[0].run()
    assert (summary.stopped, summary.epochs) == ("early_stop", 4)
    assert "stopped: no better test accuracy in 2 evaluations" in out.getvalue()
    assert _names(store) == ["ckpt-000004.pt"]


def test_time_limit_stops_mid_epoch_and_checkpoints_there(tmp_path, monkeypatch):
    ctx, store, signals, out, clock, acc = _run(tmp_path, monkeypatch, time_limit=3.0)
    summary = _loop(ctx, store, signals, acc, clock)[0].run()
    # 20 steps of 0.1 s per epoch: the limit falls 10 steps into epoch 2, where the chunk ends
    assert (summary.stopped, summary.epochs, summary.steps) == ("time_limit", 1, 30)
    assert summary.train_s == pytest.approx(3.0)
    assert "stopped: time limit of 3 s reached after 1 epochs and 10 steps" in out.getvalue()
    assert _names(store) == ["ckpt-000001-step000010.pt"]
    state = store.load_latest()[0]
    assert (state["epoch"], state["in_epoch"], state["step"], state["window"]["samples"]) == (1, 10, 30, 10 * BATCH)


def test_epochs_rule_and_checkpoint_every(tmp_path, monkeypatch):
    ctx, store, signals, out, clock, acc = _run(tmp_path, monkeypatch, checkpoint_every=4, keep_checkpoints=5)
    summary = _loop(ctx, store, signals, acc, clock)[0].run()
    assert (summary.stopped, summary.epochs, summary.steps) == ("epochs", 6, 120)
    assert _names(store) == ["ckpt-000004.pt", "ckpt-000006.pt"]  # every 4, and after the last
    assert "stopped:" not in out.getvalue()


def test_a_signal_mid_epoch_checkpoints_and_resume_is_exact(tmp_path, monkeypatch):
    ctx, store, signals, out, clock, acc = _run(tmp_path, monkeypatch, (0.5, 0.6, 0.7, 0.8, 0.85, 0.9))
    straight, engine = _loop(ctx, store, signals, acc, clock)
    want = straight.run()
    reference = engine.params
    stopped = tmp_path / "stopped"
    ctx2, store2, signals2, _, clock2, _ = _run(stopped, monkeypatch)
    first, _ = _loop(ctx2, store2, signals2, acc, clock2, stop_at=47)
    with pytest.raises(Interrupted) as err:
        first.run()
    assert err.value.signum == 15 and str(err.value) == "terminated; continue with --resume runs/x"
    assert _names(store2) == ["ckpt-000002-step000010.pt"]  # 47 -> the chunk ending at step 50
    ctx3, _, signals3, _, clock3, _ = _run(stopped, monkeypatch)
    second, engine2 = _loop(ctx3, store2, signals3, acc, clock3, found=store2.load_latest())
    got = second.run()
    assert engine2.params == reference and got.steps == want.steps == 120
    assert [h["train_loss"] for h in got.history] == [h["train_loss"] for h in want.history]
    assert [h["epoch"] for h in got.history] == list(range(1, 7))
    assert got.history[2]["samples_per_s"] > 0  # the interrupted epoch's record covers both halves
    assert got.train_samples == want.train_samples


def test_divergence_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    ctx, store, signals, out, clock, acc = _run(tmp_path, monkeypatch, checkpoint_every=1)
    loop, engine = _loop(ctx, store, signals, acc, clock, nan_at=43)
    with pytest.raises(Diverged) as err:
        loop.run()
    message = str(err.value)
    assert "training diverged in epoch 3, step 45: the loss is nan" in message and "--lr" in message
    assert "--resume runs/x" in message
    assert _names(store) == ["ckpt-000001.pt", "ckpt-000002.pt"]  # nothing of the diverged epoch
    assert engine.step == 45  # stopped at the chunk, not at the end of the epoch


def test_an_exploding_loss_is_divergence_too(tmp_path, monkeypatch):
    """The issue's --lr 50: a finite loss 1,000x above where training started (ln 2 at chance with
    2 classes, log-likelihood) stops the run like a NaN, keeping the last good checkpoint."""
    ctx, store, signals, out, clock, acc = _run(tmp_path, monkeypatch, checkpoint_every=1)
    loop, engine = _loop(ctx, store, signals, acc, clock, boom_at=43)
    with pytest.raises(Diverged) as err:
        loop.run()
    assert "training diverged in epoch 3, step 45: the loss is 1e+06, over 1000x where it started (0.6931)" in str(
        err.value)
    assert _names(store) == ["ckpt-000001.pt", "ckpt-000002.pt"]
    assert engine.step == 45


def test_a_loss_below_the_rule_trains_on(tmp_path, monkeypatch):
    ctx, store, signals, out, clock, acc = _run(tmp_path, monkeypatch)
    loop, engine = _loop(ctx, store, signals, acc, clock)  # loss 1.0 all along: 1.4x chance's ln 2
    assert loop.run().stopped == "epochs"


def test_a_replica_death_rewinds_to_the_last_checkpoint(tmp_path, monkeypatch):
    ctx, store, signals, out, clock, acc = _run(tmp_path, monkeypatch, checkpoint_every=1)
    straight, engine = _loop(ctx, store, signals, acc, clock)
    straight.run()
    reference = engine.params
    ctx2, store2, signals2, out2, clock2, _ = _run(tmp_path / "b", monkeypatch, checkpoint_every=1)
    loop, engine2 = _loop(ctx2, store2, signals2, acc, clock2, die_at=52)
    summary = loop.run()
    assert engine2.params == reference and engine2.starts == 2
    assert summary.restarts == 1 and summary.failures[0]["restarted_from_epoch"] == 2
    assert "replica 0 (pid 4242) died in epoch 3; restarting from checkpoint" in out2.getvalue()
    assert [h["epoch"] for h in summary.history] == list(range(1, 7))  # the redone epoch once


class DiesWhileStarting(ScriptedEngine):
    """A replica dies mid-run, and its restart is first placed on a node that is dying too: the
    second start raises Ray's ActorDiedError (a clean-clone run of test_multinode's ensemble)."""

    def start(self, state):
        if self.starts == 1:
            from ray.exceptions import ActorDiedError

            self.starts += 1
            raise ActorDiedError()
        super().start(state)


def test_an_actor_that_dies_while_starting_is_a_failure_and_restarts(tmp_path, monkeypatch):
    ctx, store, signals, out, clock, acc = _run(tmp_path, monkeypatch, checkpoint_every=1)
    loop = RunLoop(DiesWhileStarting(ctx, list(acc), clock, stop=signals, die_at=52), store, signals, None,
                   resume_hint="runs/x")
    summary = loop.run()
    assert summary.restarts == 2 and summary.epochs == 6
    second = summary.failures[1]
    assert second["starting"] and second["error"] == "ActorDiedError" and second["epoch"] == 3, second
    assert second["restarted_from_epoch"] == 2
    assert "a replica died in epoch 3; restarting from checkpoint" in out.getvalue()


class DiesWhileFinishing(ScriptedEngine):
    """Every epoch trained, then a replica dies in the run's summary (its node vanished after the
    last epoch: a clean-clone run of test_multinode's ensemble raised ReplicaDied out of fit)."""

    def extras(self):
        if self.starts == 1:
            raise ReplicaDied({"rank": 0, "pid": 4242, "error": "ActorUnavailableError"})
        return {}


def test_a_death_after_the_last_epoch_restarts_from_the_final_checkpoint_and_finishes(tmp_path, monkeypatch):
    ctx, store, signals, out, clock, acc = _run(tmp_path, monkeypatch, checkpoint_every=1)
    straight, engine = _loop(ctx, store, signals, acc, clock)
    reference = (straight.run(), engine.params)
    ctx2, store2, signals2, out2, clock2, _ = _run(tmp_path / "b", monkeypatch, checkpoint_every=1)
    engine2 = DiesWhileFinishing(ctx2, list(acc), clock2, stop=signals2)
    summary = RunLoop(engine2, store2, signals2, None, resume_hint="runs/x").run()
    assert engine2.starts == 2 and engine2.params == reference[1]  # nothing trained twice
    assert summary.epochs == 6 and summary.steps == reference[0].steps and summary.restarts == 1
    assert summary.failures[0]["restarted_from_epoch"] == 6 and summary.failures[0]["epoch"] == 6
    assert "replica 0 (pid 4242) died in epoch 6; restarting from checkpoint" in out2.getvalue()
    assert [h["epoch"] for h in summary.history] == list(range(1, 7))


def test_past_max_failures_the_loop_gives_up(tmp_path, monkeypatch):
    ctx, store, signals, out, clock, acc = _run(tmp_path, monkeypatch, max_failures=0)
    loop, _ = _loop(ctx, store, signals, acc, clock, die_at=3)
    with pytest.raises(ReplicaFailure) as err:
        loop.run()
    assert str(err.value) == ("replica 0 (pid 4242) died in epoch 1; giving up after 1 failure(s) "
                              "(run.max_failures is 0); continue with --resume runs/x")


def test_training_at_chance_warns_once(tmp_path, monkeypatch):
    ctx, store, signals, out, clock, acc = _run(tmp_path, monkeypatch)
    summary = _loop(ctx, store, signals, acc, clock)[0].run()  # the scripted train accuracy is 0.5 with 2 classes
    assert out.getvalue().count("warning: training accuracy has stayed at chance (0.50) for 3 epochs") == 1
    assert len(summary.warnings) == 1 and "stayed at chance (0.50)" in summary.warnings[0]
    assert summary.to_dict()["warnings"] == summary.warnings  # summary.json's warnings


def test_the_plateau_schedule_ends_training_at_its_floor(tmp_path, monkeypatch):
    """Nielsen: halve eta whenever accuracy stalls, and stop once it is eta0/lr_floor_div."""
    optim = {"lr": 0.4, "schedule": "plateau", "patience": 1, "lr_floor_div": 4.0}
    ctx, store, signals, out, clock, acc = _run(tmp_path, monkeypatch, (0.5, 0.5, 0.5, 0.5, 0.5), optim=optim)
    summary = _loop(ctx, store, signals, acc, clock)[0].run()
    assert (summary.stopped, summary.epochs) == ("lr_floor", 3)
    assert [h["lr"] for h in summary.history] == [0.4, 0.4, 0.2]
    assert "halved the learning rate down to eta0/4 (0.1)" in out.getvalue()


class Scaling:
    """A scripted elastic policy (run/scaling.py's interface): the count each start takes, and
    the count the n-th epoch end grows to."""

    def __init__(self, starts, grow_at=None):
        self.starts, self.grow_at, self.hints, self.ends = list(starts), dict(grow_at or {}), [], 0

    def start_count(self, hint=None):
        self.hints.append(hint)
        return self.starts.pop(0)

    def grow_to(self, current):
        self.ends += 1
        return self.grow_at.get(self.ends)


def test_an_elastic_count_shrinks_after_a_death_and_grows_back_at_an_epoch_end(tmp_path, monkeypatch):
    """--replicas 1-2: two replicas (10 steps an epoch), one dies in epoch 3 and the restart from
    the checkpoint of epoch 2 gets one (20 steps an epoch: the data re-sharded); the end of that
    epoch has room for two again, checkpoints and restarts the engine with two from there."""
    ctx, store, signals, out, clock, acc = _run(tmp_path, monkeypatch, checkpoint_every=1, replicas="1-2")
    scaling = Scaling([2, 1, 2], grow_at={3: 2})
    loop, engine = _loop(ctx, store, signals, acc, clock, die_at=25, scaling=scaling)
    summary = loop.run()
    assert engine.counts == [2, 1, 2] and scaling.hints == [None, 2, 2]  # the restart tries the count before
    assert summary.steps == 20 + 20 + 3 * 10 and summary.epochs == 6 and summary.restarts == 1
    assert summary.replicas_history == [{"epoch": 0, "step": 0, "replicas": 2}, {"epoch": 2, "step": 20, "replicas": 1},
                                        {"epoch": 3, "step": 40, "replicas": 2}]
    assert summary.replicas == 2 and summary.to_dict()["replicas"] == 2
    assert "replicas: 2 -> 1 after epoch 2" in out.getvalue() and "replicas: 1 -> 2 after epoch 3" in out.getvalue()
    grown = store.load_latest()[0]  # a checkpoint holds the count and its history: a resume or rewind keeps them
    assert grown["replicas"] == 2 and grown["replicas_history"] == summary.replicas_history


def test_a_run_stopped_mid_epoch_resumes_as_many_examples_in_with_another_count(tmp_path, monkeypatch):
    """Stopped 5 steps into epoch 2 with two replicas (10 examples a step); resumed with one (5),
    the epoch goes on from step 10 of its 20."""
    ctx, store, signals, out, clock, acc = _run(tmp_path, monkeypatch, epochs=3, replicas="1-2")
    first, _ = _loop(ctx, store, signals, acc, clock, stop_at=12, scaling=Scaling([2]))
    with pytest.raises(Interrupted):
        first.run()
    assert _names(store) == ["ckpt-000001-step000005.pt"]
    ctx2, _, signals2, _, clock2, _ = _run(tmp_path, monkeypatch, epochs=3, replicas="1-2")
    second, engine = _loop(ctx2, store, signals2, acc, clock2, found=store.load_latest(), scaling=Scaling([1]))
    summary = second.run()
    assert engine.counts == [1] and summary.steps == 10 + 5 + (20 - 10) + 20
    assert [h["replicas"] for h in summary.replicas_history] == [2, 1]


def test_a_fixed_count_records_one_entry(tmp_path, monkeypatch):
    ctx, store, signals, out, clock, acc = _run(tmp_path, monkeypatch, replicas=2)
    summary = _loop(ctx, store, signals, acc, clock)[0].run()
    assert summary.replicas == 2 and summary.replicas_history == [{"epoch": 0, "step": 0, "replicas": 2}]
