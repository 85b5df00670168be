"""One metrics path: the run loop and the engines hand plain floats and arrays to a MetricsSink,
which owns the only TensorBoard SummaryWriter, the progress bar and the lines on stdout.

The sink lives in the driver: every metric already reaches the driver with the chunk results the
loop waits on, so a separate actor would only add a process competing for the CPUs. An ensemble's
members write through child sinks (``sink.child("member_3", "member 3")``): the same writer, their
own tag prefix and line label.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Any, Protocol

import numpy as np

FLUSH_SECS = 5  # a running TensorBoard sees new points within this many seconds


class Logger(Protocol):
    def scalar(self, tag: str, value: float, step: int) -> None: ...
    def histogram(self, tag: str, values: np.ndarray, step: int) -> None: ...
    def image(self, tag: str, image_hwc: np.ndarray, step: int) -> None: ...
    def hparams(self, hparams: dict, metrics: dict) -> None: ...
    def flush(self) -> None: ...
    def reopen(self, purge_step: int) -> None: ...
    def close(self) -> None: ...


class NullLogger:
    """The no-op default (tests, benchmarks)."""

    def scalar(self, tag, value, step): pass
    def histogram(self, tag, values, step): pass
    def image(self, tag, image_hwc, step): pass
    def hparams(self, hparams, metrics): pass
    def flush(self): pass
    def reopen(self, purge_step): pass
    def close(self): pass


class TensorBoardLogger:
    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        self.log_dir = log_dir
        self.reopen(purge_step)

    def reopen(self, purge_step: int | None) -> None:
        """A new writer whose purge_step tells TensorBoard to drop the points at steps >= it that
        earlier writers left: a run that goes back to a checkpoint leaves no duplicates."""
        from torch.utils.tensorboard import SummaryWriter

        if getattr(self, "writer", None) is not None:
            self.writer.close()
        self.writer = SummaryWriter(log_dir=self.log_dir, flush_secs=FLUSH_SECS, purge_step=purge_step)

    def scalar(self, tag, value, step):
        self.writer.add_scalar(tag, float(value), step)

    def histogram(self, tag, values, step):
        self.writer.add_histogram(tag, np.asarray(values).reshape(-1), step)

    def image(self, tag, image_hwc, step):
        self.writer.add_image(tag, image_hwc, step, dataformats="HWC")

    def hparams(self, hparams, metrics):
        # SummaryWriter.add_hparams would open a second writer in a sub-folder; write the three
        # hparams summaries through this writer instead, so the run stays one event stream.
        from torch.utils.tensorboard.summary import hparams as hp_summary

        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        for summary in hp_summary(clean, metrics):
            self.writer.file_writer.add_summary(summary)
        for k, v in metrics.items():
            self.writer.add_scalar(k, v)

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (y_true, y_pred), 1)
    return m


def render(draw, width: float, height: float, dpi: int = 80) -> np.ndarray:
    """An RGB uint8 HWC image of what ``draw(figure)`` puts on a fresh matplotlib Figure. No pyplot:
    ensemble members render from several threads at once."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    draw(fig)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def confusion_image(matrix: np.ndarray) -> np.ndarray:
    """The confusion matrix rendered as an RGB uint8 HWC image."""

    def draw(fig):
        ax = fig.add_subplot()
        ax.imshow(matrix, cmap="Blues")
        for (i, j), v in np.ndenumerate(matrix):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="white" if v > matrix.max() / 2 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_xticks(range(len(matrix)))
        ax.set_yticks(range(len(matrix)))

    return render(draw, 5, 5)


def is_image(x: np.ndarray) -> bool:
    """Images [N, C, H, W] with one or three channels: data error_grid can draw."""
    return x.ndim == 4 and x.shape[1] in (1, 3)


def error_grid(images: np.ndarray, labels: np.ndarray, voted: np.ndarray, votes: np.ndarray) -> np.ndarray:
    """The misclassified images as an RGB HWC image: each titled true -> voted, members' votes below."""
    cols = 8
    rows = max(1, math.ceil(len(images) / cols))

    def draw(fig):
        for i in range(rows * cols):
            ax = fig.add_subplot(rows, cols, i + 1)
            ax.axis("off")
            if i < len(images):
                img = np.asarray(images[i], dtype=np.float32)
                img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1) / max(float(img.max()), 1e-9)
                ax.imshow(img, cmap="gray_r")
                ax.set_title(f"{labels[i]}->{voted[i]}\n{''.join(map(str, votes[:, i]))}", fontsize=7)

    return render(draw, cols * 1.3, rows * 1.55)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class MetricsSink:
    """Tags (README lists them): train/loss, train/accuracy, lr, val/loss, val/accuracy, test/loss, test/accuracy,
    throughput/samples_per_s, time/step_ms/replica_<k>, comm/bytes, weights/<name>, test/confusion_matrix;
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
                    comm_bytes: int | None = None) -> None:
        self.scalar("train/loss", loss, step)
        self.scalar("train/accuracy", accuracy, step)
        if comm_bytes is not None:
            self.scalar("comm/bytes", comm_bytes, step)
        for rank, ms in step_ms.items():
            self.scalar(f"time/step_ms/replica_{rank}", ms, step)
        if self._bar is not None:
            self._bar.update(max(0, min(steps, self._bar.total - self._bar.n)))  # async chunks may run past the epoch
            self._bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.3f}")

    def end_epoch(self, record: dict[str, Any], step: int) -> None:
        """The per-epoch scalars and one line on stdout."""
        self._close_bar()
        for key, tag in (("lr", "lr"), ("samples_per_s", "throughput/samples_per_s"),
                         ("test_loss", "test/loss"), ("test_accuracy", "test/accuracy"),
                         ("val_loss", "val/loss"), ("val_accuracy", "val/accuracy")):
            if record.get(key) is not None:
                self.scalar(tag, record[key], step)
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


def logged_steps(log_dir: str) -> dict[str, int]:
    """The last step of every scalar tag already in ``log_dir``'s event files."""
    if not os.path.isdir(log_dir):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    events = {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}
    return {tag: max(e.step for e in points) for tag, points in events.items() if points}
