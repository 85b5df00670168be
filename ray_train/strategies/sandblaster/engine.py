"""Sandblaster L-BFGS (DistBelief, Dean et al. 2012): a coordinator on the driver keeps the L-BFGS
state (curvature history, two-loop recursion, strong-Wolfe line search: torch.optim.LBFGS on one
flat parameter vector, one ``step`` per iteration; its state persists across steps). Every
function evaluation (loss and gradient over the iteration's batch: the whole training set, or a
seeded sample of ``sandblaster.lbfgs_batch``) is cut into ``work_units`` slices handed to whichever
replica is free: a fast replica takes more units, a slow one fewer. Once the queue is empty, the
units still outstanding are also given to idle replicas as backup copies; the first result wins.
The parameters of an evaluation are put in the object store once and fetched by each replica
once. A replica that dies loses nothing: its units are handed out again, to the survivors or to
the replica Ray restarts. ``dispatch: static`` is the baseline: equal shares up front, no backups.

The objective is the model's loss summed over the units / batch size, plus 0.5 weight_decay |w|^2
on weights (not biases), so its gradient is what the SGD strategies' per-step decay adds. Units
are evaluated with dropout off (the line search needs one deterministic function). An epoch is
``sandblaster.iterations`` L-BFGS iterations; each reports one Chunk (one TensorBoard step)."""
from __future__ import annotations

import copy
import math
import time
from collections import deque

import numpy as np
import ray
import torch

from ray_train.cluster import ReplicaContext, actor_class, first_ready, reserve, retried
from ray_train.engine import Chunk, Engine, StateMismatch
from ray_train.errors import ConfigError, ReplicaFailure
from ray_train.run.failure import Decision
from ray_train.strategies.downpour.parameter_server import split_bounds
from ray_train.strategies.driver_model import DriverModel
from ray_train.strategies.sandblaster.worker import (
    DESCRIPTOR_BYTES,
    RESULT_EXTRA_BYTES,
    SandblasterWorker,
    batch_indices,
)

MAX_EVALS = 25  # function evaluations per iteration: torch's LBFGS default max_eval (5/4 max_iter) is 1
SETTLE_S = 10.0  # how long the end of a run waits for units still out (extras)
CACHE = 8  # evaluations remembered: the next iteration starts where the last line search ended


class _NonFinite(Exception):
    """The iteration's first loss is not finite: the loop reports the divergence."""


class SandblasterEngine(DriverModel, Engine):
    worker_cls = SandblasterWorker  # tests swap in subclasses
    hooks = None  # tests: hooks(event, info) on every dispatched unit ("dispatch") and result ("result")

    def epoch_steps(self) -> int:
        return self.ctx.cfg.sandblaster.iterations

    # -- start ---------------------------------------------------------------------------------
    def start(self, state: dict | None) -> None:
        cfg, ctx, sb, res = self.ctx.cfg, self.ctx, self.ctx.cfg.sandblaster, self.ctx.cfg.resources
        n = len(ctx.data.y_train)
        if sb.lbfgs_batch is not None and sb.lbfgs_batch > n:
            raise ConfigError(f"sandblaster.lbfgs_batch: {sb.lbfgs_batch} examples, but the training set has {n}; "
                              f"allowed: 1..{n} (leave it unset for the whole training set)")
        self.batch = sb.lbfgs_batch or n
        if sb.work_units > self.batch:
            raise ConfigError(f"sandblaster.work_units: {sb.work_units} units for a batch of {self.batch} examples; "
                              f"allowed: 1..{self.batch}")
        self.bounds = split_bounds(self.batch, sb.work_units)
        with torch.random.fork_rng():  # the replicas' initial model, seeded the same way
            torch.manual_seed(cfg.run.seed)
            self.model = ctx.model()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]).clone())
        self.decay = torch.cat([torch.full((p.numel(),), float(p.dim() > 1)) for p in params]) * cfg.optim.weight_decay
        self.opt = torch.optim.LBFGS([self.flat], lr=cfg.optim.lr, history_size=sb.history, max_iter=1,
                                     max_eval=MAX_EVALS, line_search_fn="strong_wolfe")
        self.iteration, self.version, self.cache, self.iteration_s = 0, 0, [], []
        self.stream = None
        if getattr(ctx.data, "streamed", False):  # units as pieces of the blocks Ray Data read (units.py)
            from ray_train.strategies.sandblaster.units import StreamBatch

            self.stream = StreamBatch(ctx.data, cfg.run.seed)
        self.counts = {"function_evaluations": 0, "work_units": 0, "backup_units": 0, "backup_wins": 0,
                       "reissued_units": 0, "units_per_replica": {str(r): 0 for r in range(res.replicas)}}
        if state is not None:
            self._load(state)
        self.pg = reserve(res)
        self.workers = [actor_class(self.worker_cls, num_cpus=res.cpus_per_replica, num_gpus=res.gpus_per_replica,
                                    pg=self.pg, bundle=r, max_restarts=cfg.run.max_failures).remote(
            ReplicaContext(r, res.replicas, res.cpus_per_replica, res.gpus_per_replica, cfg.run.seed), cfg, ctx.model)
            for r in range(res.replicas)]
        infos = ray.get([w.setup.remote(ctx.data_ref) for w in self.workers])
        self.pids = {i["rank"]: i["pid"] for i in infos}
        self.node_ids = [i["node_id"] for i in infos]  # by rank, as self.workers; None while one is down
        self.alive, self.rejoining = set(range(res.replicas)), {}  # setup ref of a restarting replica -> rank
        self.inflight: dict = {}  # unit ref -> (rank, version, unit, backup); also losers still running
        whole = "the whole training set" if sb.lbfgs_batch is None else "a seeded sample per iteration"
        ctx.sink.say(f"Sandblaster L-BFGS: {res.replicas} replicas; each evaluation of {self.batch} examples ({whole}) "
                     f"cut into {sb.work_units} work units, dispatch {sb.dispatch}"
                     + (" with backup copies" if sb.dispatch == "queue" else " (equal shares, no backups)")
                     + f"; history {sb.history}, {sb.iterations} iterations per epoch, lr {cfg.optim.lr:g}"
                     + ("; units evaluated with dropout off" if cfg.model.dropout else ""))

    def _load(self, state: dict) -> None:
        params = state["params"]
        if params.shape != self.flat.shape:
            raise StateMismatch(f"the checkpoint has {params.numel()} parameters, {self.ctx.cfg.model.name} has "
                                f"{self.flat.numel()}")
        with torch.no_grad():
            self.flat.copy_(params)
        try:
            self.opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise StateMismatch(f"its optimizer state does not load: {exc}") from None
        group = self.opt.param_groups[0]
        group["history_size"], group["max_eval"] = self.ctx.cfg.sandblaster.history, MAX_EVALS
        self.iteration = int(state["iteration"])
        self.counts = copy.deepcopy(state["counts"])

    # -- the epoch -------------------------------------------------------------------------------
    def train_epoch(self, epoch, lr, start, on_chunk, should_stop) -> bool:
        self.opt.param_groups[0]["lr"] = lr
        for _ in range(start, self.epoch_steps()):
            if should_stop():
                return False
            self.it = {"samples": 0, "first": None, "ms": {}, "bytes": 0, "evals": 0}
            self.key = -1 if batch_indices(len(self.ctx.data.y_train), self.ctx.cfg.sandblaster.lbfgs_batch,
                                           self.ctx.cfg.run.seed, self.iteration) is None else self.iteration
            if self.stream is not None and self.stream.read(self.key, self.ctx.cfg.sandblaster.lbfgs_batch) != self.batch:
                raise RuntimeError(f"Sandblaster: the stream gave {self.stream.rows} rows for a batch of {self.batch}")
            t0 = time.perf_counter()
            try:
                self.opt.step(self._closure)
            except _NonFinite:
                on_chunk(self._chunk())
                return True
            if not self.it["evals"]:
                # LBFGS returned at its first, cached evaluation without a line search: the gradient
                # (or the descent along the new direction) is under its tolerance, and every further
                # step would return there again.
                group = self.opt.param_groups[0]
                self.converged = (f"L-BFGS converged after {self.iteration} iterations: largest gradient element "
                                  f"{float(self.flat.grad.abs().max()):.2g} (tolerance {group['tolerance_grad']:g}) "
                                  f"or descent under {group['tolerance_change']:g}")
                return True
            self.iteration_s.append(time.perf_counter() - t0)
            self.iteration += 1
            on_chunk(self._chunk())
        return True

    def finished(self) -> str | None:
        return getattr(self, "converged", None)

    def _chunk(self) -> Chunk:
        it = self.it
        loss, accuracy = it["first"]
        samples = it["samples"]  # every function evaluation's examples; loss and accuracy: the first's
        scale = max(samples, 1)
        return Chunk(1, samples, loss * scale, accuracy * scale,
                     {r: float(np.mean(ms)) for r, ms in sorted(it["ms"].items())}, it["bytes"])

    def _closure(self) -> float:
        """f(flat) and its gradient (into flat.grad), from the cache or from the replicas."""
        x = self.flat.detach()
        hit = next((e for e in self.cache if e[0] == self.key and torch.equal(e[1], x)), None)
        if hit is None:
            loss_sum, grad_sum, correct = self._evaluate(x.numpy().copy())
            data_loss = loss_sum / self.batch
            objective = data_loss + 0.5 * float((self.decay * x * x).sum())
            grad = torch.from_numpy((grad_sum / self.batch).astype(np.float32)) + self.decay * x
            hit = (self.key, x.clone(), objective, grad, data_loss, correct / self.batch)
            self.cache = [hit, *self.cache][:CACHE]
            self.it["samples"] += self.batch
            self.it["evals"] += 1
        if self.it["first"] is None:
            self.it["first"] = (hit[4], hit[5])
            if not math.isfinite(hit[4]):
                raise _NonFinite()
        self.flat.grad = hit[3].clone()
        return hit[2]

    # -- one function evaluation: the work queue ------------------------------------------------
    def _evaluate(self, params: np.ndarray) -> tuple[float, np.ndarray, int]:
        """The loss and gradient sums over the batch at ``params``, unit by unit on the replicas."""
        self.version += 1
        version, box = self.version, [ray.put(params)]
        queue = self.ctx.cfg.sandblaster.dispatch == "queue"
        results: list = [None] * len(self.bounds)
        todo = deque(range(len(self.bounds)))
        ranks = sorted(self.alive)
        if not queue and ranks:  # static: equal shares up front
            for k in todo:
                self._send(ranks[k * len(ranks) // len(results)], version, box, k, False)
            todo.clear()
        while any(res is None for res in results):
            if queue:
                self._fill(todo, results, version, box)
            if not self.inflight and not self.rejoining:
                raise ReplicaFailure("Sandblaster: every replica is dead and none could be restarted")
            ref = first_ready(self.rejoining, self.inflight)
            if ref in self.rejoining:
                self._rejoin(ref)
                if not queue:  # a static share of a dead replica waits for a live one
                    self._static_reissue(todo, version, box)
                continue
            rank, v, k, backup = self.inflight.pop(ref)
            try:
                res = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                self._lost(rank, exc)
                if v == version and results[k] is None and not self._copies(k, version):
                    todo.appendleft(k)
                    self.counts["reissued_units"] += 1
                if not queue:
                    self._static_reissue(todo, version, box)
                continue
            self.it["bytes"] += res["fetched"] + res["grad"].nbytes + RESULT_EXTRA_BYTES
            self.it["ms"].setdefault(rank, []).append(res["ms"])
            if v == version and results[k] is None:
                results[k] = res
                self.counts["units_per_replica"][str(rank)] = self.counts["units_per_replica"].get(str(rank), 0) + 1
                self.counts["backup_wins"] += int(backup)
            if self.hooks:
                self.hooks("result", {"rank": rank, "unit": k, "version": version, "engine": self})
        self.counts["function_evaluations"] += 1
        self.counts["work_units"] += len(results)
        grad = np.zeros_like(params, dtype=np.float64)
        for res in results:  # in unit order: the sum does not depend on who finished first
            grad += res["grad"]
        return math.fsum(r["loss_sum"] for r in results), grad, sum(r["correct"] for r in results)

    def _fill(self, todo: deque, results: list, version: int, box: list) -> None:
        """Give every idle live replica a unit: the next in the queue, else a backup copy of an
        outstanding one (the unit with the fewest copies, the oldest first)."""
        busy = {v[0] for v in self.inflight.values()}
        for r in sorted(self.alive - busy):
            if todo:
                self._send(r, version, box, todo.popleft(), False)
                continue
            held = {v[2] for v in self.inflight.values() if v[0] == r and v[1] == version}
            open_units = [k for k, res in enumerate(results) if res is None and k not in held]
            if open_units:
                self._send(r, version, box, min(open_units, key=lambda k: self._copies(k, version)), True)
                self.counts["backup_units"] += 1

    def _static_reissue(self, todo: deque, version: int, box: list) -> None:
        ranks = sorted(self.alive)
        while todo and ranks:
            self._send(ranks[len(todo) % len(ranks)], version, box, todo.popleft(), False)

    def _send(self, rank: int, version: int, box: list, k: int, backup: bool) -> None:
        lo, hi = self.bounds[k]
        pieces = [self.stream.pieces(lo, hi)] if self.stream is not None else []
        ref = self.workers[rank].evaluate.remote(version, box, self.key, lo, hi, *pieces)
        self.inflight[ref] = (rank, version, k, backup)
        self.it["bytes"] += DESCRIPTOR_BYTES
        if self.hooks:
            self.hooks("dispatch", {"rank": rank, "unit": k, "version": version, "backup": backup, "engine": self})

    def _copies(self, k: int, version: int) -> int:
        return sum(1 for v in self.inflight.values() if v[1] == version and v[2] == k)

    # -- failures ------------------------------------------------------------------------------
    def _lost(self, rank: int, exc: Exception) -> None:
        """A replica died: record it (giving up past run.max_failures) and wait, in the main
        ray.wait, for the restart Ray attempts; its units go to the others meanwhile."""
        if rank not in self.alive:
            return  # another of its calls already told
        self.alive.discard(rank)
        self.node_ids[rank] = None
        failure = {"kind": "replica", "rank": rank, "pid": self.pids.get(rank), "error": type(exc).__name__,
                   "iteration": self.iteration, "step": self.iteration,
                   "epoch": round(self.iteration / self.epoch_steps(), 3)}
        self.ctx.sink.say(f"warning: replica {rank} (pid {failure['pid']}) died in iteration {self.iteration + 1}; "
                          "its work units go to the others")
        if self.ctx.failures.decide(failure) is Decision.RAISE:
            raise self.ctx.failures.give_up(f"Sandblaster: replica {rank} (pid {failure['pid']}) died in iteration "
                                            f"{self.iteration + 1}", self.ctx.run_dir)
        self.rejoining[retried(self.workers[rank].setup).remote(self.ctx.data_ref)] = rank

    def _rejoin(self, ref) -> None:
        rank = self.rejoining.pop(ref)
        try:
            info = ray.get(ref)
        except ray.exceptions.RayActorError:
            self.ctx.sink.say(f"warning: replica {rank} could not be restarted; continuing without it")
            return
        for failure in reversed(self.ctx.failures.failures):
            if failure.get("rank") == rank and "restarted_pid" not in failure:
                failure["restarted_pid"], failure["rejoined_iteration"] = info["pid"], self.iteration
                break
        self.ctx.sink.say(f"replica {rank} restarted (pid {info['pid']}); it takes work units again")
        self.pids[rank], self.node_ids[rank] = info["pid"], info["node_id"]
        self.alive.add(rank)

    # -- evaluation, state, the end --------------------------------------------------------------
    def driver_params(self) -> torch.Tensor:
        return self.flat.detach().clone()

    def state(self) -> dict:
        return {"params": self.flat.detach().clone(), "optimizer": copy.deepcopy(self.opt.state_dict()),
                "iteration": self.iteration, "counts": copy.deepcopy(self.counts)}

    def extras(self) -> dict:
        self._settle()
        return {"iterations": self.iteration, **copy.deepcopy(self.counts), "lbfgs_batch": self.batch,
                "dispatch": self.ctx.cfg.sandblaster.dispatch,
                # mean seconds of the iterations this process ran (a resumed run: since the resume)
                "iteration_s": float(np.mean(self.iteration_s)) if self.iteration_s else None,
                # as the replicas last told: asking a replica whose restart waits for room would wait with it
                "nodes": {"replicas": list(self.node_ids)}}

    def _settle(self) -> None:
        """Copies still out at the end (backups that lost, or units of a replica whose death Ray
        has not reported yet: that takes about a second): wait for them a little, so that a death
        during the run is in the summary even when the others covered its units in time."""
        if not self.inflight:
            return
        ready, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=SETTLE_S)
        for ref in ready:
            rank = self.inflight.pop(ref)[0]
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                self._lost(rank, exc)

    def shutdown(self, graceful: bool = True) -> None:
        from ray_train.cluster import release

        if getattr(self, "workers", None) is None:
            return
        for w in self.workers:
            ray.kill(w, no_restart=True)
        release(self.pg)
        self.workers = None
