"""In-process fan-out of committed events to live subscribers (watch streams).

The store is the source of truth; the hub only carries what was committed after a
subscriber joined. Each subscriber has a bounded buffer: one that falls behind is
dropped (it must resume from the store) instead of growing server memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from opscore.errors import ResourceLimitError, ShuttingDownError, WatcherTooSlowError

E = TypeVar("E")


class Subscription(Generic[E]):
    def __init__(self, hub: Hub[E], accepts: Callable[[E], bool], limit: int) -> None:
        self._hub = hub
        self._accepts = accepts
        self._limit = limit
        self._buffer: deque[E] = deque()
        self._ready = asyncio.Event()
        self.overflowed = False
        self.closed = False

    def offer(self, event: E) -> None:
        if self.overflowed or not self._accepts(event):
            return
        if len(self._buffer) >= self._limit:
            self.overflowed = True
            self._buffer.clear()
        else:
            self._buffer.append(event)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def next_batch(self, max_items: int) -> list[E]:
        """Waits for events and returns up to `max_items` of them, oldest first."""
        while not self._buffer:
            if self.overflowed:
                raise WatcherTooSlowError(
                    f"watcher fell more than {self._limit} events behind and was dropped; "
                    "resume from the last revision received"
                )
            if self.closed:
                raise ShuttingDownError("server is shutting down; resume on reconnect")
            self._ready.clear()
            await self._ready.wait()
        count = min(max_items, len(self._buffer))
        return [self._buffer.popleft() for _ in range(count)]

    def unsubscribe(self) -> None:
        self._hub._subscribers.discard(self)

    def __enter__(self) -> Subscription[E]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unsubscribe()


class Hub(Generic[E]):
    def __init__(self, max_subscribers: int = 1000) -> None:
        self._subscribers: set[Subscription[E]] = set()
        self._max_subscribers = max_subscribers
        self._closed = False

    def subscribe(self, accepts: Callable[[E], bool], limit: int) -> Subscription[E]:
        if len(self._subscribers) >= self._max_subscribers:
            raise ResourceLimitError(
                f"too many watchers (limit {self._max_subscribers}); try again later"
            )
        sub = Subscription(self, accepts, limit)
        if self._closed:
            sub.close()
        self._subscribers.add(sub)
        return sub

    def publish(self, events: Iterable[E]) -> None:
        events = list(events)
        for sub in tuple(self._subscribers):
            for event in events:
                sub.offer(event)

    def close(self) -> None:
        """Ends every subscription (server shutdown)."""
        self._closed = True
        for sub in tuple(self._subscribers):
            sub.close()

    def __len__(self) -> int:
        return len(self._subscribers)
