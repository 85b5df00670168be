"""Replica: a plain class owning one model copy, its optimizer, its device and a shard of the
data. ``ray_train.cluster.actor_class`` makes it a Ray actor, so tests can call the class directly
or subclass it to inject faults."""
from __future__ import annotations

import os
import time
from datetime import timedelta
import numpy as np
import torch

from ray_train.cluster import ReplicaContext, free_port, node_address, tune_malloc
from ray_train.config import TrainConfig, slow_replica
from ray_train.data.dataset import Dataset
from ray_train.errors import ModelFactoryError
from ray_train.worker import losses
from ray_train.worker.batches import eval_shard, shard_batches, steps_per_epoch
from ray_train.worker.comm import BUCKET_BYTES, DistAllreduce, GradBuckets, SharedMemoryAllreduce, allreduce_bytes, flatten_grads
from ray_train.worker.device import Inputs, Precision, clock, synchronize, to_host
from ray_train.worker.evaluation import predict
from ray_train.worker.optim import build_optimizer, inverse_lr, max_norm_, set_lr

PG_TIMEOUT = timedelta(seconds=120)


def pick_device(ctx: ReplicaContext) -> torch.device:
    """The GPU Ray assigned (Ray sets CUDA_VISIBLE_DEVICES, so it is cuda:0 here), else CPU."""
    if ctx.num_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def slow_factor(cfg: TrainConfig, rank: int) -> float:
    """How many times as long this rank's steps take (run.slow_replica; 1.0: full speed)."""
    if cfg.run.slow_replica is None:
        return 1.0
    slow_rank, factor = slow_replica(cfg.run.slow_replica)
    return factor if slow_rank == rank else 1.0


def straggle(factor: float, t0: float, device: torch.device | None = None) -> float:
    """End a step that began at ``t0`` (``clock``): a slowed replica (``factor`` > 1) sleeps
    until the step has taken ``factor`` times its work. Returns the step's milliseconds, read once
    ``device`` has finished the step."""
    if device is not None:
        synchronize(device)
    elapsed = time.perf_counter() - t0
    if factor > 1.0:
        time.sleep((factor - 1.0) * elapsed)
        elapsed = time.perf_counter() - t0
    return elapsed * 1e3


def build_network(model, ctx: ReplicaContext, cfg: TrainConfig):
    """The replica's own network from the factory (which built on the driver: network.check_model).
    A factory that fails only here is one ModelFactoryError naming the replica and the factory's
    error; the driver reads it back from the actor's death (cluster.factory_failure)."""
    try:
        return model()
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise ModelFactoryError(f"replica {ctx.rank}: the model factory ({cfg.model.name}) failed in the replica, "
                                f"though it built on the driver: {type(exc).__name__}: {text[0] if text else ''}"
                                ) from None


class Replica:
    """``model`` is a zero-argument callable that builds the network (ray_train.api.model_factory):
    a registry network, a user's ``module:function`` or a user's own callable."""

    # Gradients averaged over torch.distributed bucket by bucket while backward runs (GradBuckets);
    # a replica whose process group averages something else (local SGD: parameters) turns it off.
    overlap_grads = True
    bucket_bytes = BUCKET_BYTES

    def __init__(self, ctx: ReplicaContext, cfg: TrainConfig, data: Dataset | None, model) -> None:
        self.ctx, self.cfg, self.data = ctx, cfg, data
        tune_malloc()
        torch.set_num_threads(max(1, int(ctx.num_cpus)))
        self.device = pick_device(ctx)
        torch.manual_seed(ctx.seed)  # identical initial parameters on every replica of a group
        self.model = build_network(model, ctx, cfg).to(self.device)
        self._objective = None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.grad = flatten_grads(self.params)
        self.opt = build_optimizer(self.model.named_parameters(), cfg.optim)
        self.precision = Precision(cfg.run.precision, self.device, self.opt)
        self._inputs = None  # built from self.data on first use (Downpour's data comes with setup)
        # Dropout masks must differ between replicas, initial weights must not.
        torch.manual_seed(ctx.seed * 1000 + ctx.rank + 1)
        self.comm = None
        self.comm_bytes = 0  # moved to or from other processes since the last train_steps result
        self.slow = slow_factor(cfg, ctx.rank)
        self.batches = np.empty((0, cfg.run.batch_size), dtype=np.int64)
        self.cursor = 0
        self.stream = None  # this epoch's TrainStream when the data is streamed (worker/stream.py)

    @property
    def objective(self) -> losses.Objective:
        """The run's loss and score, built once the data is here (Downpour's replicas get it later)."""
        if self._objective is None or self._objective.regression != bool(self.data.regression):
            self._objective = losses.Objective.of(self.cfg.model, self.data)
        return self._objective

    # -- wiring -------------------------------------------------------------------------------
    def info(self) -> dict:
        import ray

        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "address": node_address(), "device": str(self.device)}

    def free_port(self) -> int:
        return free_port()

    def connect(self, address: str, port: int, backend: str, shm_name: str | None, hierarchy=None) -> str:
        """Join the group's process group; with ``shm_name``, average through shared memory; with
        ``hierarchy`` (worker/hier.py), inside each node and then among one leader per node."""
        import torch.distributed as dist

        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=self.ctx.rank,
                                world_size=self.ctx.world_size, timeout=PG_TIMEOUT)
        hooked = self.overlap_grads and not self.cfg.optim.l1
        if hierarchy is not None:
            from ray_train.worker.hier import connect_hierarchical

            self.comm = connect_hierarchical(hierarchy, self.ctx.rank, backend, self.grad.numel(),
                                             *((self.params, self.grad) if hooked else ()),
                                             bucket_bytes=self.bucket_bytes)
        elif shm_name is None and hooked:
            # (L1 is added to the gradients after backward: averaged once backward is over, then.)
            self.comm = GradBuckets(self.params, self.grad, self.ctx.world_size, self.bucket_bytes)
        elif shm_name is None:
            self.comm = DistAllreduce(self.ctx.world_size)
        else:
            # Rank 0 creates the segment before the first barrier, the others attach after it;
            # after the second, every rank holds a mapping and rank 0 removes the name.
            if self.ctx.rank == 0:
                self.comm = SharedMemoryAllreduce(shm_name, 0, self.ctx.world_size, self.grad.numel(), create=True)
            dist.barrier()
            if self.ctx.rank != 0:
                self.comm = SharedMemoryAllreduce(shm_name, self.ctx.rank, self.ctx.world_size,
                                                  self.grad.numel(), create=False)
            dist.barrier()
            if self.ctx.rank == 0:
                self.comm.unlink()
        for p in self.model.parameters():
            dist.broadcast(p.data, src=0)
        return type(self.comm).__name__

    def close(self) -> None:
        import torch.distributed as dist

        if self.comm is not None:
            self.comm.close()
            self.comm = None
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- training ----------------------------------------------------------------------------
    def set_epoch(self, epoch: int, lr: float, start: int = 0, shard=None) -> int:
        """Prepare this epoch's batches (this rank's shard) and learning rate, positioned ``start``
        steps in (a run resumed mid-epoch); returns the epoch's steps. ``shard``: this epoch's
        streamed shard (a Ray Data iterator) when the data is streamed."""
        set_lr(self.opt, lr)
        self.model.train()
        run = self.cfg.run
        if self.stream is not None:  # the last epoch's reading ends before the next epoch's starts
            self.stream.close()
        if shard is None:
            self.stream = None
            self.batches = shard_batches(len(self.data.y_train), self.ctx.world_size, self.ctx.rank,
                                         run.batch_size, run.seed, epoch)
            steps = len(self.batches)
        else:
            from ray_train.worker.stream import TrainStream

            steps = steps_per_epoch(len(self.data.y_train), self.ctx.world_size, run.batch_size)
            self.stream = TrainStream(self.data, shard, run.batch_size, run.seed, epoch, self.ctx.rank, self.device)
            self.stream.skip(start)
        self.steps = steps
        self.iteration0 = epoch * steps  # steps before this epoch (the inverse schedule's t)
        self.cursor = start
        return steps

    def _next_batches(self, n: int):
        """The next ``n`` steps' batches: index arrays, or (x, y) tensors from the stream."""
        if self.stream is None:
            yield from self.batches[self.cursor : self.cursor + n]
            return
        for _ in range(max(0, min(n, self.steps - self.cursor))):
            yield self.stream.next()

    def train_steps(self, n: int) -> dict:
        """Run the next ``n`` steps of the epoch; returns sums and per-step times."""
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)  # or summed absolute errors
        step_ms = np.empty(n, dtype=np.float32)
        inverse = self.cfg.optim.schedule == "inverse"
        done = 0
        t0 = clock(self.device)
        for idx in self._next_batches(n):  # a streamed batch's wait counts in its step's time
            if inverse:
                set_lr(self.opt, inverse_lr(self.cfg.optim, self.iteration0 + self.cursor + done + 1))
            loss, hits = self.step(idx)
            loss_sum += loss
            correct += hits
            step_ms[done] = straggle(self.slow, t0, self.device)
            done += 1
            t0 = clock(self.device)
        self.cursor += done
        samples = done * self.cfg.run.batch_size
        moved, self.comm_bytes = self.comm_bytes, 0
        out = {"loss_sum": float(loss_sum) * self.cfg.run.batch_size, "correct": float(correct),
               "samples": samples, "step_ms": step_ms[:done], "rank": self.ctx.rank, "comm_bytes": moved}
        if self.stream is not None:
            out["wait_ms"] = self.stream.take_wait_ms()
        return out

    def train_blocks(self, n: int, block: int) -> list[dict]:
        """The next ``n`` steps as consecutive ``train_steps(block)`` calls, in one call from the
        driver (ReplicaGroup.train_epoch): one result per block, as if each had been its own call."""
        out = []
        while n > 0:
            out.append(self.train_steps(min(block, n)))
            done = len(out[-1]["step_ms"])
            if done < min(block, n):  # the epoch ended early
                break
            n -= done
        return out

    def step(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """One synchronous step on training examples ``idx``: loss and correct count (regression:
        summed absolute error)."""
        loss, hits = self.gradients(*self.batch(idx))
        if self.comm is not None:
            self.comm.mean_(self.grad)
            self.comm_bytes += allreduce_bytes(self.grad, self.ctx.world_size)
        self.precision.step()
        if self.cfg.optim.max_norm is not None:
            max_norm_(self.params, self.cfg.optim.max_norm)
        return loss, hits

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """Training examples ``idx`` as (images, labels) on this replica's device; a streamed
        batch arrives as that pair already."""
        if isinstance(idx, tuple):
            return idx
        if self._inputs is None or self._inputs.data is not self.data:
            self._inputs = Inputs(self.data, self.device, self.cfg.resources.data_on_device,
                                  self.ctx.num_gpus)
        return self._inputs(idx)

    def gradients(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This batch's gradient into ``self.grad``; returns the loss and the correct count."""
        with self.precision.autocast():
            out = self.model(x).float()
            loss = self.objective.loss(out, y)
        self.grad.zero_()  # not opt.zero_grad(): the grads must stay views into self.grad
        self.precision.backward(loss)
        if self.cfg.optim.l1:  # L1 (Nielsen ch. 3): l1 * sign(w) on weights, not biases (scaled as they are)
            l1 = self.cfg.optim.l1 * self.precision.scale()
            for p in self.params:
                if p.dim() > 1:
                    p.grad.add_(torch.sign(p.detach()), alpha=l1)
        return loss.detach(), self.objective.score(out.detach(), y)

    # -- evaluation and state ----------------------------------------------------------------
    def evaluate(self, split: str = "test", shard=None) -> dict:
        """Summed loss and softmax probabilities on this rank's contiguous slice of ``split``; with
        ``shard`` (streamed data), on that share of it, with its labels."""
        if shard is not None:
            from ray_train.worker.stream import evaluate_shard

            loss_sum, probs, labels = evaluate_shard(self.model, self.data, shard,
                                                     self.objective, self.device)
            return {"start": self.ctx.rank, "loss_sum": loss_sum, "probs": probs, "labels": labels}
        x, y = getattr(self.data, f"x_{split}"), getattr(self.data, f"y_{split}")
        idx = eval_shard(len(y), self.ctx.world_size, self.ctx.rank)
        lo, hi = (int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, 0)
        loss_sum, probs = predict(self.model, x[lo:hi], y[lo:hi], self.objective, self.device)
        return {"start": lo, "loss_sum": loss_sum, "probs": probs}

    def flat_params(self) -> np.ndarray:
        return to_host(torch.cat([p.detach().reshape(-1) for p in self.params])).numpy()

    def weights(self) -> dict[str, np.ndarray]:
        return {n: to_host(p).numpy() for n, p in self.model.named_parameters()}

    def state(self) -> dict:
        """The model and optimizer state (fp16: the loss scale too), on the host."""
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}
        if self.precision.scaler is not None:
            state["scaler"] = self.precision.state_dict()
        return to_host(state)

    def rng_state(self) -> dict[str, torch.Tensor]:
        """This process's torch RNG states (dropout masks): a checkpoint needs one per replica."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def load_state(self, state: dict, rng: dict[str, torch.Tensor] | None = None) -> None:
        """Restore what ``state`` and ``rng_state`` returned (a checkpoint). Parameters are copied
        in place, so the gradients stay views into the flat buffer that is averaged."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state.get("scaler"))
        if rng is not None:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
