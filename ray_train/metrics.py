"""One metrics path: strategies hand plain floats and arrays to a MetricsSink, which owns the only
TensorBoard SummaryWriter, the progress bar and the per-epoch lines on stdout.

The sink lives in the driver: every metric already reaches the driver with the chunk results the
strategies wait on, so a separate actor would only add a process competing for the CPUs.
"""
from __future__ import annotations

import io
import json
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
    def close(self) -> None: ...


class NullLogger:
    """The no-op default (tests, benchmarks)."""

    def scalar(self, tag, value, step): pass
    def histogram(self, tag, values, step): pass
    def image(self, tag, image_hwc, step): pass
    def hparams(self, hparams, metrics): pass
    def flush(self): pass
    def close(self): pass


class TensorBoardLogger:
    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir, flush_secs=FLUSH_SECS, purge_step=purge_step)

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


def confusion_image(matrix: np.ndarray) -> np.ndarray:
    """The confusion matrix rendered as an RGB uint8 HWC image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=80)
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > matrix.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_xticks(range(len(matrix)))
    ax.set_yticks(range(len(matrix)))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="raw", dpi=80)
    w, h = fig.canvas.get_width_height()
    plt.close(fig)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8).reshape(h, w, -1)[..., :3].copy()


class MetricsSink:
    """Tags (README lists them): train/loss, train/accuracy, lr, test/loss, test/accuracy,
    throughput/samples_per_s, time/step_ms/replica_<k>, weights/<name>, test/confusion_matrix."""

    def __init__(self, logger: Logger | None = None, out=None, progress: bool = True,
                 skip_logged: dict[str, int] | None = None) -> None:
        self.logger = logger or NullLogger()
        self.out = out or sys.stdout
        self.progress = progress
        self.bar = None
        self.history: list[dict[str, Any]] = []
        # tag -> last step already in the run's event files: scalar() leaves those points alone
        self.skip_logged = dict(skip_logged or {})

    # -- live progress -----------------------------------------------------------------------
    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False,
                            file=sys.stderr, dynamic_ncols=True)

    def train_chunk(self, step: int, steps_done: int, loss: float, accuracy: float,
                    step_ms: dict[int, float]) -> None:
        self.scalar("train/loss", loss, step)
        self.scalar("train/accuracy", accuracy, step)
        for rank, ms in step_ms.items():
            self.scalar(f"time/step_ms/replica_{rank}", ms, step)
        if self.bar is not None:
            self.bar.update(steps_done)
            self.bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.3f}")

    def end_epoch(self, record: dict[str, Any], step: int) -> None:
        """One line on stdout and the per-epoch scalars; ``record`` joins the history."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.history.append(record)
        for key, tag in (("lr", "lr"), ("samples_per_s", "throughput/samples_per_s"),
                         ("test_loss", "test/loss"), ("test_accuracy", "test/accuracy")):
            if record.get(key) is not None:
                self.scalar(tag, record[key], step)
        test = ""
        if record.get("test_accuracy") is not None:
            test = f"  test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.4f}"
        print(f"epoch {record['epoch']:>3}  loss {record['train_loss']:.4f}  train acc "
              f"{record['train_accuracy']:.4f}{test}  {record['samples_per_s']:,.0f} samples/s",
              file=self.out, flush=True)

    # -- any other tag (async: ps/*, ensemble: member_k/*, ensemble/*) -----------------------
    def scalar(self, tag: str, value: float, step: int) -> None:
        if step > self.skip_logged.get(tag, -1):
            self.logger.scalar(tag, value, step)

    def histogram(self, tag: str, values, step: int) -> None:
        self.logger.histogram(tag, values, step)

    def image(self, tag: str, image_hwc: np.ndarray, step: int) -> None:
        self.logger.image(tag, image_hwc, step)

    def weights(self, named: dict[str, np.ndarray], step: int) -> None:
        for name, values in named.items():
            self.logger.histogram(f"weights/{name}", values, step)

    def confusion(self, y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, step: int) -> np.ndarray:
        matrix = confusion_matrix(y_true, y_pred, num_classes)
        self.logger.image("test/confusion_matrix", confusion_image(matrix), step)
        return matrix

    def finish(self, hparams: dict, metrics: dict) -> None:
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


def write_json(path: str, payload: dict) -> None:
    """Atomic: a reader never sees a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=2, default=_jsonable)
        fh.write("\n")
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
