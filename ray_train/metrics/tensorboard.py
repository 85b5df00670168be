"""The logger interface the sink writes through, its no-op default and the TensorBoard writer;
``logged_steps`` reads back what a run's event files already hold (a resumed ensemble)."""
from __future__ import annotations

import os
from typing import Protocol

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


def logged_steps(log_dir: str) -> dict[str, int]:
    """The last step of every scalar tag already in ``log_dir``'s event files (a URI's are read
    from a local copy)."""
    from ray_train.run import storage

    if storage.is_uri(log_dir):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="ray_train-events-") as local:
            storage.download(log_dir, "events.out.tfevents", local)
            return logged_steps(local)
    if not os.path.isdir(log_dir):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    events = {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}
    return {tag: max(e.step for e in points) for tag, points in events.items() if points}
