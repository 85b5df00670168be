"""Voting ensembles (Nielsen ch. 6): K members trained independently and concurrently, combined
at the end by majority vote (ray_train/voting.py holds the rule and its tie-break).

Each member is a sync ReplicaGroup of ``replicas_per_member`` actors in its own placement group.
Nothing moves between members while they train, so the driver runs one short thread per member
that fits in the cluster at once (the threads only wait on object refs; the work is in the actors)
and queues the rest: a member starts when another one's group has been torn down. A member whose
process dies is rebuilt from its last checkpoint; after ``run.max_failures`` deaths it is left
out of the vote with a warning on stdout and in summary.json, never silently.
"""
from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np

from ray_train.checkpoint import CheckpointStore, save_atomic
from ray_train.config import ConfigError, TrainConfig, UserError
from ray_train.ensemble_member import EnsembleMember
from ray_train.group import ReplicaGroup
from ray_train.metrics import write_json
from ray_train.optim import Schedule
from ray_train.strategies.base import RunContext, chunk_metrics, epoch_record
from ray_train.voting import accuracy, disagreement, majority_vote, oracle_accuracy, soft_vote

MEMBER_CLASS = EnsembleMember  # tests swap in a subclass that dies, to exercise recovery
MEMBERS_DIR = "members"
ENSEMBLE_FILE = "ensemble.json"
MAX_GRID = 48  # misclassified digits shown in the TensorBoard image
# epoch record key -> tag under member_<k>/ (the names the sync strategy uses at the top level)
RECORD_TAGS = {"lr": "lr", "samples_per_s": "throughput/samples_per_s", "test_loss": "test/loss",
               "test_accuracy": "test/accuracy"}


@dataclass(frozen=True)
class MemberSpec:
    """What makes one member differ from the others; stored next to its weights."""

    index: int
    model: str
    seed: int
    optimizer: str
    lr: float
    bagging: bool
    dropout: float | None
    weight: float


@dataclass
class MemberResult:
    spec: MemberSpec
    ok: bool
    restarts: int = 0
    resumed_from: list[int] = field(default_factory=list)  # checkpoint epoch of every restart
    probs: np.ndarray | None = None  # softmax on the test set [n, C]
    test_loss: float | None = None
    history: list[dict] = field(default_factory=list)
    train_samples: int = 0
    train_s: float = 0.0
    distinct_examples: int = 0
    error: str = ""


def member_specs(cfg: TrainConfig) -> list[MemberSpec]:
    """K copies of the run's model with seeds seed..seed+K-1, or the configured member list with
    missing keys taken from the run; the user's values are checked here, naming the member."""
    ens, raw = cfg.ensemble, cfg.ensemble.members
    entries = raw if isinstance(raw, list) else [{} for _ in range(int(raw))]
    specs = []
    for i, m in enumerate(entries):
        spec = MemberSpec(i, m.get("model", cfg.model.name), m.get("seed", cfg.run.seed + i),
                          m.get("optimizer", cfg.optim.optimizer), m.get("lr", cfg.optim.lr),
                          m.get("bagging", ens.bagging), m.get("dropout", cfg.model.dropout),
                          ens.weights[i] if ens.weights is not None else m.get("weight", 1.0))
        if not isinstance(spec.bagging, bool):
            raise ConfigError(f"ensemble.members[{i}].bagging: expected true or false, got {spec.bagging!r}")
        if isinstance(spec.weight, bool) or not isinstance(spec.weight, (int, float)) or not spec.weight >= 0:
            raise ConfigError(f"ensemble.members[{i}].weight: expected a number >= 0, got {spec.weight!r}")
        try:
            member_config(cfg, spec)
        except ConfigError as exc:  # e.g. "run.seed: ..." -> "ensemble.members[2]: run.seed: ..."
            raise ConfigError(f"ensemble.members[{i}]: {exc}") from None
        specs.append(spec)
    if not any(s.weight > 0 for s in specs):
        raise ConfigError("ensemble.weights: at least one member weight must be > 0")
    return specs


def member_config(cfg: TrainConfig, spec: MemberSpec) -> TrainConfig:
    """The run's config as one member sees it; the replicas read everything from it."""
    rep = dataclasses.replace
    return rep(cfg, model=rep(cfg.model, name=spec.model, dropout=spec.dropout),
               optim=rep(cfg.optim, optimizer=spec.optimizer, lr=spec.lr),
               run=rep(cfg.run, seed=spec.seed),
               resources=rep(cfg.resources, replicas=cfg.ensemble.replicas_per_member),
               ensemble=rep(cfg.ensemble, bagging=spec.bagging))


def concurrent_slots(res, count: int) -> int:
    """How many member groups fit in the cluster at once (at least one: check_resources said so)."""
    import ray

    total = ray.cluster_resources()
    fit = [math.floor(total.get("CPU", 0.0) / (res.replicas * res.cpus_per_replica) + 1e-9)]
    if res.gpus_per_replica:
        fit.append(math.floor(total.get("GPU", 0.0) / (res.replicas * res.gpus_per_replica) + 1e-9))
    return max(1, min(count, *fit))


def member_dir(run_dir: str, index: int) -> str:
    return os.path.join(run_dir, MEMBERS_DIR, f"member_{index}")


# -- one member's life --------------------------------------------------------------------------
def run_member(ctx: RunContext, spec: MemberSpec, abort: threading.Event) -> MemberResult:
    """Train one member to the end, rebuilding its group from the last checkpoint when a process
    dies; past run.max_failures deaths, a failed result that the vote leaves out."""
    from ray.exceptions import RayActorError

    cfg = member_config(ctx.cfg, spec)
    k, limit = spec.index, cfg.run.max_failures
    store = CheckpointStore(member_dir(ctx.run_dir, k), keep=cfg.run.keep_checkpoints)
    found = store.load_latest() if ctx.cfg.run.resume else None
    if ctx.cfg.run.resume:
        where = f"{found[1]} (epoch {found[0]['epoch']})" if found else "scratch: it has no checkpoint"
        print(f"member {k}: resuming from {where}", file=ctx.sink.out, flush=True)
    result = MemberResult(spec, ok=False)
    while True:
        group = None
        try:
            group = ReplicaGroup.create(cfg, ctx.data_ref, MEMBER_CLASS, seed=spec.seed)
            return train_member(ctx, cfg, spec, group, store, found[0] if found else None, result, abort)
        except RayActorError as exc:
            result.restarts += 1
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            if result.restarts > limit:
                result.error = (f"member {k} ({spec.model}, seed {spec.seed}) dropped: its process died "
                                f"{result.restarts} times, more than run.max_failures={limit}; the ensemble "
                                f"is formed from the other members without it (last error: {reason})")
                result.restarts -= 1  # the last death was not followed by a restart
                print(f"WARNING: {result.error}", file=ctx.sink.out, flush=True)
                return result
            found = store.load_latest()
            result.resumed_from.append(found[0]["epoch"] if found else 0)
            where = f"its checkpoint after epoch {found[0]['epoch']}" if found else "scratch (no checkpoint yet)"
            print(f"warning: member {k}: process died ({reason}); restarting from {where} "
                  f"(failure {result.restarts} of {limit} allowed)", file=ctx.sink.out, flush=True)
        finally:
            if group is not None:
                group.shutdown()


def train_member(ctx: RunContext, cfg: TrainConfig, spec: MemberSpec, group: ReplicaGroup,
                 store: CheckpointStore, state: dict | None, result: MemberResult,
                 abort: threading.Event) -> MemberResult:
    import ray

    tag, sink, y_test = f"member_{spec.index}", ctx.sink, ctx.data.y_test
    schedule = Schedule(cfg.optim)
    start, step = 0, 0
    if state is not None:
        ray.get([a.load.remote(state) for a in group.actors])
        schedule.load_state_dict(state["schedule"])
        start, step = state["epoch"], state["step"]
        result.history, result.train_samples, result.train_s = list(state["history"]), state["samples"], state["train_s"]
    for epoch in range(start, cfg.run.epochs):
        if abort.is_set():
            raise UserError(f"member {spec.index} stopped: another member failed")
        lr = schedule.lr(epoch)

        def on_chunk(results):
            nonlocal step
            steps, loss, acc, _ = chunk_metrics(results)
            step += steps
            sink.scalar(f"{tag}/train/loss", loss, step)
            sink.scalar(f"{tag}/train/accuracy", acc, step)

        t0 = time.perf_counter()
        totals = group.train_epoch(epoch, lr, cfg.run.log_every, on_chunk)
        elapsed = time.perf_counter() - t0
        result.train_s, result.train_samples = result.train_s + elapsed, result.train_samples + totals["samples"]
        last = epoch + 1 == cfg.run.epochs
        evaluation = group.evaluate(y_test) if (epoch + 1) % cfg.run.eval_every == 0 or last else None
        record = epoch_record(epoch, lr, totals, elapsed, evaluation)
        result.history.append(record)
        for key, name in RECORD_TAGS.items():
            if record[key] is not None:
                sink.scalar(f"{tag}/{name}", record[key], step)
        test = "" if evaluation is None else f"  test acc {evaluation.accuracy:.4f} ({evaluation.errors} errors)"
        print(f"member {spec.index} epoch {epoch + 1:>3}  loss {record['train_loss']:.4f}{test}",
              file=sink.out, flush=True)
        if evaluation is not None:
            schedule.observe(epoch, evaluation.accuracy)
        stop = schedule.should_stop
        if (epoch + 1) % cfg.run.checkpoint_every == 0 or last or stop:
            store.save(epoch + 1, {**ray.get(group.actors[0].state.remote()), "epoch": epoch + 1, "step": step,
                                   "history": result.history, "schedule": schedule.state_dict(),
                                   "samples": result.train_samples, "train_s": result.train_s})
        if stop:
            break
    parts = sorted(ray.get([a.probabilities.remote() for a in group.actors]), key=lambda p: p["start"])
    result.probs = np.concatenate([p["probs"] for p in parts])
    result.test_loss = sum(p["loss_sum"] for p in parts) / max(len(y_test), 1)
    result.distinct_examples = ray.get(group.actors[0].distinct_examples.remote())
    model = ray.get(group.actors[0].state.remote())["model"]
    acc, errors = accuracy(result.probs.argmax(1), y_test)
    save_atomic(os.path.join(member_dir(ctx.run_dir, spec.index), "model.pt"),
                {"model": model, "spec": dataclasses.asdict(spec), "test_accuracy": acc, "test_errors": errors})
    result.ok = True
    return result


def run_members(ctx: RunContext, specs: list[MemberSpec], slots: int) -> list[MemberResult]:
    """Train every member, ``slots`` at a time; the others wait in the pool's queue."""
    abort = threading.Event()
    with ThreadPoolExecutor(max_workers=slots, thread_name_prefix="member") as pool:
        futures = [pool.submit(run_member, ctx, spec, abort) for spec in specs]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:  # a bug or a user error, not a dead process: stop the others and report it
            abort.set()
            for f in futures:
                f.cancel()
            raise failed[0].exception()
    return [f.result() for f in futures]


# -- the strategy ---------------------------------------------------------------------------------
def train(ctx: RunContext) -> dict:
    from ray_train.cluster import check_resources

    cfg, data, sink = ctx.cfg, ctx.data, ctx.sink
    specs = member_specs(cfg)
    res = member_config(cfg, specs[0]).resources
    check_resources(res)
    slots = concurrent_slots(res, len(specs))
    models = ", ".join(sorted({s.model for s in specs}))
    print(f"ensemble: {len(specs)} members ({models}), each {res.replicas} replica(s) x {res.cpus_per_replica:g} CPU; "
          f"{slots} train at once" + ("" if slots == len(specs) else ", the others queue"), file=sink.out, flush=True)
    t0 = time.perf_counter()
    results = run_members(ctx, specs, slots)
    train_s = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    warnings = [r.error for r in results if not r.ok]
    if not ok:
        raise UserError("ensemble: every member failed; there is nothing to vote with (" + "; ".join(warnings) + ")")
    weights = np.array([r.spec.weight for r in ok])
    if weights.sum() <= 0:
        raise UserError("ensemble: every member left with a vote has weight 0; nothing to vote with")
    report = combine(np.stack([r.probs for r in ok]), weights, data.y_test)
    sink.history = ensemble_history(ok)
    members = [member_summary(r, data.y_test) for r in results]
    log_ensemble(ctx, report, ok, members, cfg.run.epochs)
    persist(ctx, results, weights)
    print_report(sink.out, data.y_test, members, report, warnings)
    samples = sum(r.train_samples for r in results)
    return {"test_accuracy": report["vote_accuracy"], "test_errors": report["vote_errors"],
            "test_loss": report["soft_vote_nll"], "train_samples": samples, "train_s": train_s,
            "samples_per_s": samples / max(train_s, 1e-9), "replicas": len(specs) * res.replicas,
            "replicas_per_member": res.replicas, "concurrent_members": slots, "members": members,
            "members_voting": len(ok), **{k: v for k, v in report.items() if k != "vote_preds"},
            "warnings": warnings}


def combine(probs: np.ndarray, weights: np.ndarray, y: np.ndarray) -> dict:
    hard = majority_vote(probs, weights)
    soft, mean = soft_vote(probs, weights)
    member_acc = [accuracy(p.argmax(1), y) for p in probs]
    dis = disagreement(probs)
    off = dis[~np.eye(len(dis), dtype=bool)]
    vote_acc, vote_err = accuracy(hard, y)
    soft_acc, soft_err = accuracy(soft, y)
    nll = float(-np.log(np.clip(mean[np.arange(len(y)), y], 1e-12, None)).mean()) if len(y) else 0.0
    return {"vote_accuracy": vote_acc, "vote_errors": vote_err, "soft_vote_accuracy": soft_acc,
            "soft_vote_errors": soft_err, "soft_vote_nll": nll, "oracle_accuracy": oracle_accuracy(probs, y),
            "member_mean_accuracy": float(np.mean([a for a, _ in member_acc])),
            "member_mean_errors": float(np.mean([e for _, e in member_acc])),
            "member_best_errors": int(min(e for _, e in member_acc)),
            "disagreement": dis.round(6).tolist(), "mean_disagreement": float(off.mean()) if off.size else 0.0,
            "tie_rule": "plurality of argmax votes; ties -> highest summed softmax probability, then lowest label",
            "vote_preds": hard}


def ensemble_history(ok: list[MemberResult]) -> list[dict]:
    """One record per epoch, each number the mean over the members that reached that epoch."""
    out = []
    for e in range(max(len(r.history) for r in ok)):
        recs = [r.history[e] for r in ok if len(r.history) > e]
        rec = {"epoch": e + 1, "members": len(recs)}
        for key in ("lr", "train_loss", "train_accuracy", "samples_per_s", "epoch_s", "test_loss", "test_accuracy",
                    "test_errors"):
            vals = [r[key] for r in recs if r.get(key) is not None]
            rec[key] = float(np.mean(vals)) if vals else None
        out.append(rec)
    return out


def member_summary(r: MemberResult, y: np.ndarray) -> dict:
    acc, errors = accuracy(r.probs.argmax(1), y) if r.ok else (None, None)
    return {**dataclasses.asdict(r.spec), "status": "ok" if r.ok else "failed", "test_accuracy": acc,
            "test_errors": errors, "test_loss": r.test_loss, "epochs": len(r.history), "restarts": r.restarts,
            "resumed_from_epochs": r.resumed_from, "train_samples": r.train_samples, "train_s": r.train_s,
            "distinct_examples": r.distinct_examples, "error": r.error or None}


def log_ensemble(ctx: RunContext, report: dict, ok: list[MemberResult], members: list[dict], step: int) -> None:
    sink, y, x = ctx.sink, ctx.data.y_test, ctx.data.x_test
    for key in ("vote_accuracy", "vote_errors", "soft_vote_accuracy", "soft_vote_errors", "oracle_accuracy",
                "member_mean_accuracy", "member_mean_errors", "member_best_errors", "mean_disagreement"):
        sink.scalar(f"ensemble/{key}", report[key], step)
    sink.scalar("ensemble/members_voting", len(ok), step)
    votes = np.stack([r.probs.argmax(1) for r in ok])
    wrong = np.flatnonzero(report["vote_preds"] != y)
    if len(wrong):
        sink.image("ensemble/vote_errors", error_grid(x[wrong[:MAX_GRID]], y[wrong[:MAX_GRID]],
                                                      report["vote_preds"][wrong[:MAX_GRID]], votes[:, wrong[:MAX_GRID]]),
                   step)
    sink.confusion(y, report["vote_preds"], ctx.data.num_classes, step)


def error_grid(images: np.ndarray, labels: np.ndarray, voted: np.ndarray, votes: np.ndarray) -> np.ndarray:
    """The misclassified digits as an RGB HWC image: each titled true -> voted, members' votes below."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 8
    rows = max(1, math.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.55), dpi=80, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(np.asarray(images[i], dtype=np.float32).reshape(28, 28), cmap="gray_r")
            ax.set_title(f"{labels[i]}->{voted[i]}\n{''.join(map(str, votes[:, i]))}", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="raw", dpi=80)
    w, h = fig.canvas.get_width_height()
    plt.close(fig)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8).reshape(h, w, -1)[..., :3].copy()


def persist(ctx: RunContext, results: list[MemberResult], weights: np.ndarray) -> None:
    """ensemble.json: which member files vote and with what weight (scripts/evaluate.py reads it)."""
    entries = [{**dataclasses.asdict(r.spec), "status": "ok" if r.ok else "failed",
                "path": os.path.relpath(os.path.join(member_dir(ctx.run_dir, r.spec.index), "model.pt"), ctx.run_dir)}
               for r in results]
    write_json(os.path.join(ctx.run_dir, ENSEMBLE_FILE),
               {"members": entries, "weights": [float(w) for w in weights], "num_classes": ctx.data.num_classes,
                "dataset": ctx.data.name, "tie_rule": "plurality; ties -> highest summed softmax, then lowest label"})


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
