"""Sandblaster's replica: evaluates work units, a slice of an L-BFGS iteration's batch each, at the
parameters the coordinator (engine.py beside this file) put in the object store. A unit's answer is
the loss and the gradient summed over its examples; the coordinator adds the units up.

Units are evaluated with the model in eval mode (dropout off): L-BFGS's line search compares the
loss at several points along one direction and needs one deterministic function of the
parameters, which random dropout masks would make noisy."""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from ray_train.cluster import ReplicaContext, tune_malloc
from ray_train.config import TrainConfig
from ray_train.worker import losses
from ray_train.worker.comm import flatten_grads, flatten_params
from ray_train.worker.device import Inputs, Precision, clock, to_host
from ray_train.worker.replica import build_network, pick_device, slow_factor, straggle

RESULT_EXTRA_BYTES = 16  # a unit's loss (float64) and correct count besides its gradient
DESCRIPTOR_BYTES = 32  # a unit's (version, batch key, lo, hi)


def batch_indices(n: int, lbfgs_batch: int | None, seed: int, iteration: int) -> np.ndarray | None:
    """The examples of L-BFGS iteration ``iteration``: None for the whole training set (in order),
    else a seeded sample of ``lbfgs_batch`` distinct examples, sorted (the same on every process)."""
    if lbfgs_batch is None or lbfgs_batch >= n:
        return None
    rng = np.random.default_rng([seed, iteration, 0x5B])
    return np.sort(rng.choice(n, size=lbfgs_batch, replace=False))


class SandblasterWorker:
    """A plain class; ``cluster.actor_class`` makes it an actor (tests may subclass it)."""

    def __init__(self, ctx: ReplicaContext, cfg: TrainConfig, model) -> None:
        tune_malloc()
        self.ctx, self.cfg = ctx, cfg
        torch.set_num_threads(max(1, int(ctx.num_cpus)))
        self.device = pick_device(ctx)
        torch.manual_seed(ctx.seed)
        self.model = build_network(model, ctx, cfg).to(self.device).eval()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.flat = flatten_params(self.params)  # loaded in place from the coordinator's vector
        self.grad = flatten_grads(self.params)
        # fp16's loss scale works through an optimizer's parameters; this one never steps
        self.precision = Precision(cfg.run.precision, self.device, torch.optim.SGD(self.params, lr=0.0))
        self.inputs = None
        self.slow = slow_factor(cfg, ctx.rank)
        self.data = None
        self.version = None  # of the parameters loaded
        self.batch_key, self.batch = None, None
        self.units = 0  # evaluated by this process

    def setup(self, data) -> dict:
        """Receive the dataset (a method call, not a constructor argument: the actor restarts)."""
        self.data = data
        self.streamed = getattr(data, "streamed", False)  # units arrive as pieces of Ray Data blocks (units.py)
        self.inputs = None if self.streamed else Inputs(data, self.device, self.cfg.resources.data_on_device,
                                                        self.ctx.num_gpus)
        self.held = {}  # streamed: this batch's units as evaluated, by first row
        self.objective = losses.Objective.of(self.cfg.model, data)
        self.version = None
        return self.info()

    def info(self) -> dict:
        import ray

        return {"pid": os.getpid(), "rank": self.ctx.rank, "device": str(self.device),
                "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None}

    def evaluate(self, version: int, box: list, key: int, lo: int, hi: int, pieces: list | None = None) -> dict:
        """Loss and gradient summed over examples [lo, hi) of iteration ``key``'s batch (key -1: the
        whole training set), at parameters ``version``. ``box`` holds the parameters' object
        reference, unresolved: they are fetched only when ``version`` is not the one loaded.
        ``pieces``: a streamed batch's unit, as the blocks that hold its rows (units.py)."""
        import ray

        t0 = clock(self.device)
        fetched = 0
        if version != self.version:
            params = ray.get(box[0])
            with torch.no_grad():
                self.flat.copy_(torch.from_numpy(np.array(params)))  # a writable copy
            self.version, fetched = version, params.nbytes
        x, y = self._streamed(key, lo, pieces) if pieces is not None else self.inputs(self._examples(key, lo, hi))
        loss, correct = self._gradient(x, y, self.precision)
        if not self.precision.unscale_(self.grad):  # an fp16 overflow: this unit again in fp32
            loss, correct = self._gradient(x, y, None)
        grad = to_host(self.grad).numpy().copy()
        self.units += 1
        ms = straggle(self.slow, t0, self.device)
        return {"loss_sum": float(loss.detach()), "correct": correct, "n": len(y), "grad": grad, "ms": ms,
                "fetched": fetched, "pid": os.getpid()}

    def _gradient(self, x, y, precision: Precision | None) -> tuple[torch.Tensor, int]:
        """The summed loss and gradient (into self.grad) of one unit; ``precision`` None: fp32."""
        self.grad.zero_()
        with precision.autocast() if precision else contextlib.nullcontext():
            out = self.model(x).float()
            loss = self.objective.summed(out, y)
        if precision:
            precision.backward(loss)
        else:
            loss.backward()
        return loss, float(self.objective.score(out.detach(), y))

    def _examples(self, key: int, lo: int, hi: int):
        if key < 0:
            return slice(lo, hi)
        if key != self.batch_key:
            self.batch_key = key
            self.batch = batch_indices(len(self.data.y_train), self.cfg.sandblaster.lbfgs_batch,
                                       self.cfg.run.seed, key)
        return self.batch[lo:hi]

    def _streamed(self, key: int, lo: int, pieces: list) -> tuple[torch.Tensor, torch.Tensor]:
        """A streamed unit's tensors, fetched once per batch: the line search evaluates it again."""
        from ray_train.strategies.sandblaster.units import read_unit

        if key != self.batch_key:
            self.batch_key, self.held = key, {}
        if lo not in self.held:
            x, y = read_unit(self.data, pieces)
            self.held[lo] = (torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device))
        return self.held[lo]
