"""In-process fan-out of committed events to live subscribers (watch streams).

The store is the source of truth; the hub only carries what was committed after a
subscriber joined. Each subscriber has a buffer bounded by events and by bytes (the
events' wire size): one that falls behind is dropped (it must resume from the store)
instead of growing server memory.
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
    # Unread events a watcher may hold, in number and in wire bytes, before it is
    # dropped.
    buffer: int
    buffer_bytes: int
    # A batch of live events carries at most this many bytes past its first event.
    response_bytes: int
    # With a backlog (see Hub), new events wait at least this many seconds and go out
    # together.
    flush_interval: float
    # ... and long enough that fan-out writes at most this many messages a second.
    messages_per_second: float


def _weightless(event: object) -> int:
    return 0


class Subscription(Generic[E]):
    """A subscriber's bounded buffer. Published batches are kept as they are (shared,
    never mutated), so fanning a batch out costs one append per subscriber, not one
    per event."""

    def __init__(
        self, hub: Hub[E], accepts: Callable[[E], bool] | None, limit: int, limit_bytes: int
    ) -> None:
        self._hub = hub
        self._accepts = accepts
        self._limit = limit
        self._limit_bytes = limit_bytes
        self._chunks: deque[tuple[list[E], int]] = deque()  # events and their weight
        self._count = 0
        self._bytes = 0
        self._ready = asyncio.Event()
        # Offered events and not yet back for more (still reading or writing them).
        self._busy = False
        self.overflowed = False
        self.closed = False

    def offer(self, events: list[E], weight: int | None = None) -> bool:
        """Queues the events this subscriber accepts (`weight`: their wire size, if
        known); True if there were any."""
        if self.overflowed:
            return False
        if self._accepts is not None:
            events = [e for e in events if self._accepts(e)]
            weight = None
        if not events:
            return False
        if weight is None:
            weight = sum(map(self._hub.weigh, events))
        # A caught-up subscriber takes any one flush (e.g. 2,000 agents going OFFLINE
        # together): the list is shared, and only falling behind should drop it.
        if self._count and (
            self._count + len(events) > self._limit or self._bytes + weight > self._limit_bytes
        ):
            self.overflowed = True
            self._chunks.clear()
            self._count = self._bytes = 0
        else:
            self._chunks.append((events, weight))
            self._count += len(events)
            self._bytes += weight
        self._set_busy(True)
        self._ready.set()
        return True

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def next_batch(self, max_items: int, max_bytes: float = float("inf")) -> list[E]:
        """Waits for events and returns up to `max_items` of them and, past the first,
        up to `max_bytes`, oldest first (the list may be shared with other
        subscribers: read it, don't change it)."""
        while not self._chunks:
            if self.overflowed:
                raise WatcherTooSlowError(
                    f"watcher fell more than {self._limit} events or {self._limit_bytes} "
                    "bytes behind and was dropped; resume from the last revision received"
                )
            if self.closed:
                raise ShuttingDownError("server is shutting down; resume on reconnect")
            self._set_busy(False)
            self._ready.clear()
            await self._ready.wait()
        first, weight = self._chunks[0]
        if len(self._chunks) == 1 and len(first) <= max_items and weight <= max_bytes:
            self._chunks.popleft()
            batch, size = first, weight
        else:
            batch, size = self._take(max_items, max_bytes)
        self._count -= len(batch)
        self._bytes -= size
        return batch

    def _take(self, max_items: int, max_bytes: float) -> tuple[list[E], int]:
        batch: list[E] = []
        size = 0
        while self._chunks:
            chunk, weight = self._chunks[0]
            if len(batch) + len(chunk) <= max_items and size + weight <= max_bytes:
                self._chunks.popleft()
                batch.extend(chunk)
                size += weight
                continue
            taken = part = 0
            for event in chunk:
                w = self._hub.weigh(event)
                if (batch or taken) and (
                    len(batch) + taken >= max_items or size + part + w > max_bytes
                ):
                    break
                taken += 1
                part += w
            batch.extend(chunk[:taken])
            size += part
            if taken == len(chunk):
                self._chunks.popleft()
            else:
                self._chunks[0] = (chunk[taken:], weight - part)
            break
        return batch, size

    def _set_busy(self, busy: bool) -> None:
        if busy != self._busy:
            self._busy = busy
            self._hub._busy += 1 if busy else -1

    def unsubscribe(self) -> None:
        if self in self._hub._subscribers:
            self._set_busy(False)
            self._hub._subscribers.discard(self)

    def __enter__(self) -> Subscription[E]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unsubscribe()


class Hub(Generic[E]):
    """Fans committed events out to subscribers. An event goes out at once while every
    subscriber is waiting for more (it has written all it was given) and the last
    flush carried a single event. Otherwise there is a backlog: new events wait and go
    out together, `flush_interval` after the last flush, or longer when that flush
    reached so many subscribers that flushing sooner would exceed
    `messages_per_second`; the hub delivers at once again after a flush that carried
    one event. So a quiet hub delivers at once, and under load the stream messages
    written (the dominant cost of fan-out) stay bounded whatever the commit rate.
    `weigh` gives an event's wire size, which the subscribers' byte bounds count."""

    def __init__(
        self,
        max_subscribers: int = 1000,
        flush_interval: float = 0.0,
        messages_per_second: float = float("inf"),
        weigh: Callable[[E], int] = _weightless,
    ) -> None:
        self._subscribers: set[Subscription[E]] = set()
        self._max_subscribers = max_subscribers
        self._flush_interval = flush_interval
        self._messages_per_second = messages_per_second
        self.weigh = weigh
        self._busy = 0  # subscribers still reading or writing what they were given
        # The last flush carried several events: under load, stay on the budget until
        # a flush carries only one.
        self._coalescing = False
        self._pending: list[E] = []
        self._flush_due: asyncio.TimerHandle | None = None
        self._next_flush = float("-inf")
        self._closed = False

    @classmethod
    def configured(cls, config: WatchConfig, weigh: Callable[[E], int]) -> Hub[E]:
        return cls(config.max_watchers, config.flush_interval, config.messages_per_second, weigh)

    def subscribe(
        self, accepts: Callable[[E], bool] | None, limit: int, limit_bytes: int
    ) -> Subscription[E]:
        """`accepts` filters events (None: every event); `limit` and `limit_bytes`
        bound the unread events the subscriber may hold."""
        if len(self._subscribers) >= self._max_subscribers:
            raise ResourceLimitError(
                f"too many watchers (limit {self._max_subscribers}); try again later"
            )
        sub = Subscription(self, accepts, limit, limit_bytes)
        if self._closed:
            sub.close()
        self._subscribers.add(sub)
        return sub

    def publish(self, events: Iterable[E]) -> None:
        self._pending.extend(events)
        if not self._pending or self._flush_due is not None:
            return
        if not self._busy and not self._coalescing:
            self._flush()  # nobody is behind and nothing piles up: no reason to wait
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
        self._coalescing = len(batch) > 1
        reached = 0
        weight: int | None = None  # of the whole batch, for subscribers taking it all
        for sub in tuple(self._subscribers):
            if sub._accepts is None and weight is None:
                weight = sum(map(self.weigh, batch))
            reached += sub.offer(batch, weight)
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
