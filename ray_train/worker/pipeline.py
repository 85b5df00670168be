"""A stage actor: one stage of a pipelined replica (docs/pipeline.md). A replica of S stages is S
of these in a line, each holding its consecutive layers (ray_train/worker/stages.py cuts the
network), its optimizer and its RNG. Each step it runs the replica's batch as M micro-batches in
its schedule's order (GPipe or 1F1B), receiving activations from the stage before and gradients
from the stage after by torch.distributed point-to-point (gloo), never through the driver. With R
replicas the R copies of a stage average their gradients in a process group of their own, and
every copy applies the same update.

Plain class, as Replica: ``ray_train.cluster.actor_class`` makes it an actor (worker/pipeline_group.py).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ray_train.cluster import free_port, node_address, tune_malloc
from ray_train.config import TrainConfig
from ray_train.data.dataset import Dataset
from ray_train.worker import losses
from ray_train.worker.batches import eval_shard, shard_batches, to_tensor
from ray_train.worker.comm import DistAllreduce, allreduce_bytes
from ray_train.worker.optim import build_optimizer, inverse_lr, max_norm_, set_lr
from ray_train.worker.replica import PG_TIMEOUT
from ray_train.worker.stages import cut, schedule

EVAL_ROWS = 1000  # rows per evaluation micro-batch


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Inbox:
    """The ``count`` tensors of ``shape`` one neighbour sends a stage in a step, in order, each
    receive posted as the one before is taken; ``waited``: seconds spent waiting for them."""

    def __init__(self, src: int, shape: tuple, count: int) -> None:
        self.src, self.shape, self.left, self.waited = src, shape, count, 0.0
        self.next = self._post()

    def _post(self):
        if not self.left:
            return None
        self.left -= 1
        buf = torch.empty(self.shape)
        return dist.irecv(buf, self.src), buf

    def take(self) -> torch.Tensor:
        work, buf = self.next
        t0 = time.perf_counter()
        work.wait()
        self.waited += time.perf_counter() - t0
        self.next = self._post()
        return buf


@dataclass(frozen=True)
class StageContext:
    """Where a stage actor sits: replica ``replica`` of ``replicas``, stage ``stage`` of ``stages``."""

    replica: int
    replicas: int
    stage: int
    stages: int
    num_cpus: float
    seed: int

    @property
    def rank(self) -> int:
        """Its rank in the group's process group: the replicas' stages one after the other."""
        return self.replica * self.stages + self.stage


class Stage:
    def __init__(self, ctx: StageContext, cfg: TrainConfig, data: Dataset, model) -> None:
        self.ctx, self.cfg, self.data = ctx, cfg, data
        tune_malloc()
        torch.set_num_threads(max(1, int(ctx.num_cpus)))
        torch.manual_seed(ctx.seed)  # the whole network as one process builds it; this stage keeps its part
        net = model()
        example = to_tensor(data.x_train[:2])
        named = cut(net, ctx.stages, cfg.pipeline.split_names, example)
        self.layers = named[ctx.stage]
        self.part = torch.nn.Sequential(*[m for _, m in self.layers])
        # Boundary shapes (per example) for the tensors received: this stage's input, its output.
        with torch.no_grad():
            x = example
            shapes = [tuple(x.shape[1:])]
            for layer in named:
                for _, m in layer:
                    x = m.eval()(x)
                shapes.append(tuple(x.shape[1:]))
        self.part.train()
        self.in_shape, self.out_shape = shapes[ctx.stage], shapes[ctx.stage + 1]
        del net, named, x
        self.named = [(f"{name}.{k}", p) for name, m in self.layers for k, p in m.named_parameters()]
        self.params = [p for _, p in self.named if p.requires_grad]
        self.grad = torch.zeros(sum(p.numel() for p in self.params))
        offset = 0
        for p in self.params:
            p.grad = self.grad[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.opt = build_optimizer(self.named, cfg.optim) if self.params else None
        torch.manual_seed(ctx.seed * 1000 + ctx.rank + 1)  # dropout masks differ between actors
        self.first, self.last = ctx.stage == 0, ctx.stage == ctx.stages - 1
        self.plan = schedule(cfg.pipeline.schedule, ctx.stages, cfg.pipeline.micro_batches)[ctx.stage]
        self.comm = None
        self.act_peak = 0  # the most bytes of micro-batch inputs and outputs held for backward at once
        self.batches = np.empty((0, cfg.run.batch_size), dtype=np.int64)
        self.cursor, self.iteration0 = 0, 0

    # -- wiring -------------------------------------------------------------------------------
    def info(self) -> dict:
        import ray

        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "address": node_address(), "device": "cpu", "params": sum(p.numel() for p in self.params)}

    def free_port(self) -> int:
        return free_port()

    def connect(self, address: str, port: int, own_pipeline: bool = False) -> str:
        """Join the group's process group (every stage of every replica), then one group per stage
        for its copies' gradient averaging (every rank creates every group, in the same order).
        ``own_pipeline``: a process group of this replica's stages only (they average nothing)."""
        c = self.ctx
        self.me = c.stage if own_pipeline else c.rank  # its rank in the process group; neighbours are me -+ 1
        dist.init_process_group("gloo", init_method=f"tcp://{address}:{port}", rank=self.me,
                                world_size=c.stages if own_pipeline else c.replicas * c.stages, timeout=PG_TIMEOUT)
        if own_pipeline:
            return "none"
        groups = [dist.new_group([r * c.stages + s for r in range(c.replicas)]) for s in range(c.stages)]
        if c.replicas > 1:
            self.comm = DistAllreduce(c.replicas, group=groups[c.stage])
            for p in self.part.state_dict().values():
                dist.broadcast(p, src=c.stage, group=groups[c.stage])
        return "DistAllreduce per stage" if self.comm else "none"

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- training ----------------------------------------------------------------------------
    def set_epoch(self, epoch: int, lr: float, start: int = 0) -> int:
        if self.opt is not None:
            set_lr(self.opt, lr)
        self.part.train()
        self.batches = shard_batches(len(self.data.y_train), self.ctx.replicas, self.ctx.replica,
                                     self.cfg.run.batch_size, self.cfg.run.seed, epoch)
        self.iteration0 = epoch * len(self.batches)
        self.cursor = start
        return len(self.batches)

    def train_steps(self, n: int) -> dict:
        """The next ``n`` steps of the epoch. The last stage reports the loss and the hits; every
        stage its step times, the time it waited for a neighbour, and the bytes it sent."""
        todo = self.batches[self.cursor : self.cursor + n]
        step_ms = np.empty(len(todo), dtype=np.float32)
        wait_ms = np.empty(len(todo), dtype=np.float32)
        loss_sum, correct, sent, reduced = 0.0, 0, 0, 0
        inverse = self.cfg.optim.schedule == "inverse"
        for i, idx in enumerate(todo):
            t0 = time.perf_counter()
            if inverse and self.opt is not None:
                set_lr(self.opt, inverse_lr(self.cfg.optim, self.iteration0 + self.cursor + i + 1))
            loss, hits, waited, nbytes = self.step(idx)
            if self.comm is not None:
                self.comm.mean_(self.grad)
                reduced += allreduce_bytes(self.grad, self.ctx.replicas)
            if self.opt is not None:
                self.opt.step()
                if self.cfg.optim.max_norm is not None:
                    max_norm_(self.params, self.cfg.optim.max_norm)
            loss_sum, correct, sent = loss_sum + loss, correct + hits, sent + nbytes
            step_ms[i] = (time.perf_counter() - t0) * 1e3
            wait_ms[i] = waited * 1e3
        self.cursor += len(todo)
        samples = len(todo) * self.cfg.run.batch_size if self.last else 0
        return {"loss_sum": loss_sum, "correct": correct, "samples": samples, "step_ms": step_ms,
                "rank": self.ctx.rank, "stage": self.ctx.stage, "wait_ms": wait_ms, "act_bytes": sent,
                "act_peak_bytes": self.act_peak,
                "comm_bytes": sent + reduced}

    def step(self, idx: np.ndarray) -> tuple[float, int, float, int]:
        """Forward and backward of one batch's micro-batches in this stage's schedule order; the
        gradient of the batch's mean loss accumulates in ``self.grad``. Returns (summed loss,
        hits, seconds waiting for a neighbour, bytes sent).

        Receives are posted one micro-batch ahead (``irecv``): gloo moves a message only once its
        receive is posted, so a receive posted when its input is needed would put a round trip and
        the copy on the critical path; posted ahead, they overlap this stage's compute. One ahead
        per direction keeps 1F1B's activation memory bounded by S."""
        micro = self.cfg.pipeline.micro_batches
        rows = len(idx) // micro
        xs = to_tensor(self.data.x_train[idx]).chunk(micro) if self.first else None
        ys = torch.from_numpy(self.data.y_train[idx]).chunk(micro) if self.last else None
        self.grad.zero_()
        acts = None if self.first else _Inbox(self.me - 1, (rows, *self.in_shape), micro)
        grads = None if self.last else _Inbox(self.me + 1, (rows, *self.out_shape), micro)
        inputs, outputs, sends = {}, {}, []
        loss_sum, hits, sent, held = 0.0, 0, 0, 0
        for kind, m in self.plan:
            if kind == "F":
                inp = xs[m] if self.first else acts.take().requires_grad_()
                out = self.part(inp)
                if not self.last:
                    act = out.detach()
                    sends.append((dist.isend(act, self.me + 1), act))
                    sent += _nbytes(act)
                inputs[m], outputs[m] = inp, out
                held += _nbytes(inp) + _nbytes(out)
                self.act_peak = max(self.act_peak, held)
                continue
            inp, out = inputs.pop(m), outputs.pop(m)
            held -= _nbytes(inp) + _nbytes(out)
            if self.last:
                loss = losses.loss(self.cfg.model.loss, out, ys[m])
                loss_sum += float(loss.detach()) * rows
                hits += int((out.detach().argmax(1) == ys[m]).sum())
                (loss / micro).backward()
            else:
                grad = grads.take()
                if out.requires_grad:  # a first stage without parameters has nothing to differentiate
                    out.backward(grad)
            if not self.first:
                sends.append((dist.isend(inp.grad, self.me - 1), inp.grad))
                sent += _nbytes(inp.grad)
        for work, _ in sends:
            work.wait()
        if self.cfg.optim.l1:
            for p in self.params:
                if p.dim() > 1:
                    p.grad.add_(torch.sign(p.detach()), alpha=self.cfg.optim.l1)
        waited = (acts.waited if acts else 0.0) + (grads.waited if grads else 0.0)
        return loss_sum, hits, waited, sent

    def memory(self) -> dict:
        """Bytes this stage holds: its parameters, its optimizer state, the peak of activations
        held for backward, and its process's resident set (VmHWM: the peak, VmRSS: now)."""
        opt = 0
        if self.opt is not None:
            opt = sum(_nbytes(v) for st in self.opt.state.values() for v in st.values() if torch.is_tensor(v))
        status = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    status[key] = int(value.split()[0]) * 1024
        return {"params": sum(_nbytes(p) for p in self.params), "optimizer": opt, "activations_peak": self.act_peak,
                "rss_peak": status.get("VmHWM"), "rss": status.get("VmRSS")}

    # -- evaluation and state ----------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str = "test") -> dict | None:
        """The replica's slice of ``split`` through the pipeline in chunks of EVAL_ROWS; the last
        stage returns its summed loss and probabilities (worker/evaluation.py's form), the others None."""
        c = self.ctx
        x, y = getattr(self.data, f"x_{split}"), getattr(self.data, f"y_{split}")
        idx = eval_shard(len(y), c.replicas, c.replica)
        lo, hi = (int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, 0)
        self.part.eval()
        loss_sum, probs = 0.0, []
        for start in range(lo, hi, EVAL_ROWS):
            end = min(hi, start + EVAL_ROWS)
            if self.first:
                inp = to_tensor(x[start:end])
            else:
                inp = torch.empty((end - start, *self.in_shape))
                dist.recv(inp, self.me - 1)
            out = self.part(inp)
            if not self.last:
                dist.send(out.contiguous(), self.me + 1)
                continue
            yb = torch.tensor(y[start:end], dtype=torch.int64)
            loss_sum += float(losses.summed(self.cfg.model.loss, out, yb))
            probs.append(torch.softmax(out.float(), dim=1).numpy())
        self.part.train()
        if not self.last:
            return None
        probs = np.concatenate(probs) if probs else np.empty((0, self.data.num_classes), dtype=np.float32)
        return {"start": lo, "loss_sum": loss_sum, "probs": probs}

    def weights(self) -> dict[str, np.ndarray]:
        return {n: p.detach().numpy().copy() for n, p in self.named}

    def flat_params(self) -> np.ndarray:
        return torch.cat([p.detach().reshape(-1) for p in self.params]).numpy() if self.params else np.empty(0)

    def state(self) -> dict:
        """This stage's part of the whole network's state_dict (its keys are the network's) and
        its optimizer state."""
        model = {f"{name}.{k}": v.clone() for name, m in self.layers for k, v in m.state_dict().items()}
        return {"model": model, "optimizer": self.opt.state_dict() if self.opt else None}

    def rng_state(self) -> dict[str, torch.Tensor]:
        return {"cpu": torch.get_rng_state()}

    def load_state(self, state: dict, rng: dict | None = None) -> None:
        """This stage's entries of a whole network's state_dict, its optimizer state, its RNG."""
        for name, m in self.layers:
            prefix = f"{name}."
            m.load_state_dict({k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)})
        if self.opt is not None and state.get("optimizer") is not None:
            self.opt.load_state_dict(state["optimizer"])
        if rng is not None:
            torch.set_rng_state(rng["cpu"])
