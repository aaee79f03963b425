"""Store failures in the log: once per burst with a count, not a traceback per call.

A full disk fails every commit until space is freed; logging each one with its
traceback buried the log (385 tracebacks for one outage). The store logs its own
failures through a `FailureBurst` per kind; code that catches a store failure raised
to it (background jobs) leaves it to the store (`log_failure`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from opscore.protocol.errors import DataLossError, StorageError

# Further failures are summed into one line at most this often; a failure after this
# long without one starts a new burst (logged with its traceback).
BURST_INTERVAL = 30.0


class FailureBurst:
    """The first failure of a burst is logged with its traceback; further ones are
    counted and logged as one line ("N further failures since T") at most every
    BURST_INTERVAL seconds, at the next success (`flush`) or when the store closes.
    Thread-safe: the store fails on its writer and reader threads too."""

    def __init__(
        self,
        logger: logging.Logger,
        message: str,
        interval: float = BURST_INTERVAL,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._message = message
        self._interval = interval
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._since: datetime | None = None  # when the current burst began
        self._last_failure = self._last_line = 0.0
        self._further = 0  # failures since the last line
        self._last_error = ""

    def failed(self, exc: BaseException, **extra: object) -> None:
        with self._lock:
            now = self._monotonic()
            self._last_error = str(exc)
            in_burst = self._since is not None and now - self._last_failure < self._interval
            self._last_failure = now
            if in_burst:
                self._further += 1
                if now - self._last_line >= self._interval:
                    self._summarize(now)
                return
            self._summarize(now)  # what the previous burst still owes
            self._since, self._last_line = datetime.now(UTC), now
            self._logger.error(self._message, exc_info=exc, extra=extra)

    def flush(self) -> None:
        """Logs the failures counted since the last line, if any."""
        if self._further:  # read without the lock: the common case costs nothing
            with self._lock:
                self._summarize(self._monotonic())

    def _summarize(self, now: float) -> None:
        if not self._further or self._since is None:
            return
        self._logger.warning(
            f"{self._message}: {self._further} further failures since "
            f"{self._since.isoformat(timespec='seconds')}",
            extra={
                "failures": self._further,
                "since": self._since.isoformat(timespec="milliseconds"),
                "error": self._last_error,
            },
        )
        self._further, self._last_line = 0, now


def log_failure(logger: logging.Logger, message: str, exc: BaseException, **extra: object) -> None:
    """Logs a failure of background work with its traceback, except a store failure:
    the store has logged that itself, once per burst, so a failing disk is not
    reported again by every job that tried to write (a debug line only)."""
    if isinstance(exc, StorageError | DataLossError):
        logger.debug(message, extra={**extra, "error": str(exc)})
    else:
        logger.error(message, exc_info=exc, extra=extra)
