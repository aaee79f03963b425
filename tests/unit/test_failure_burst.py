"""FailureBurst on a fake monotonic clock: one traceback per burst, then counts."""

from __future__ import annotations

import logging

import pytest

from opscore.store.failures import BURST_INTERVAL, FailureBurst


class Ticks:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int | None, bool]]:
    """(level, failures counted, has a traceback) of each line logged."""
    return [
        (r.levelname, getattr(r, "failures", None), r.exc_info is not None) for r in caplog.records
    ]


def test_a_burst_is_one_traceback_then_counts(caplog: pytest.LogCaptureFixture) -> None:
    """Failures close together log the first with its traceback; the rest are summed
    at the next success, at most every BURST_INTERVAL while failing, and a failure
    after a quiet interval starts a new burst (after the old one's count)."""
    ticks = Ticks()
    burst = FailureBurst(logging.getLogger("test"), "write failed", monotonic=ticks)
    caplog.set_level(logging.INFO, "test")
    for _ in range(5):
        burst.failed(OSError("disk full"))
        ticks.now += 1
    burst.flush()  # a success
    burst.flush()  # nothing more to say
    assert _lines(caplog) == [("ERROR", None, True), ("WARNING", 4, False)]

    caplog.clear()
    for _ in range(int(BURST_INTERVAL)):  # failing for longer than the interval
        burst.failed(OSError("disk full"))
        ticks.now += 1.5
    assert _lines(caplog) == [("WARNING", 21, False)]  # the same burst, 30 s on

    caplog.clear()
    ticks.now += BURST_INTERVAL
    burst.failed(OSError("disk full again"))
    assert _lines(caplog) == [("WARNING", 9, False), ("ERROR", None, True)]
