"""Time source: timezone-aware UTC, injectable so tests never sleep for real."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

from opscore.store.failures import log_failure


class Clock(Protocol):
    def now(self) -> datetime: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class FakeClock:
    """A clock that moves only when told; sleepers wake when time passes their deadline."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._ids = itertools.count()

    def now(self) -> datetime:
        return self._now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        deadline = self._now + timedelta(seconds=seconds)
        heapq.heappush(self._sleepers, (deadline, next(self._ids), future))
        await future

    async def advance(self, seconds: float) -> None:
        """Moves time forward and lets every woken sleeper run."""
        self._now += timedelta(seconds=seconds)
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)
        for _ in range(5):  # let woken tasks reach their next await
            await asyncio.sleep(0)


async def every(clock: Clock, interval: float, job: Callable[[], Awaitable[object]]) -> None:
    """Runs `job` every `interval` seconds of `clock` until cancelled; a failing run is
    logged and the next one still happens (background jobs must not die quietly)."""
    while True:
        await clock.sleep(interval)
        try:
            await job()
        except Exception as exc:
            log_failure(
                logging.getLogger(__name__),
                "background job failed",
                exc,
                job=getattr(job, "__qualname__", str(job)),
            )
