"""In-process fan-out of committed events to live subscribers (watch streams).

The store is the source of truth; the hub only carries what was committed after a
subscriber joined. Each subscriber has a bounded buffer: one that falls behind is
dropped (it must resume from the store) instead of growing server memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from opscore.protocol.errors import ResourceLimitError, ShuttingDownError, WatcherTooSlowError

E = TypeVar("E")


@dataclass(frozen=True)
class WatchConfig:
    """How watches of one kind (agents, sessions) are fanned out (defaults: Settings)."""

    max_watchers: int
    # Events a watcher may fall behind by before it is dropped.
    buffer: int
    # Under load, a watcher gets the events of at least this many seconds per message.
    flush_interval: float
    # Fan-out writes at most this many stream messages a second in all.
    messages_per_second: float


class Subscription(Generic[E]):
    """A subscriber's bounded buffer. Published batches are kept as they are (shared,
    never mutated), so fanning a batch out costs one append per subscriber, not one
    per event."""

    def __init__(self, hub: Hub[E], accepts: Callable[[E], bool] | None, limit: int) -> None:
        self._hub = hub
        self._accepts = accepts
        self._limit = limit
        self._chunks: deque[list[E]] = deque()
        self._count = 0
        self._ready = asyncio.Event()
        self.overflowed = False
        self.closed = False

    def offer(self, events: list[E]) -> bool:
        """Queues the events this subscriber accepts; True if there were any."""
        if self.overflowed:
            return False
        if self._accepts is not None:
            events = [e for e in events if self._accepts(e)]
        if not events:
            return False
        # A caught-up subscriber takes any one flush (e.g. 2,000 agents going OFFLINE
        # together): the list is shared, and only falling behind should drop it.
        if self._count and self._count + len(events) > self._limit:
            self.overflowed = True
            self._chunks.clear()
            self._count = 0
        else:
            self._chunks.append(events)
            self._count += len(events)
        self._ready.set()
        return True

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def next_batch(self, max_items: int) -> list[E]:
        """Waits for events and returns up to `max_items` of them, oldest first (the
        list may be shared with other subscribers: read it, don't change it)."""
        while not self._chunks:
            if self.overflowed:
                raise WatcherTooSlowError(
                    f"watcher fell more than {self._limit} events behind and was dropped; "
                    "resume from the last revision received"
                )
            if self.closed:
                raise ShuttingDownError("server is shutting down; resume on reconnect")
            self._ready.clear()
            await self._ready.wait()
        if len(self._chunks) == 1 and len(self._chunks[0]) <= max_items:
            batch = self._chunks.popleft()
        else:
            batch = []
            while self._chunks and len(batch) < max_items:
                chunk = self._chunks.popleft()
                room = max_items - len(batch)
                if len(chunk) > room:
                    self._chunks.appendleft(chunk[room:])
                    chunk = chunk[:room]
                batch.extend(chunk)
        self._count -= len(batch)
        return batch

    def unsubscribe(self) -> None:
        self._hub._subscribers.discard(self)

    def __enter__(self) -> Subscription[E]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unsubscribe()


class Hub(Generic[E]):
    """Fans committed events out to subscribers. The first events after a quiet spell
    go out at once; under load the events of an interval go out together, so the
    stream messages written (the dominant cost of fan-out) stay bounded whatever the
    commit rate. The interval is `flush_interval`, or longer when the last flush
    reached so many subscribers that flushing sooner would exceed
    `messages_per_second`."""

    def __init__(
        self,
        max_subscribers: int = 1000,
        flush_interval: float = 0.0,
        messages_per_second: float = float("inf"),
    ) -> None:
        self._subscribers: set[Subscription[E]] = set()
        self._max_subscribers = max_subscribers
        self._flush_interval = flush_interval
        self._messages_per_second = messages_per_second
        self._pending: list[E] = []
        self._flush_due: asyncio.TimerHandle | None = None
        self._next_flush = float("-inf")
        self._closed = False

    @classmethod
    def configured(cls, config: WatchConfig) -> Hub[E]:
        return cls(config.max_watchers, config.flush_interval, config.messages_per_second)

    def subscribe(self, accepts: Callable[[E], bool] | None, limit: int) -> Subscription[E]:
        """`accepts` filters events (None: every event)."""
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
        self._pending.extend(events)
        if not self._pending or self._flush_due is not None:
            return
        loop = asyncio.get_running_loop()
        wait = self._next_flush - loop.time()
        if wait <= 0:
            self._flush()
        else:
            self._flush_due = loop.call_later(wait, self._flush)

    def _flush(self) -> None:
        self._flush_due = None
        batch, self._pending = self._pending, []
        reached = sum(sub.offer(batch) for sub in tuple(self._subscribers)) if batch else 0
        spacing = max(self._flush_interval, reached / self._messages_per_second)
        self._next_flush = asyncio.get_running_loop().time() + spacing

    def close(self) -> None:
        """Delivers what is pending, then ends every subscription (server shutdown)."""
        if self._flush_due is not None:
            self._flush_due.cancel()
            self._flush()
        self._closed = True
        for sub in tuple(self._subscribers):
            sub.close()
