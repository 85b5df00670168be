"""SIGINT and SIGTERM during a run: operators stop jobs with SIGTERM, users with Ctrl-C; both ask
the run to stop at its next chunk and checkpoint there."""
from __future__ import annotations

import signal
import threading


class StopSignals:
    """SIGINT and SIGTERM ask the run to stop at the next chunk (the second SIGINT aborts at once).
    Installed around a run in the main thread; a no-op elsewhere (a run inside a user's thread)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
