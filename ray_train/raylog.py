"""Ray's own output, kept off the terminal: the driver's "ray" loggers (the token-authentication
notice, "Started a local Ray instance", Tune's messages), the workers' stdout and stderr that Ray
forwards to the driver, and the raylet's messages ("A worker died or was killed ...", its
internals on node events) go to the run folder's ray.log. The terminal gets the project's own lines
only: one per event, in its words (a replica's death is the run loop's "replica 1 (pid ...) died
...; restarting ..."). ``--verbose`` shows Ray's output on the terminal as well, as Ray prints it.

Until a run names its file (``to_file``), the lines wait in a bounded buffer; they are written
there first. What Ray forwards goes through its one dispatcher of worker output and its one
printer of raylet messages (ray._private.worker): both are replaced here, after ray.init, in this
driver process only."""
from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time

BUFFERED_LINES = 2000
GRACE_S = 10.0  # a finished run's log still takes its workers' late lines this long
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RayLog:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buffer: collections.deque[str] = collections.deque(maxlen=BUFFERED_LINES)
        self.path: str | None = None
        self.verbose = False
        self.owned = False  # this process started Ray (ray_train.cluster.init_ray)
        self.between_runs_to_terminal = False  # capture_forwarded(owned=False)
        self.last: tuple[str, float] | None = None  # the run's file that was closed last, and when

    def idle(self) -> bool:
        """No run is writing here: forwarded output goes to the user's terminal (their own
        ray.init; capture_forwarded). A run's own stragglers (its workers' last lines reach the
        driver up to seconds after it ended) still go to its file for GRACE_S."""
        with self.lock:
            if self.path is not None or not self.between_runs_to_terminal:
                return False
            if self.last is not None and time.monotonic() - self.last[1] < GRACE_S:
                return False
            self.last = None
            return True

    def write(self, text: str) -> None:
        if not text.endswith("\n"):
            text += "\n"
        with self.lock:
            path = self.path or (self.last[0] if self.last else None)
            if path is None:
                self.buffer.append(text)
                return
            with open(path, "a", encoding="utf-8", errors="replace") as fh:
                fh.write(text)

    def to_file(self, path: str | None) -> None:
        """Write Ray's output to ``path`` from now on (the lines buffered so far first); None:
        buffer again (the run is over; the next one names its own file)."""
        with self.lock:
            if path is None and self.path is not None:
                self.last = (self.path, time.monotonic())
            elif path is not None:
                self.last = None
            self.path = path
            if path is None or not self.buffer:
                return
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "a", encoding="utf-8", errors="replace") as fh:
                fh.writelines(self.buffer)
            self.buffer.clear()


LOG = RayLog()


class Stream:
    """A file-like object writing to the log: for what a library prints itself (Ray Tune's banners
    and tables), under contextlib.redirect_stdout."""

    def __init__(self) -> None:
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.strip():
                LOG.write(line)
        return len(text)

    def flush(self) -> None:
        if self.pending.strip():
            LOG.write(self.pending)
        self.pending = ""

    def isatty(self) -> bool:
        return False


class _Handler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            LOG.write(self.format(record))
        except Exception:  # a log line must never end a run
            self.handleError(record)


class _Terminal(logging.Handler):
    """--verbose: Ray's warnings on stderr as well (the stderr of the moment, as print would)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def capture_loggers(verbose: bool = False) -> None:
    """The driver's "ray" loggers write to the log; with ``verbose`` also to stderr (warnings and
    above). Called before ray.init, and again by each run (its own --verbose)."""
    LOG.verbose = verbose
    ray_logger = logging.getLogger("ray")
    for h in list(ray_logger.handlers):
        if not isinstance(h, (_Handler, _Terminal, logging.FileHandler)):
            ray_logger.removeHandler(h)  # Ray's own, to the terminal
    if not any(isinstance(h, _Handler) for h in ray_logger.handlers):
        handler = _Handler()
        handler.setFormatter(logging.Formatter(FORMAT))
        ray_logger.addHandler(handler)
    terminal = [h for h in ray_logger.handlers if isinstance(h, _Terminal)]
    if verbose and not terminal:
        loud = _Terminal(logging.WARNING)
        loud.setFormatter(logging.Formatter(FORMAT))
        ray_logger.addHandler(loud)
    for h in terminal if not verbose else []:
        ray_logger.removeHandler(h)
    ray_logger.propagate = False


def _forwarded(data: dict) -> None:
    """One batch of a worker's (or the raylet's) lines, as Ray's dispatcher hands it over; of the
    autoscaler's, its events only (its status table every few seconds is what Ray leaves out too)."""
    from ray._private.worker import filter_autoscaler_events

    lines = data.get("lines") or []
    if data.get("pid") == "autoscaler":
        lines = list(filter_autoscaler_events(lines))
    who = data.get("actor_name") or data.get("task_name") or ""
    tag = f"({who + ' ' if who else ''}pid={data.get('pid')}{', ip=' + data['ip'] if data.get('ip') else ''})"
    for line in lines:
        LOG.write(f"{tag} {line}")


def capture_forwarded(owned: bool = True) -> None:
    """After ray.init: the workers' forwarded stdout/stderr and the raylet's messages go to the
    log (and, with verbose, to the terminal as well, as Ray prints them). ``owned=False``: the
    user's program called ray.init itself (``ray_train.fit`` in their session): between runs
    their workers' output reaches their terminal as Ray prints it; only a run's goes to its log."""
    from ray._private import worker

    LOG.owned = LOG.owned or owned  # a cluster this process started stays ours (compare's later runs)
    LOG.between_runs_to_terminal = not LOG.owned
    if getattr(worker.print_to_stdstream, "ray_train", False):
        return
    print_to_stdstream = worker.print_to_stdstream

    def to_log(data, ignore_prefix: bool = False) -> None:
        idle = LOG.idle()
        if not idle:
            _forwarded(data)
        if LOG.verbose or idle:
            print_to_stdstream(data, ignore_prefix)

    to_log.ray_train = True
    dispatcher = worker.global_worker_stdstream_dispatcher
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", to_log)
    # listen_error_messages (the raylet's "A worker died ..." and the like) calls this by name
    worker.print_to_stdstream = to_log


def note(line: str) -> None:
    """A line of the project's own for the log (which cluster, which run), so the file reads on its own."""
    LOG.write(f"ray_train: {line}")

