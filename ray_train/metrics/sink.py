"""One metrics path: the run loop and the engines hand plain floats and arrays to a MetricsSink,
which owns the only TensorBoard SummaryWriter, the progress bar and the lines on stdout.

The sink lives in the driver: every metric already reaches the driver with the chunk results the
loop waits on, so a separate actor would only add a process competing for the CPUs. An ensemble's
members write through child sinks (``sink.child("member_3", "member 3")``): the same writer, their
own tag prefix and line label.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ray_train.metrics.images import confusion_image, confusion_matrix
from ray_train.metrics.tensorboard import Logger, NullLogger


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class MetricsSink:
    """Tags (docs/tensorboard.md lists them): train/loss, train/accuracy, lr, val/loss, val/accuracy, test/loss, test/accuracy,
    (regression: train/mae, val/mae, test/mae instead of the accuracies), throughput/samples_per_s, time/step_ms/replica_<k>,
    data/wait_ms/replica_<k>, comm/bytes, weights/<name>, test/confusion_matrix;
    engines add their own (ps/*, ensemble/*) through ``scalar``, ``histogram`` and ``image``.

    ``progress`` None shows a bar only when ``out`` is a terminal: under ``ray job submit``, in CI
    or in a file a bar would print a line per refresh."""

    def __init__(self, logger: Logger | None = None, out=None, progress: bool | None = None,
                 skip_logged: dict[str, int] | None = None) -> None:
        self.logger = logger or NullLogger()
        self.out = out or sys.stdout
        self.progress = _is_terminal(self.out) if progress is None else progress
        self.prefix, self.label = "", ""
        self._bar = None
        # full tag -> last step already in the event files: scalar() leaves those points alone
        self._skip: dict[str, int] = dict(skip_logged or {})
        self._written: dict[str, int] = {}  # full tag -> last step this process wrote

    def child(self, name: str, label: str) -> "MetricsSink":
        """A sink for one part of the run (an ensemble member): tags under ``name/``, lines
        starting with ``label``, no progress bar (members train at once)."""
        c = MetricsSink(self.logger, self.out, progress=False)
        c.prefix, c.label = f"{self.prefix}{name}/", label
        c._skip, c._written = self._skip, self._written
        return c

    def rewind(self, step: int) -> None:
        """Back to a checkpoint at ``step``: the points written after it are dropped (the top-level
        sink opens a writer that purges them) or, for a child that shares the writer, not written
        again (the replay repeats them exactly)."""
        self._close_bar()
        if not self.prefix:
            self.logger.reopen(purge_step=step + 1)
            self._written = {t: s for t, s in self._written.items() if s <= step}
            return
        for tag, last in self._written.items():
            if tag.startswith(self.prefix) and last > step:
                self._skip[tag] = max(self._skip.get(tag, -1), last)

    def say(self, message: str) -> None:
        """A line on stdout, labelled for a child."""
        print(f"{self.label}: {message}" if self.label else message, file=self.out, flush=True)

    # -- live progress -----------------------------------------------------------------------
    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        self._close_bar()
        if self.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=steps, initial=min(done, steps), desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                             leave=False, file=sys.stderr, dynamic_ncols=True)

    def train_chunk(self, step: int, steps: int, loss: float, accuracy: float, step_ms: dict[int, float],
                    comm_bytes: int | None = None, wait_ms: dict[int, float] | None = None,
                    metric: str = "accuracy") -> None:
        """``accuracy`` is the mean absolute error when ``metric`` is "mae" (regression)."""
        self.scalar("train/loss", loss, step)
        self.scalar(f"train/{metric}", accuracy, step)
        if comm_bytes is not None:
            self.scalar("comm/bytes", comm_bytes, step)
        for rank, ms in step_ms.items():
            self.scalar(f"time/step_ms/replica_{rank}", ms, step)
        for rank, ms in (wait_ms or {}).items():  # streamed data: how long steps waited for batches
            self.scalar(f"data/wait_ms/replica_{rank}", ms, step)
        if self._bar is not None:
            self._bar.update(max(0, min(steps, self._bar.total - self._bar.n)))  # async chunks may run past the epoch
            self._bar.set_postfix(loss=f"{loss:.3f}", **{"acc" if metric == "accuracy" else metric: f"{accuracy:.3f}"})

    def end_epoch(self, record: dict[str, Any], step: int) -> None:
        """The per-epoch scalars and one line on stdout."""
        self._close_bar()
        for key, tag in (("lr", "lr"), ("samples_per_s", "throughput/samples_per_s"),
                         ("test_loss", "test/loss"), ("test_accuracy", "test/accuracy"),
                         ("val_loss", "val/loss"), ("val_accuracy", "val/accuracy"),
                         ("test_mae", "test/mae"), ("val_mae", "val/mae")):
            if record.get(key) is not None:
                self.scalar(tag, record[key], step)
        if "train_mae" in record:  # regression
            print(f"{self.label} {regression_line(record)}" if self.label else regression_line(record),
                  file=self.out, flush=True)
            return
        test = ""
        if record.get("val_accuracy") is not None:
            test = f"  val acc {record['val_accuracy']:.4f}"
        if record.get("test_accuracy") is not None:
            test += f"  test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.4f}"
        line = (f"epoch {record['epoch']:>3}  loss {record['train_loss']:.4f}  train acc "
                f"{record['train_accuracy']:.4f}{test}  {record['samples_per_s']:,.0f} samples/s")
        print(f"{self.label} {line}" if self.label else line, file=self.out, flush=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -- any other tag -----------------------------------------------------------------------
    def scalar(self, tag: str, value: float, step: int) -> None:
        tag = self.prefix + tag
        if step > self._skip.get(tag, -1):
            self.logger.scalar(tag, value, step)
            self._written[tag] = max(self._written.get(tag, -1), step)

    def histogram(self, tag: str, values, step: int) -> None:
        self.logger.histogram(self.prefix + tag, values, step)

    def image(self, tag: str, image_hwc: np.ndarray, step: int) -> None:
        self.logger.image(self.prefix + tag, image_hwc, step)

    def weights(self, named: dict[str, np.ndarray], step: int) -> None:
        for name, values in named.items():
            self.histogram(f"weights/{name}", values, step)

    def confusion(self, y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, step: int) -> np.ndarray:
        matrix = confusion_matrix(y_true, y_pred, num_classes)
        self.image("test/confusion_matrix", confusion_image(matrix), step)
        return matrix

    def flush(self) -> None:
        self._close_bar()
        self.logger.flush()

    def finish(self, hparams: dict, metrics: dict) -> None:
        self._close_bar()
        self.logger.hparams(hparams, metrics)
        self.logger.flush()
        self.logger.close()


def regression_line(record: dict[str, Any]) -> str:
    """A regression epoch's line: losses and mean absolute errors where classes have accuracies."""
    line = f"epoch {record['epoch']:>3}  loss {record['train_loss']:.4f}  train mae {record['train_mae']:.4f}"
    if record.get("val_loss") is not None:
        line += f"  val loss {record['val_loss']:.4f} mae {record['val_mae']:.4f}"
    if record.get("test_loss") is not None:
        line += f"  test loss {record['test_loss']:.4f} mae {record['test_mae']:.4f}"
    return f"{line}  {record['samples_per_s']:,.0f} samples/s"
