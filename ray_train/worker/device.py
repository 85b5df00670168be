"""Where a replica's tensors live, and what crosses the device boundary. Written once for every
strategy, so that a GPU replica and a CPU replica run the same code:

- ``to_host``: everything an actor returns to the driver or puts in a checkpoint goes through it,
  so a driver without CUDA (a CPU head node, CUDA_VISIBLE_DEVICES="") never unpickles a CUDA tensor.
- ``clock``: a step's time is read after the device has finished the step (CUDA runs kernels
  asynchronously: without a synchronisation the clock measures kernel launches).
- ``Staging``: the host side of a device tensor that is exchanged with other processes (Downpour's
  parameters and pushed gradients): pinned memory on CUDA, the tensor itself on the CPU (no copy).
- ``Inputs``: training batches on the device, either from pinned host memory (``non_blocking``) or
  from a copy of the whole training set kept on the device (``resources.data_on_device``).
- ``Precision``: ``run.precision`` fp32, bf16 or fp16 (autocast; fp16 scales the loss with
  torch.amp.GradScaler). Parameters, gradients, allreduce and parameter shards stay float32.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

# auto keeps the training set on a GPU when, as float32, it takes at most this share of the
# replica's part of the GPU's memory (a whole GPU, or its fraction when replicas share one).
DEVICE_DATA_SHARE = 0.25
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def to_host(obj):
    """``obj`` with every tensor in it (through dicts, lists and tuples) detached and on the CPU;
    numpy arrays and everything else unchanged. CPU tensors are not copied."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return t if t.device.type == "cpu" else t.to("cpu")
    if isinstance(obj, dict):
        return type(obj)((k, to_host(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [to_host(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(to_host(v) for v in obj)
    return obj


def tensor_devices(obj) -> set[str]:
    """The device types of every tensor in ``obj`` (dicts, lists, tuples): what tests check."""
    if isinstance(obj, torch.Tensor):
        return {obj.device.type}
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return set().union(*(tensor_devices(v) for v in obj)) if obj else set()
    return set()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """time.perf_counter() once the device has finished the work queued so far."""
    synchronize(device)
    return time.perf_counter()


class Staging:
    """The host buffer of device tensor ``like``: pinned memory on CUDA; on the CPU the tensor
    itself, so that the CPU path copies nothing. ``writable`` waits for an upload still reading it."""

    def __init__(self, like: torch.Tensor) -> None:
        self.on_host = like.device.type == "cpu"
        self.host = like if self.on_host else torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
        self.event = None

    def writable(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.host.numpy()

    def upload(self, dst: torch.Tensor) -> None:
        """The host buffer into ``dst`` (asynchronous: later kernels on the stream see it)."""
        if self.on_host:
            return
        dst.copy_(self.host, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def download(self, src: torch.Tensor) -> np.ndarray:
        """``src`` into the host buffer, one device-to-host copy; returns it as numpy."""
        if not self.on_host:
            self.writable()
            self.host.copy_(src, non_blocking=True)
            torch.cuda.current_stream(src.device).synchronize()
        return self.host.numpy()


def keep_on_device(mode: str, nbytes: int, device: torch.device, gpus: float) -> bool:
    """Whether a replica keeps the training set (``nbytes`` as float32) on its device: off never,
    on always, auto on a GPU when it takes at most DEVICE_DATA_SHARE of the replica's part of it."""
    if mode == "off":
        return False
    if mode == "on":
        return True
    if device.type != "cuda":
        return False
    total = torch.cuda.get_device_properties(device).total_memory
    return nbytes <= DEVICE_DATA_SHARE * total * min(1.0, gpus or 1.0)


class Inputs:
    """Training batches of ``data`` on ``device``. Resident (the training set copied to the device
    once, as float32): a step indexes it there and copies nothing but the indices. Otherwise a batch
    is gathered on the host, pinned on CUDA and copied with ``non_blocking=True``."""

    def __init__(self, data, device: torch.device, mode: str, gpus: float) -> None:
        from ray_train.worker.batches import to_tensor

        self.data, self.device = data, device
        self.resident = None
        if keep_on_device(mode, 4 * data.x_train.size, device, gpus):
            self.resident = (to_tensor(data.x_train).to(device), torch.from_numpy(np.asarray(data.y_train)).to(device))

    def __call__(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples ``idx`` (an index array or a slice) as (images, labels) on the device."""
        from ray_train.worker.batches import to_tensor

        if self.resident is not None:
            if not isinstance(idx, slice):
                idx = torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(self.device, non_blocking=True)
            return self.resident[0][idx], self.resident[1][idx]
        x, y = to_tensor(self.data.x_train[idx]), torch.from_numpy(np.array(self.data.y_train[idx]))
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class Precision:
    """``run.precision`` for one replica: fp32 (nothing changes), bf16 (autocast) or fp16 (autocast
    and a loss scale, torch.amp.GradScaler). ``opt`` is the optimizer whose parameters' gradients are
    scaled. Masters stay float32: autocast computes in low precision, the parameters and their
    gradients are the network's own float32 tensors."""

    def __init__(self, name: str, device: torch.device, opt: torch.optim.Optimizer) -> None:
        self.name, self.device, self.opt = name, device, opt
        self.dtype = _DTYPES.get(name)
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def scale(self) -> float:
        """What the gradients are multiplied by (1 but in fp16)."""
        return 1.0 if self.scaler is None else float(self.scaler.get_scale())

    def step(self) -> None:
        """The optimizer's step on the (averaged) gradients; fp16 unscales them first and skips the
        step when they hold an inf or a NaN (the same on every rank: they were averaged)."""
        if self.scaler is None:
            self.opt.step()
            return
        self.scaler.step(self.opt)
        self.scaler.update()

    def unscale_(self, flat_grad: torch.Tensor) -> bool:
        """For replicas that apply no update themselves (Downpour, Sandblaster): the gradients
        unscaled in place; False when they are not finite (fp16 overflow: drop them)."""
        if self.scaler is None:
            return True
        self.scaler.unscale_(self.opt)
        finite = bool(torch.isfinite(flat_grad).all())
        self.scaler.update()
        return finite

    def state_dict(self) -> dict:
        return {} if self.scaler is None else to_host(self.scaler.state_dict())

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
