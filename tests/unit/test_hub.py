"""Fan-out pacing: under load, events are coalesced so that the stream messages the
hub causes stay within its budget, while a quiet hub delivers at once."""

from __future__ import annotations

import asyncio

import pytest

from opscore.domain.events.hub import Hub
from opscore.protocol.errors import WatcherTooSlowError


async def test_quiet_hub_delivers_at_once_and_busy_hub_keeps_its_message_budget() -> None:
    # 20 subscribers and 400 messages/s: after a flush reaching all 20, the next
    # may come 50 ms later (longer than the 1 ms flush interval).
    hub: Hub[int] = Hub(max_subscribers=100, flush_interval=0.001, messages_per_second=400)
    subs = [hub.subscribe(None, limit=1000) for _ in range(20)]
    loop = asyncio.get_running_loop()

    started = loop.time()
    hub.publish([1])
    assert await asyncio.wait_for(subs[0].next_batch(100), 1) == [1]
    assert loop.time() - started < 0.01

    hub.publish([2])
    hub.publish([3])
    assert await asyncio.wait_for(subs[0].next_batch(100), 1) == [2, 3]  # coalesced
    assert loop.time() - started >= 0.045
    for sub in subs[1:]:  # the others, not reading meanwhile, get everything at once
        assert await sub.next_batch(100) == [1, 2, 3]


async def test_filtered_subscribers_do_not_count_against_the_budget() -> None:
    hub: Hub[int] = Hub(max_subscribers=100, flush_interval=0.001, messages_per_second=400)
    wanted = hub.subscribe(None, limit=1000)
    for _ in range(20):
        hub.subscribe(lambda e: e < 0, limit=1000)  # accept nothing published here
    loop = asyncio.get_running_loop()
    started = loop.time()
    for n in range(3):
        hub.publish([n])
        assert await asyncio.wait_for(wanted.next_batch(100), 1) == [n]
    # one message per flush: 2.5 ms apart at most 400/s, not 50 ms
    assert loop.time() - started < 0.03


async def test_one_large_flush_reaches_caught_up_subscribers_but_laggards_are_dropped() -> None:
    """The buffer limit is about falling behind: a caught-up subscriber takes a flush
    bigger than its limit (many agents changing in one sweep); one that still holds
    unread events and would exceed the limit is dropped."""
    hub: Hub[int] = Hub(max_subscribers=10)
    reader = hub.subscribe(None, limit=10)
    laggard = hub.subscribe(None, limit=10)
    hub.publish(range(25))
    assert await reader.next_batch(100) == list(range(25))
    hub.publish(range(25, 30))
    assert await reader.next_batch(100) == list(range(25, 30))
    with pytest.raises(WatcherTooSlowError):
        await laggard.next_batch(100)
