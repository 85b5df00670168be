"""Asynchronous Downpour SGD (DistBelief, Dean et al. 2012): parameter shards own the model and
its optimizer; replicas fetch parameters and push gradients at their own pace; the driver only
hands out chunks of steps, evaluates snapshots, logs, checkpoints and heals failures.

The driver never waits on a barrier: it ``ray.wait``s on whichever replica chunk (or restarted
replica) is ready first and keeps two chunks queued per replica so none idles meanwhile."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from models import build_model
from ray_train.cluster import ReplicaContext, ResourceError, reserve
from ray_train.config import ConfigError, TrainConfig
from ray_train.data import Dataset, steps_per_epoch, to_tensor
from ray_train.group import EvalResult
from ray_train.optim import Schedule
from ray_train.parameter_server import ParameterShard, StalenessGate, decay_ranges, ps_actor, split_bounds
from ray_train.strategies.base import RunContext, chunk_metrics, epoch_record

QUEUE = 2  # chunks queued per replica
REJOIN_WAIT_S = 60.0  # at the end of a run, how long to wait for a replica restart under way


def retried(method):
    """An idempotent actor call that Ray resubmits until a restarting actor is back (it still
    fails, with ActorDiedError, once the actor's restarts are used up)."""
    return method.options(max_task_retries=-1)


def initial_model(cfg: TrainConfig) -> torch.nn.Module:
    """The replicas' initial model (Replica seeds the same way), built without touching the
    driver's global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.run.seed)
        return build_model(cfg.model.name, dropout=cfg.model.dropout)


def check_config(cfg: TrainConfig, n_params: int) -> None:
    """Mistakes only visible once the model is known: raised before any actor starts."""
    if cfg.async_.ps_shards > n_params:
        raise ConfigError(f"async.ps_shards: {cfg.async_.ps_shards} shards for {cfg.model.name}'s {n_params} "
                          f"parameters; allowed: 1..{n_params}")
    import ray

    res, have = cfg.resources, ray.cluster_resources().get("CPU", 0.0)
    asked = res.replicas * res.cpus_per_replica + cfg.async_.ps_shards * cfg.async_.ps_cpus
    if asked > have + 1e-9:
        raise ResourceError(f"resources: {res.replicas} replicas x {res.cpus_per_replica:g} CPU + "
                            f"{cfg.async_.ps_shards} shards x {cfg.async_.ps_cpus:g} CPU = {asked:g} CPU asked, "
                            f"but the cluster has {have:g}; lower --cpus-per-replica or --ps-shards")


@dataclass
class Downpour:
    """The actors of one async run: shards, the optional staleness gate, replicas."""

    shards: list
    replicas: list
    gate: object
    bounds: list
    pg: object
    keep: list = field(default_factory=list)  # object refs the actors' restarts depend on

    @classmethod
    def start(cls, cfg: TrainConfig, data_ref, model: torch.nn.Module, snapshot_dir: str | None = None,
              states: list[dict] | None = None, replica_cls=None) -> "Downpour":
        import ray

        from ray_train.async_replica import AsyncReplica
        from ray_train.replica import replica_actor

        a, res = cfg.async_, cfg.resources
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]).numpy()
        bounds = split_bounds(len(flat), a.ps_shards)
        keep, shards = [], []
        for k, (lo, hi) in enumerate(bounds):
            path = None
            if snapshot_dir:
                path = os.path.join(snapshot_dir, f"shard-{k}.pt")
                if os.path.exists(path):
                    os.remove(path)  # a snapshot of an earlier run must not look like a crash
            keep.append(ray.put(flat[lo:hi]))
            shards.append(ps_actor(ParameterShard, num_cpus=a.ps_cpus, max_restarts=cfg.run.max_failures).remote(
                k, keep[-1], cfg.optim, decay_ranges(model, lo, hi), a.staleness_lr, path, a.snapshot_every_s,
                None if states is None else states[k]))
        gate = None
        if a.max_staleness is not None:
            gate = ps_actor(StalenessGate, num_cpus=0).remote(a.max_staleness)
        pg = reserve(res)
        replicas = [replica_actor(replica_cls or AsyncReplica, num_cpus=res.cpus_per_replica,
                                  num_gpus=res.gpus_per_replica, pg=pg, bundle=r,
                                  max_restarts=cfg.run.max_failures).remote(
            ReplicaContext(r, res.replicas, res.cpus_per_replica, res.gpus_per_replica, cfg.run.seed),
            cfg, data_ref, shards, bounds, gate) for r in range(res.replicas)]
        return cls(shards, replicas, gate, bounds, pg, keep)

    def params(self) -> np.ndarray:
        """A consistent-enough snapshot for evaluation: each shard's current slice."""
        import ray

        for attempt in range(3):
            try:
                refs = [inner for _, (inner,) in ray.get([retried(s.pull_ref).remote() for s in self.shards])]
                return np.concatenate(ray.get(refs))
            except ray.exceptions.RayError:  # a shard died after answering: its object went with it
                if attempt == 2:
                    raise

    def set_lr(self, lr: float) -> None:
        import ray

        ray.get([retried(s.set_lr).remote(lr) for s in self.shards])

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in [*self.replicas, *self.shards, *([self.gate] if self.gate else [])]:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.pg)


@torch.no_grad()
def evaluate(model: torch.nn.Module, flat: np.ndarray, data: Dataset, batch_size: int = 1000) -> EvalResult:
    torch.nn.utils.vector_to_parameters(torch.from_numpy(flat), [p for p in model.parameters() if p.requires_grad])
    model.eval()
    loss_sum, preds = 0.0, []
    for s in range(0, len(data.y_test), batch_size):
        out = model(to_tensor(data.x_test[s : s + batch_size]))
        loss_sum += float(F.cross_entropy(out, torch.from_numpy(data.y_test[s : s + batch_size]), reduction="sum"))
        preds.append(out.argmax(1).numpy())
    preds = np.concatenate(preds)
    errors = int((preds != data.y_test).sum())
    return EvalResult(loss_sum / len(data.y_test), 1 - errors / len(data.y_test), errors, preds)


class _Run:
    """One async run's driver state; ``run`` is the loop, the other methods its steps."""

    def __init__(self, ctx: RunContext, model: torch.nn.Module, hooks) -> None:
        cfg, state = ctx.cfg, ctx.resume_state
        self.ctx, self.cfg, self.model, self.hooks = ctx, cfg, model, hooks
        self.spe = steps_per_epoch(len(ctx.data.y_train), 1, cfg.run.batch_size)  # one epoch-equivalent
        self.total = cfg.run.epochs * self.spe
        self.schedule = Schedule(cfg.optim)
        n = cfg.resources.replicas
        self.done, self.epoch, self.rank_done = 0, 0, [0] * n
        self.failures: list[dict] = []
        self.restarts, self.train_s, self.samples, self.updates0 = 0, 0.0, 0, 0.0
        if state:
            self.done, self.epoch, self.rank_done = int(state["step"]), int(state["epoch"]), list(state["rank_done"])
            self.failures, self.restarts = list(state["failures"]), int(state["restarts"])
            self.train_s, self.samples = float(state["train_s"]), int(state["samples"])
            self.schedule.load_state_dict(state["schedule"])
        self.downpour = Downpour.start(cfg, ctx.data_ref, model, os.path.join(ctx.run_dir, "ps"),
                                       state["shards"] if state else None)
        self.rank_next = list(self.rank_done)
        self.inflight: dict = {}  # chunk ref -> (rank, start, steps)
        self.rejoining: dict = {}  # info ref of a restarting replica -> rank
        self.to_issue = self.total - self.done
        self.seen = np.zeros(cfg.async_.ps_shards, dtype=np.int64)
        self.gated: set[int] = set()  # replicas the staleness gate waits for
        self.lost: set[int] = set()  # replicas whose restarts are used up

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> dict:
        import ray

        cfg, dp = self.cfg, self.downpour
        self.pids = {i["rank"]: i["pid"] for i in ray.get([r.info.remote() for r in dp.replicas])}
        self.shard_pids = {i["index"]: i["pid"] for i in ray.get([s.info.remote() for s in dp.shards])}
        self.lr = self.schedule.lr(self.epoch)
        dp.set_lr(self.lr)
        warm = cfg.async_.warm_start_steps > self.done
        self.active = {0} if warm else set(range(cfg.resources.replicas))
        print(f"async SGD (Downpour): {cfg.resources.replicas} replicas, {cfg.async_.ps_shards} parameter shards, "
              f"fetch every {cfg.async_.n_fetch}, push every {cfg.async_.n_push} steps"
              + (f", warm start {cfg.async_.warm_start_steps} steps on replica 0" if warm else ""), flush=True)
        t0 = self.t0 = self.window_t = time.perf_counter()
        self._new_window()
        stop, evaluation = None, None
        while self.done < self.total and stop is None:
            self._fill()
            refs = [*self.inflight, *self.rejoining]
            if not refs:
                raise RuntimeError("async SGD: every replica is dead and none could be restarted")
            left = None if cfg.run.time_limit is None else cfg.run.time_limit - (time.perf_counter() - t0)
            ready, _ = ray.wait(refs, num_returns=1, timeout=None if left is None else max(left, 0.0))
            if not ready:
                stop = f"time limit of {cfg.run.time_limit:g} s reached"
                break
            if ready[0] in self.rejoining:
                self._rejoin(ready[0])
            else:
                self._chunk_done(ready[0])
            if warm and self.done >= cfg.async_.warm_start_steps:
                warm = False
                self.active |= set(range(cfg.resources.replicas)) - set(self.rejoining.values()) - self.lost
            while self.done >= (self.epoch + 1) * self.spe and stop is None:
                evaluation, stop = self._end_epoch()
        self.train_s += time.perf_counter() - t0
        if self.rejoining and stop is None:
            # Record restarts still under way (a fresh process imports torch: seconds), so the
            # summary pairs every failure with its restart.
            ready, _ = ray.wait(list(self.rejoining), num_returns=len(self.rejoining), timeout=REJOIN_WAIT_S)
            for ref in ready:
                self._rejoin(ref)
        if stop:
            print(f"stopping: {stop}", flush=True)
        return self._finish(evaluation)

    def _fill(self) -> None:
        """Keep QUEUE chunks queued on every live replica while steps remain to hand out. The
        gate counts only replicas with work queued: one left idle at the end of the run (or
        before the warm start ends) must not hold back those still running."""
        for r in sorted(self.active):
            while self.to_issue > 0 and sum(1 for v in self.inflight.values() if v[0] == r) < QUEUE:
                if r not in self.gated:
                    self._gate("join", {r})
                n = min(self.cfg.run.log_every, self.to_issue)
                self.inflight[self.downpour.replicas[r].run.remote(self.rank_next[r], n)] = (r, self.rank_next[r], n)
                self.rank_next[r] += n
                self.to_issue -= n
        busy = {v[0] for v in self.inflight.values()}
        self._gate("leave", self.gated - busy)

    def _chunk_done(self, ref) -> None:
        import ray

        rank, start, n = self.inflight.pop(ref)
        try:
            res = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self._replica_failed(rank, exc)
            return
        self.rank_done[rank] = start + n
        self.done += n
        self.samples += res["samples"]
        for k in ("loss_sum", "correct", "samples"):
            self.window[k] += res[k]
        self.window["steps"][rank] = self.window["steps"].get(rank, 0) + n
        self.seen = np.maximum(self.seen, res["versions"])
        self.ctx.sink.train_chunk(self.done, *chunk_metrics([res]))
        if res["shard_errors"]:
            self._check_shards()
        if self.hooks:
            self.hooks("chunk", {"step": self.done, "replica_pids": dict(self.pids),
                                 "shard_pids": dict(self.shard_pids)})

    # -- failures ------------------------------------------------------------------------------------
    def _replica_failed(self, rank: int, exc: Exception) -> None:
        """Forget the dead replica's queued chunks, hand their steps to the others, and wait (on
        an object ref, in the main ray.wait) for Ray to restart it."""
        for ref in [ref for ref, v in self.inflight.items() if v[0] == rank]:
            del self.inflight[ref]
        self.to_issue += self.rank_next[rank] - self.rank_done[rank]
        self.rank_next[rank] = self.rank_done[rank]
        self.active.discard(rank)
        self._gate("leave", {rank})
        self._record({"kind": "replica", "rank": rank, "pid": self.pids[rank], "error": type(exc).__name__})
        self.rejoining[retried(self.downpour.replicas[rank].info).remote()] = rank

    def _rejoin(self, ref) -> None:
        import ray

        rank = self.rejoining.pop(ref)
        try:
            info = ray.get(ref)
        except ray.exceptions.RayActorError:
            print(f"warning: replica {rank} could not be restarted; continuing without it", flush=True)
            self.lost.add(rank)
            return
        self.restarts += 1
        for failure in reversed(self.failures):
            if failure.get("rank") == rank and "restarted_pid" not in failure:
                failure["restarted_pid"] = info["pid"]
                failure["rejoined_step"] = self.done
                break
        print(f"replica {rank} restarted (pid {info['pid']}); it rejoins by fetching the current parameters",
              flush=True)
        self.pids[rank] = info["pid"]
        self.active.add(rank)

    def _check_shards(self) -> None:
        """A shard whose process changed was restored from its snapshot: report the updates lost."""
        import ray

        for info in ray.get([retried(s.info).remote() for s in self.downpour.shards]):
            k = info["index"]
            if info["pid"] != self.shard_pids[k]:
                # seen may already include pushes applied after the restore (versions restart at
                # the snapshot's), so the loss is bracketed rather than exact.
                restored, seen = info["restored_version"] or 0, int(self.seen[k])
                self._record({"kind": "shard", "shard": k, "pid": self.shard_pids[k], "restarted_pid": info["pid"],
                              "restored_version": restored, "updates_lost": max(0, seen - restored),
                              "updates_lost_min": max(0, seen - int(info["version"]))})
                self.restarts += 1
                self.shard_pids[k] = info["pid"]
                self.seen[k] = info["version"]
                print(f"parameter shard {k} restored from its snapshot at version {restored} "
                      f"({self.failures[-1]['updates_lost']} updates lost)", flush=True)

    def _record(self, failure: dict) -> None:
        failure.update(step=self.done, epoch=round(self.done / self.spe, 3))
        self.failures.append(failure)
        print(f"warning: {failure['kind']} failure: {failure}", flush=True)
        if len(self.failures) > self.cfg.run.max_failures:
            raise RuntimeError(f"async SGD: {len(self.failures)} failures, more than run.max_failures="
                               f"{self.cfg.run.max_failures}; giving up (last: {failure})")

    def _gate(self, verb: str, ranks) -> None:
        import ray

        ranks = set(ranks)
        if self.downpour.gate is not None and ranks:
            ray.get([getattr(self.downpour.gate, verb).remote(r) for r in sorted(ranks)])
        self.gated = self.gated | ranks if verb == "join" else self.gated - ranks

    # -- epoch-equivalents -----------------------------------------------------------------------------
    def _new_window(self) -> None:
        self.window = {"loss_sum": 0.0, "correct": 0, "samples": 0, "steps": {}}
        self.ctx.sink.start_epoch(self.epoch, self.cfg.run.epochs, self.spe)

    def _end_epoch(self):
        """Evaluate a parameter snapshot while the replicas keep running their queued chunks."""
        import ray

        cfg, sink, step, e = self.cfg, self.ctx.sink, self.done, self.epoch
        self._check_shards()
        now = time.perf_counter()
        elapsed, self.window_t = now - self.window_t, now
        evaluation = None
        if (e + 1) % cfg.run.eval_every == 0 or e + 1 == cfg.run.epochs:
            evaluation = evaluate(self.model, self.downpour.params(), self.ctx.data)
            self.schedule.observe(e, evaluation.accuracy)
        stats = ray.get([retried(s.stats).remote() for s in self.downpour.shards])
        recent = np.concatenate([s["recent"] for s in stats])
        if recent.size:
            sink.histogram("ps/staleness", recent, step)
            sink.scalar("ps/staleness_mean", float(recent.mean()), step)
        updates = float(np.mean([s["count"] for s in stats]))
        sink.scalar("ps/updates_per_s", (updates - self.updates0) / max(elapsed, 1e-9), step)
        self.updates0 = updates
        for r in range(cfg.resources.replicas):  # 0 for a replica that was down or not yet started
            sink.scalar(f"throughput/steps_per_s/replica_{r}", self.window["steps"].get(r, 0) / max(elapsed, 1e-9), step)
        sink.end_epoch(epoch_record(e, self.lr, self.window, elapsed, evaluation), step)
        self.epoch += 1
        lr = self.schedule.lr(self.epoch)
        if lr != self.lr:
            self.lr = lr
            self.downpour.set_lr(lr)
        if self.ctx.checkpoints is not None and self.epoch % cfg.run.checkpoint_every == 0:
            self.ctx.checkpoints.save(self.epoch, self._state())
        self._new_window()
        if evaluation is not None and cfg.run.target_accuracy and evaluation.accuracy >= cfg.run.target_accuracy:
            return evaluation, f"test accuracy {evaluation.accuracy:.4f} reached the target {cfg.run.target_accuracy:g}"
        if self.schedule.should_stop:
            return evaluation, f"no better test accuracy for {cfg.optim.early_stop} evaluations"
        return evaluation, None

    def _state(self) -> dict:
        import ray

        return {"epoch": self.epoch, "step": self.done, "history": list(self.ctx.sink.history),
                "shards": ray.get([retried(s.state).remote() for s in self.downpour.shards]),
                "rank_done": list(self.rank_done), "schedule": self.schedule.state_dict(),
                "failures": list(self.failures), "restarts": self.restarts,
                "train_s": self.train_s + time.perf_counter() - self.t0, "samples": self.samples}

    def _finish(self, evaluation) -> dict:
        import ray

        ctx = self.ctx
        if self.ctx.sink.bar is not None:
            self.ctx.sink.bar.close()
            self.ctx.sink.bar = None
        if evaluation is None or self.done % self.spe:
            evaluation = evaluate(self.model, self.downpour.params(), ctx.data)
        stats = ray.get([retried(s.stats).remote() for s in self.downpour.shards])
        count = sum(s["count"] for s in stats)
        updates = float(np.mean([s["count"] for s in stats]))
        lead = ray.get(self.downpour.gate.stats.remote()) if self.downpour.gate is not None else None
        ctx.sink.confusion(ctx.data.y_test, evaluation.preds, ctx.data.num_classes, self.done)
        ctx.save_model({"model": {k: v.clone() for k, v in self.model.state_dict().items()}})
        return {"test_accuracy": evaluation.accuracy, "test_errors": evaluation.errors, "test_loss": evaluation.loss,
                "train_samples": self.samples, "train_s": self.train_s,
                "samples_per_s": self.samples / max(self.train_s, 1e-9), "steps": self.done,
                "staleness_mean": sum(s["sum"] for s in stats) / max(count, 1),
                "staleness_max": max(s["max"] for s in stats), "updates": int(round(updates)),
                "updates_per_s": updates / max(self.train_s, 1e-9), "failures": self.failures,
                "restarts": self.restarts, "lead_max": None if lead is None else lead["lead_max"],
                "ps_shards": self.cfg.async_.ps_shards}


def train(ctx: RunContext, hooks=None) -> dict:
    """``hooks(event, progress)``, when given, sees every completed chunk (tests inject faults)."""
    model = initial_model(ctx.cfg)
    check_config(ctx.cfg, sum(p.numel() for p in model.parameters() if p.requires_grad))
    run = _Run(ctx, model, hooks)
    try:
        return run.run()
    finally:
        run.downpour.shutdown()
