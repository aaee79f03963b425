"""Fan-out pacing and bounds: a hub whose subscribers have written all they were given
delivers at once; while some are still writing, events are coalesced so that the
stream messages the hub causes stay within its budget. Each subscriber's unread
events are bounded by number and by bytes."""

from __future__ import annotations

import asyncio

import pytest

from opscore.domain.events.hub import Hub, Subscription
from opscore.protocol.errors import WatcherTooSlowError

UNBOUNDED = 1 << 40


async def settle() -> None:
    """Lets every task that is ready run (a flush timer of the tests below never is)."""
    for _ in range(5):
        await asyncio.sleep(0)


def waiting(subs: list[Subscription[int]]) -> list[asyncio.Task[list[int]]]:
    return [asyncio.create_task(sub.next_batch(100)) for sub in subs]


async def test_quiet_hub_delivers_at_once_to_many_subscribers() -> None:
    # 20 subscribers and 400 messages/s: a budget that, under load, spaces flushes
    # 50 ms apart. Subscribers that are all back for more get each event at once.
    hub: Hub[int] = Hub(max_subscribers=100, flush_interval=0.001, messages_per_second=400)
    subs = [hub.subscribe(None, 1000, UNBOUNDED) for _ in range(20)]
    for n in range(3):
        readers = waiting(subs)
        await settle()
        hub.publish([n])
        await settle()
        assert all(r.done() for r in readers), f"event {n} waited for a timer"
        assert [r.result() for r in readers] == [[n]] * 20


async def test_busy_hub_coalesces_within_its_message_budget() -> None:
    """While some subscribers still hold what they were given, events wait for the
    budget's spacing and then go out together."""
    hub: Hub[int] = Hub(max_subscribers=100, flush_interval=0.001, messages_per_second=400)
    subs = [hub.subscribe(None, 1000, UNBOUNDED) for _ in range(20)]
    loop = asyncio.get_running_loop()
    started = loop.time()
    hub.publish([1])  # everyone idle: at once
    assert await subs[0].next_batch(100) == [1]
    reader = asyncio.create_task(subs[0].next_batch(100))
    hub.publish([2])  # the other 19 have not read [1]
    hub.publish([3])
    await settle()
    assert not reader.done()
    assert await reader == [2, 3]  # coalesced
    assert loop.time() - started >= 0.045  # the flush reached 20: 20 / 400 per second
    for sub in subs[1:]:  # the others, not reading meanwhile, get everything at once
        assert await sub.next_batch(100) == [1, 2, 3]


async def test_filtered_subscribers_that_take_nothing_never_hold_delivery_back() -> None:
    hub: Hub[int] = Hub(max_subscribers=100, flush_interval=0.001, messages_per_second=400)
    wanted = hub.subscribe(None, 1000, UNBOUNDED)
    for _ in range(20):
        hub.subscribe(lambda e: e < 0, 1000, UNBOUNDED)  # accept nothing published here
    for n in range(3):
        reader = asyncio.create_task(wanted.next_batch(100))
        await settle()
        hub.publish([n])
        await settle()
        assert reader.done() and reader.result() == [n]


async def test_one_large_flush_reaches_caught_up_subscribers_but_laggards_are_dropped() -> None:
    """The buffer limit is about falling behind: a caught-up subscriber takes a flush
    bigger than its limit (many agents changing in one sweep); one that still holds
    unread events and would exceed the limit is dropped."""
    hub: Hub[int] = Hub(max_subscribers=10)
    reader = hub.subscribe(None, 10, UNBOUNDED)
    laggard = hub.subscribe(None, 10, UNBOUNDED)
    hub.publish(range(25))
    assert await reader.next_batch(100) == list(range(25))
    hub.publish(range(25, 30))
    assert await reader.next_batch(100) == list(range(25, 30))
    with pytest.raises(WatcherTooSlowError):
        await laggard.next_batch(100)


async def test_subscriber_falling_behind_by_bytes_is_dropped() -> None:
    """The byte bound drops a subscriber holding few but large unread events, filtered
    or not; one that keeps reading stays."""
    hub: Hub[str] = Hub(max_subscribers=10, weigh=len)
    reader = hub.subscribe(None, 1000, 100)
    laggard = hub.subscribe(None, 1000, 100)
    picky = hub.subscribe(lambda e: e.startswith("b"), 1000, 100)
    for n in range(4):
        hub.publish(["a" * 60, "b" * 30])
        assert await reader.next_batch(100) == ["a" * 60, "b" * 30]
        assert n < 3 or (laggard.overflowed and picky.overflowed)
    assert not reader.overflowed
    for sub in (laggard, picky):
        with pytest.raises(WatcherTooSlowError, match="bytes behind"):
            while True:
                await sub.next_batch(100)


async def test_batches_are_cut_by_bytes_but_hold_at_least_one_event() -> None:
    hub: Hub[str] = Hub(max_subscribers=10, weigh=len)
    sub = hub.subscribe(None, 1000, UNBOUNDED)
    hub.publish(["aaaa", "bbbb", "cccc"])
    hub.publish(["x" * 50, "dd"])  # still unread: a second chunk
    assert await sub.next_batch(100, max_bytes=8) == ["aaaa", "bbbb"]
    assert await sub.next_batch(100, max_bytes=8) == ["cccc"]
    assert await sub.next_batch(100, max_bytes=8) == ["x" * 50]  # alone, though larger
    assert await sub.next_batch(100, max_bytes=8) == ["dd"]
    hub.publish(["e", "f", "g"])
    assert await sub.next_batch(2, max_bytes=8) == ["e", "f"]
    assert await sub.next_batch(2, max_bytes=8) == ["g"]


async def test_coalescing_hub_stays_on_its_budget_until_a_flush_carries_one_event() -> None:
    """After a flush that carried several events (a backlog), even subscribers that
    are all back for more get the next event on the budget, not at once; once a flush
    carries a single event, delivery is immediate again."""
    hub: Hub[int] = Hub(max_subscribers=10, flush_interval=0.02)
    sub = hub.subscribe(None, 1000, UNBOUNDED)
    hub.publish([1])  # at once
    hub.publish([2])  # the subscriber has not read [1]: waits
    hub.publish([3])
    assert await sub.next_batch(100) == [1]
    assert await sub.next_batch(100) == [2, 3]  # one flush, two events
    reader = asyncio.create_task(sub.next_batch(100))
    await settle()
    hub.publish([4])
    await settle()
    assert not reader.done(), "a coalescing hub flushed at once"
    assert await reader == [4]  # a flush of one event
    reader = asyncio.create_task(sub.next_batch(100))
    await settle()
    hub.publish([5])
    await settle()
    assert reader.done() and reader.result() == [5]
