"""Voting ensembles (Nielsen ch. 6): K members trained independently and concurrently, then
combined by majority vote (voting.py beside this file). Each member is a run loop over a sync engine in
its own placement group, with its own checkpoints (parameters, optimizer, RNG) under
runs/<name>/members/member_<k>/ and a child metrics sink (``member_<k>/`` tags); the driver runs
one thread per member that fits in the cluster and queues the rest. A member that dies more than
``run.max_failures`` times is left out of the vote, with a warning on stdout and in summary.json.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from ray_train.cluster import check_resources, concurrent_slots
from ray_train.config import TrainConfig
from ray_train.engine import EngineContext
from ray_train.errors import Interrupted, ReplicaFailure, UserError
from ray_train.metrics.images import error_grid, is_image
from ray_train.run.checkpoint import CheckpointStore
from ray_train.run.failure import FailurePolicy
from ray_train.run.files import write_json
from ray_train.run.loop import RunLoop, Summary
from ray_train.strategies.ensemble.config import MemberSpec, member_config, member_specs
from ray_train.strategies.ensemble.member import EnsembleMember, EnsembleStage
from ray_train.strategies.ensemble.voting import average_report, vote_report
from ray_train.strategies.sync.engine import SyncEngine

MEMBER_CLASS = EnsembleMember  # tests swap in a subclass that dies, to exercise recovery
STAGE_CLASS = EnsembleStage  # a member's stage actors when it is a pipeline (--stages)
MEMBERS_DIR = "members"
ENSEMBLE_FILE = "ensemble.json"
MAX_GRID = 48  # misclassified images shown in the TensorBoard image


@dataclass
class MemberResult:
    spec: MemberSpec
    summary: Summary | None  # None: left out of the vote after too many deaths
    failures: list[dict]
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.summary is not None


class MemberEngine(SyncEngine):
    """A member's sync engine: the member replica class (bagging) and its coverage in the summary."""

    def start(self, state):
        self.replica_cls, self.stage_cls = MEMBER_CLASS, STAGE_CLASS
        super().start(state)

    def extras(self) -> dict:
        return {"distinct_examples": self.group.get([self.group.actors[0].distinct_examples.remote()])[0],
                "nodes": self.group.nodes()}


def member_dir(run_dir: str, index: int) -> str:
    return os.path.join(run_dir, MEMBERS_DIR, f"member_{index}")


# -- one member's life --------------------------------------------------------------------------
def run_member(cfg: TrainConfig, spec: MemberSpec, data, data_ref, custom, sink, run_dir: str, stop) -> MemberResult:
    """Train one member to the end; past run.max_failures deaths, a result the vote leaves out."""
    from ray_train.network import model_factory
    from ray_train.run.outputs import save_models

    if stop():
        raise Interrupted(stop.signum or 2, run_dir)
    mcfg, k = member_config(cfg, spec), spec.index
    child = sink.child(f"member_{k}", f"member {k}")
    store = CheckpointStore(member_dir(run_dir, k), keep=cfg.run.keep_checkpoints)
    found = store.load_latest() if cfg.run.resume else None
    if cfg.run.resume:
        child.say(f"resuming from {found[1]} (epoch {found[0]['epoch']})" if found else
                  "resuming from scratch: it has no checkpoint")
    failures = FailurePolicy(cfg.run.max_failures)
    ctx = EngineContext(mcfg, data, data_ref, model_factory(mcfg, data, custom), child, member_dir(run_dir, k), failures)
    try:
        summary = RunLoop(MemberEngine(ctx), store, stop, found, resume_hint=run_dir).run()
    except ReplicaFailure as exc:
        error = (f"member {k} ({spec.model}, seed {spec.seed}) dropped: {exc}; the ensemble is formed from the "
                 "other members without it")
        child.say(f"WARNING: {error}")
        return MemberResult(spec, None, failures.failures[:-1], error)  # the last death was not restarted
    save_models(member_dir(run_dir, k), summary, data, {"spec": dataclasses.asdict(spec), "test_accuracy": summary.test_accuracy,
                                                        "test_errors": summary.test_errors, "test_loss": summary.test_loss},
                vote=True)
    return MemberResult(spec, summary, summary.failures)


class MemberStop:
    """What a member loop asks between chunks: a signal, or another member's failure (abort)."""

    def __init__(self, signals) -> None:
        self.signals, self.abort = signals, threading.Event()

    def __call__(self) -> bool:
        return self.abort.is_set() or self.signals()

    @property
    def signum(self):
        return getattr(self.signals, "signum", None)


def run_members(cfg, specs, slots: int, data, data_ref, custom, sink, run_dir: str, signals) -> list[MemberResult]:
    """Train every member, ``slots`` at a time; the others wait in the pool's queue. A bug or a
    user error in one member stops the others; a signal stops them all at their next chunk."""
    stop = MemberStop(signals)
    with ThreadPoolExecutor(max_workers=slots, thread_name_prefix="member") as pool:
        futures = [pool.submit(run_member, cfg, spec, data, data_ref, custom, sink, run_dir, stop) for spec in specs]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None and not isinstance(f.exception(), Interrupted)]
        if failed:
            stop.abort.set()
            for f in futures:
                f.cancel()
            raise failed[0].exception()
        wait(futures)
    interrupted = [f.exception() for f in futures if isinstance(f.exception(), Interrupted)]
    if interrupted:
        raise interrupted[0]
    return [f.result() for f in futures]


# -- the ensemble ---------------------------------------------------------------------------------
def run_ensemble(job) -> dict:
    """The ensemble's runner (strategies.base.Strategy.runner): every member's loop, then the vote."""
    cfg, data, data_ref, custom, sink, run_dir, stop = (job.cfg, job.data, job.data_ref, job.custom, job.sink,
                                                        job.run_dir, job.stop)
    specs = member_specs(cfg)
    res = member_config(cfg, specs[0]).resources
    stages = cfg.pipeline.stages
    check_resources(res, stages=stages)
    slots = concurrent_slots(res, len(specs), stages=stages)
    streamed = getattr(data, "streamed", False)
    if streamed:  # Ray Data's reading tasks keep a CPU the members' replicas do not take
        import math

        import ray

        spare = float(ray.cluster_resources().get("CPU", 0.0)) - 1.0
        slots = max(1, min(slots, math.floor(spare / (res.replicas * stages * res.cpus_per_replica) + 1e-9)))
    models = ", ".join(sorted({s.model for s in specs}))
    per = f"{stages} stages x " if stages > 1 else ""
    sink.say(f"ensemble: {len(specs)} members ({models}), each {res.replicas} replica(s) x {per}{res.cpus_per_replica:g} "
             f"CPU; {slots} train at once" + ("" if slots == len(specs) else ", the others queue"))
    t0 = time.perf_counter()
    results = run_members(cfg, specs, slots, data, data_ref, custom, sink, run_dir, stop)
    train_s = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    warnings = [r.error for r in results if not r.ok]
    if not ok:
        raise UserError("ensemble: every member failed; there is nothing to vote with (" + "; ".join(warnings) + ")")
    weights = np.array([r.spec.weight for r in ok])
    if weights.sum() <= 0:
        raise UserError("ensemble: every member left with a vote has weight 0; nothing to vote with")
    members = [member_summary(r) for r in results]
    if getattr(data, "regression", False):
        return averaged(cfg, data, sink, run_dir, results, ok, weights, members, warnings, train_s, slots, res)
    y = test_labels(data, ok)
    report = vote_report(np.stack([r.summary.evaluation.probs for r in ok]), weights, y)
    log_ensemble(sink, data, y, report, ok, cfg.run.epochs)
    persist(run_dir, data, results, weights)
    print_report(sink.out, y, members, report, warnings)
    samples = sum(r.summary.train_samples for r in ok)
    reasons = sorted({r.summary.stopped for r in ok})
    return {"test_accuracy": report["vote_accuracy"], "test_errors": report["vote_errors"],
            "test_loss": report["soft_vote_nll"], "train_samples": samples, "train_s": train_s,
            "samples_per_s": samples / max(train_s, 1e-9), "epochs": max(r.summary.epochs for r in ok),
            "stopped": ",".join(reasons), "history": ensemble_history(ok), "replicas": len(specs) * res.replicas,
            "replicas_per_member": res.replicas, "concurrent_members": slots, "members": members,
            "members_voting": len(ok), **{k: v for k, v in report.items() if k != "vote_preds"},
            "warnings": warnings}


def averaged(cfg, data, sink, run_dir, results, ok, weights, members, warnings, train_s, slots, res) -> dict:
    """A regression ensemble: the members' outputs averaged (there is no vote without classes)."""
    import torch

    from ray_train.worker.losses import Objective

    objective = Objective.of(cfg.model, data)

    def loss_of(pred, y):
        return float(objective.summed(torch.as_tensor(pred, dtype=torch.float32), torch.as_tensor(y))) / max(len(y), 1)

    report = average_report(np.stack([r.summary.evaluation.probs for r in ok]), weights, data.y_test, loss_of)
    for key in ("average_loss", "average_mae", "member_mean_mae", "member_best_mae"):
        sink.scalar(f"ensemble/{key}", report[key], cfg.run.epochs)
    sink.scalar("ensemble/members_voting", len(ok), cfg.run.epochs)
    persist(run_dir, data, results, weights)
    out = sink.out
    print(f"ensemble on {len(data.y_test)} test examples (regression: the members' outputs averaged):", file=out)
    for m in members:
        what = (f"loss {m['test_loss']:.4g}, mae {m['test_mae']:.4g}" if m["status"] == "ok"
                else "FAILED, left out of the average")
        print(f"  member {m['index']}  {m['model']:<6} seed {m['seed']:<4} {what}", file=out)
    print(f"  average: loss {report['average_loss']:.4g}, mae {report['average_mae']:.4g} (members: mean mae "
          f"{report['member_mean_mae']:.4g}, best {report['member_best_mae']:.4g})", file=out)
    for w in warnings:
        print(f"WARNING: {w}", file=out)
    out.flush()
    samples = sum(r.summary.train_samples for r in ok)
    return {"test_accuracy": None, "test_errors": None, "test_loss": report["average_loss"],
            "test_mae": report["average_mae"], "train_samples": samples, "train_s": train_s,
            "samples_per_s": samples / max(train_s, 1e-9), "epochs": max(r.summary.epochs for r in ok),
            "stopped": ",".join(sorted({r.summary.stopped for r in ok})), "history": ensemble_history(ok),
            "replicas": len(results) * res.replicas, "replicas_per_member": res.replicas,
            "concurrent_members": slots, "members": members, "members_voting": len(ok),
            **{k: v for k, v in report.items() if k != "average_preds"}, "warnings": warnings}


def ensemble_history(ok: list[MemberResult]) -> list[dict]:
    """One record per epoch, each number the mean over the members that reached that epoch."""
    out, histories = [], [r.summary.history for r in ok]
    for e in range(max(len(h) for h in histories)):
        recs = [h[e] for h in histories if len(h) > e]
        rec = {"epoch": e + 1, "members": len(recs)}
        for key in ("lr", "train_loss", "train_accuracy", "samples_per_s", "epoch_s", "test_loss", "test_accuracy",
                    "test_errors", "val_loss", "val_accuracy", "train_mae", "test_mae", "val_mae"):
            vals = [r[key] for r in recs if r.get(key) is not None]
            rec[key] = float(np.mean(vals)) if vals else None
        out.append(rec)
    return out


def member_summary(r: MemberResult) -> dict:
    s = r.summary
    ran = {"test_accuracy": s.test_accuracy, "test_errors": s.test_errors, "test_loss": s.test_loss,
           "test_mae": s.test_mae,
           "epochs": s.epochs, "train_samples": s.train_samples, "train_s": s.train_s, "stopped": s.stopped,
           "distinct_examples": s.extras["distinct_examples"], "best_epoch": s.best_epoch,
           "val_accuracy": s.val_accuracy, "best_test_accuracy": s.best_test_accuracy,
           "nodes": s.extras.get("nodes")} if s else {}
    return {**dataclasses.asdict(r.spec), "status": "ok" if r.ok else "failed", "test_accuracy": None,
            "test_errors": None, **ran, "restarts": len(r.failures),
            "resumed_from_epochs": [f["restarted_from_epoch"] for f in r.failures], "error": r.error or None}


def test_labels(data, ok: list[MemberResult]) -> np.ndarray:
    """The test labels in the order the members' probabilities are: a streamed test split comes
    back in the order its shards were read, the same for every member (docs/data.md)."""
    labels = [r.summary.evaluation.labels for r in ok]
    if labels[0] is None:
        return data.y_test
    if any(len(l) != len(labels[0]) or (l != labels[0]).any() for l in labels[1:]):
        raise RuntimeError("ensemble: the members read the streamed test split in different orders; cannot vote")
    return labels[0]


def log_ensemble(sink, data, y: np.ndarray, report: dict, ok: list[MemberResult], step: int) -> None:
    for key in ("vote_accuracy", "vote_errors", "soft_vote_accuracy", "soft_vote_errors", "oracle_accuracy",
                "member_mean_accuracy", "member_mean_errors", "member_best_errors", "mean_disagreement"):
        sink.scalar(f"ensemble/{key}", report[key], step)
    sink.scalar("ensemble/members_voting", len(ok), step)
    votes = np.stack([r.summary.evaluation.preds for r in ok])
    wrong = np.flatnonzero(report["vote_preds"] != y)[:MAX_GRID]
    if len(wrong) and not getattr(data, "streamed", False) and is_image(data.x_test):
        sink.image("ensemble/vote_errors", error_grid(data.x_test[wrong], y[wrong], report["vote_preds"][wrong],
                                                      votes[:, wrong]), step)
    sink.confusion(y, report["vote_preds"], data.num_classes, step)


def persist(run_dir: str, data, results: list[MemberResult], weights: np.ndarray) -> None:
    """ensemble.json: which member files vote and with what weight (ray_train/run/reload.py reads it)."""
    entries = [{**dataclasses.asdict(r.spec), "status": "ok" if r.ok else "failed",
                "path": os.path.relpath(os.path.join(member_dir(run_dir, r.spec.index), "model.pt"), run_dir)}
               for r in results]
    write_json(os.path.join(run_dir, ENSEMBLE_FILE),
               {"members": entries, "weights": [float(w) for w in weights], "num_classes": data.num_classes,
                "dataset": data.name, "regression": bool(data.regression),
                "tie_rule": ("none: a regression ensemble averages its members' outputs" if data.regression
                             else "plurality; ties -> highest summed softmax, then lowest label")})


def print_report(out, y: np.ndarray, members: list[dict], report: dict, warnings: list[str]) -> None:
    print(f"ensemble on {len(y)} test images:", file=out)
    for m in members:
        what = (f"acc {m['test_accuracy']:.4f} ({m['test_errors']} errors)" if m["status"] == "ok"
                else "FAILED, left out of the vote")
        print(f"  member {m['index']}  {m['model']:<6} seed {m['seed']:<4} {what}"
              + (f"  [{m['restarts']} restart(s)]" if m["restarts"] else ""), file=out)
    print(f"  members: mean {report['member_mean_errors']:.1f} errors, best {report['member_best_errors']}; "
          f"oracle accuracy {report['oracle_accuracy']:.4f}; mean pairwise disagreement "
          f"{report['mean_disagreement']:.4f}", file=out)
    print(f"  hard vote: acc {report['vote_accuracy']:.4f} ({report['vote_errors']} errors)   soft vote: acc "
          f"{report['soft_vote_accuracy']:.4f} ({report['soft_vote_errors']} errors)", file=out)
    for w in warnings:
        print(f"WARNING: {w}", file=out)
    out.flush()
