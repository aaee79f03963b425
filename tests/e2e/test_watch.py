"""WatchAgentStates: replay and resume, initial snapshot, filters, compaction, slow
watchers, responses and watchers bounded by bytes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from opspawn.opscore.v1 import lifecycle_pb2 as pb
from opspawn.opscore.v1 import lifecycle_pb2_grpc

from opscore.domain.clock import FakeClock
from opscore.protocol.errors import ConfigurationError
from opscore.protocol.limits import (
    MAX_CAPABILITY_LENGTH,
    MAX_ENDPOINT_LENGTH,
    MAX_ID_LENGTH,
    MAX_NAME_LENGTH,
    MAX_VERSION_LENGTH,
    RequestLimits,
    max_agent_event_bytes,
    watch_response_bytes,
)
from opscore.server.config import Settings, load_settings

if TYPE_CHECKING:
    from conftest import Connect, Rpc, SpawnServer, StartServer, Stub

Request = pb.WatchAgentStatesRequest


async def register(lifecycle: Stub, agent_id: str, *capabilities: str) -> pb.Agent:
    return await lifecycle.RegisterAgent(
        pb.RegisterAgentRequest(agent_id=agent_id, name=agent_id, capabilities=capabilities)
    )


async def report(
    lifecycle: Stub, rpc: Rpc, agent_id: str, n: int, state: int = pb.AGENT_STATE_BUSY
) -> pb.Agent:
    return await lifecycle.UpdateAgentState(
        pb.UpdateAgentStateRequest(agent_id=agent_id, state=state, details=rpc.struct(n=n))
    )


def revisions(events: list[pb.AgentEvent]) -> list[int]:
    return [e.revision for e in events]


def flatten(responses: list[pb.WatchAgentStatesResponse]) -> list[pb.AgentEvent]:
    return [event for response in responses for event in response.events]


async def test_replay_since_revision_then_live(lifecycle: Stub, rpc: Rpc) -> None:
    """since_revision=R first replays every later event once, in order, with the agent as it
    was after each change, then delivers new changes live on the same stream."""
    base = await register(lifecycle, "a")
    history = [await report(lifecycle, rpc, "a", n) for n in range(5)]

    call = lifecycle.WatchAgentStates(Request(since_revision=base.revision))
    try:
        replayed = await rpc.read_until_revision(call, history[-1].revision)
        assert revisions(replayed) == [a.revision for a in history]
        assert [e.type for e in replayed] == [pb.AGENT_EVENT_TYPE_STATE_CHANGED] * 5
        assert [e.agent.state_details["n"] for e in replayed] == [0, 1, 2, 3, 4]
        assert all(e.HasField("occurred_at") for e in replayed)

        live = [await report(lifecycle, rpc, "a", n) for n in (5, 6)]
        newcomer = await register(lifecycle, "b")
        more = await rpc.read_until_revision(call, newcomer.revision)
        assert revisions(more) == [live[0].revision, live[1].revision, newcomer.revision]
        assert [e.type for e in more][-1] == pb.AGENT_EVENT_TYPE_REGISTERED
    finally:
        call.cancel()


async def test_replay_from_middle_of_history(lifecycle: Stub, rpc: Rpc) -> None:
    """Resuming from any revision in the history replays exactly the events after it."""
    await register(lifecycle, "a")
    history = [await report(lifecycle, rpc, "a", n) for n in range(6)]
    events = await rpc.replay(lifecycle, history[2].revision, history[-1].revision)
    assert revisions(events) == [a.revision for a in history[3:]]


async def test_since_zero_replays_whole_history(lifecycle: Stub, rpc: Rpc) -> None:
    """since_revision=0 replays the whole retained history from the first registration."""
    first = await register(lifecycle, "a")
    second = await register(lifecycle, "b")
    history = [await report(lifecycle, rpc, "a", n) for n in range(3)]
    events = await rpc.replay(lifecycle, 0, history[-1].revision)
    assert revisions(events) == [first.revision, second.revision, *(a.revision for a in history)]
    assert [e.type for e in events[:2]] == [pb.AGENT_EVENT_TYPE_REGISTERED] * 2


async def test_unset_since_revision_is_live_only(lifecycle: Stub, rpc: Rpc) -> None:
    """Without since_revision (and without send_initial_state) a watch sends no history,
    only changes made after it started."""
    await register(lifecycle, "a")
    head = (await report(lifecycle, rpc, "a", 0)).revision
    call = lifecycle.WatchAgentStates(Request())
    stop = asyncio.Event()
    produced: list[int] = []

    async def produce() -> None:
        n = 1
        while not stop.is_set():
            produced.append((await report(lifecycle, rpc, "a", n)).revision)
            n += 1
            await asyncio.sleep(0.02)

    producer = asyncio.create_task(produce())
    try:
        first = await rpc.read_events(call, lambda events: bool(events))
    finally:
        stop.set()
        await producer
        call.cancel()
    assert first[0].revision > head
    assert first[0].revision in produced


async def test_filters_by_agent_ids_and_capability(lifecycle: Stub, rpc: Rpc) -> None:
    """agent_ids and capability restrict a watch to matching agents (both filters apply
    together), including their DEREGISTERED events."""
    await register(lifecycle, "a", "x")
    await register(lifecycle, "b", "y")
    base = await register(lifecycle, "c", "x")
    done: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    for n in range(2):
        for agent_id in ("a", "b", "c"):
            done[agent_id].append((await report(lifecycle, rpc, agent_id, n)).revision)
    gone = await lifecycle.DeregisterAgent(pb.DeregisterAgentRequest(agent_id="b"))
    last = await register(lifecycle, "d", "x")
    b_events = await rpc.replay(
        lifecycle,
        base.revision,
        until=lambda evs: bool(evs) and evs[-1].type == pb.AGENT_EVENT_TYPE_DEREGISTERED,
        agent_ids=["b"],
    )
    assert revisions(b_events)[:-1] == done["b"]
    assert done["b"][-1] < b_events[-1].revision < last.revision
    assert b_events[-1].agent == gone

    x_events = await rpc.replay(lifecycle, base.revision, last.revision, capability="x")
    assert revisions(x_events) == sorted([*done["a"], *done["c"], last.revision])

    both = await rpc.replay(
        lifecycle, base.revision, done["a"][-1], agent_ids=["a", "b"], capability="x"
    )
    assert revisions(both) == done["a"]

    marker = await report(lifecycle, rpc, "d", 9)
    nobody = await rpc.replay(lifecycle, base.revision, marker.revision, agent_ids=["d", "zz"])
    assert revisions(nobody) == [last.revision, marker.revision]


async def test_initial_state_snapshot_then_synced_then_live(lifecycle: Stub, rpc: Rpc) -> None:
    """send_initial_state sends one SNAPSHOT per matching agent with its current state, then
    a SYNCED event without agent at the snapshot revision, then only live changes."""
    await register(lifecycle, "a", "x")
    await register(lifecycle, "b", "x")
    await register(lifecycle, "c", "y")
    busy = await report(lifecycle, rpc, "a", 1)

    call = lifecycle.WatchAgentStates(Request(send_initial_state=True, capability="x"))
    try:
        initial = await rpc.read_events(
            call, lambda evs: bool(evs) and evs[-1].type == pb.AGENT_EVENT_TYPE_SYNCED
        )
        snapshots, synced = initial[:-1], initial[-1]
        assert [e.type for e in snapshots] == [pb.AGENT_EVENT_TYPE_SNAPSHOT] * 2
        current = {
            agent_id: await lifecycle.GetAgent(pb.GetAgentRequest(agent_id=agent_id))
            for agent_id in ("a", "b")
        }
        assert {e.agent.agent_id: e.agent for e in snapshots} == current
        assert not synced.HasField("agent")
        assert synced.revision == busy.revision

        await report(lifecycle, rpc, "c", 2)
        changed = await report(lifecycle, rpc, "b", 3)
        live = await rpc.read_until_revision(call, changed.revision)
        assert [(e.type, e.revision) for e in live] == [
            (pb.AGENT_EVENT_TYPE_STATE_CHANGED, changed.revision)
        ]
    finally:
        call.cancel()


async def test_initial_state_of_empty_registry(lifecycle: Stub, rpc: Rpc) -> None:
    """With no agents, send_initial_state sends just SYNCED, then live events."""
    call = lifecycle.WatchAgentStates(Request(send_initial_state=True))
    try:
        initial = await rpc.read_events(call, lambda evs: bool(evs))
        assert [e.type for e in initial] == [pb.AGENT_EVENT_TYPE_SYNCED]
        agent = await register(lifecycle, "first")
        live = await rpc.read_until_revision(call, agent.revision)
        assert [(e.type, e.agent.agent_id) for e in live] == [
            (pb.AGENT_EVENT_TYPE_REGISTERED, "first")
        ]
    finally:
        call.cancel()


async def test_conflicting_or_negative_start_is_invalid(lifecycle: Stub, rpc: Rpc) -> None:
    """since_revision together with send_initial_state, or a negative since_revision, is
    INVALID_ARGUMENT."""
    agent = await register(lifecycle, "a")
    for request in (
        Request(since_revision=agent.revision, send_initial_state=True),
        Request(since_revision=0, send_initial_state=True),
        Request(since_revision=-1),
    ):
        call = lifecycle.WatchAgentStates(request)
        failure, events = await rpc.stream_fails(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert events == []
        assert failure.fields, "expected a BadRequest naming the bad field"


async def test_disconnect_and_resume_loses_and_repeats_nothing(lifecycle: Stub, rpc: Rpc) -> None:
    """A watcher that disconnects mid-stream and resumes from the last revision it saw
    receives every change exactly once, in order, across both streams."""
    agents = ["r0", "r1", "r2"]
    for agent_id in agents:
        base = await register(lifecycle, agent_id)
    acked: dict[int, tuple[str, int]] = {}

    async def burst(first_n: int) -> None:
        async def one_agent(agent_id: str) -> None:
            for n in range(first_n, first_n + 10):
                acked[(await report(lifecycle, rpc, agent_id, n)).revision] = (agent_id, n)

        await asyncio.gather(*(one_agent(agent_id) for agent_id in agents))

    first_call = lifecycle.WatchAgentStates(Request(since_revision=base.revision))
    await burst(0)
    seen = await rpc.read_events(first_call, lambda evs: len(evs) >= 12)
    first_call.cancel()

    await burst(100)
    resumed = await rpc.replay(lifecycle, seen[-1].revision, max(acked))

    union = seen + resumed
    assert revisions(union) == sorted(acked)
    assert [(e.agent.agent_id, e.agent.state_details["n"]) for e in union] == [
        acked[r] for r in sorted(acked)
    ]


async def test_compacted_history_is_out_of_range(
    start_server: StartServer, connect: Connect, settings: Settings, clock: FakeClock, rpc: Rpc
) -> None:
    """After compaction keeps only the newest event_history_limit events, resuming from an
    older revision is OUT_OF_RANGE (REVISION_COMPACTED); recent revisions still resume."""
    server = await start_server(
        settings.model_copy(update={"event_history_limit": 100, "compaction_interval": 1}), clock
    )
    lifecycle = await connect(server)
    await register(lifecycle, "chatty")
    history = [await report(lifecycle, rpc, "chatty", n) for n in range(150)]
    head = history[-1].revision

    async def compacted() -> bool:
        call = lifecycle.WatchAgentStates(Request(since_revision=1))
        try:
            await asyncio.wait_for(call.read(), 5)
        except grpc.aio.AioRpcError as err:
            return err.code() == grpc.StatusCode.OUT_OF_RANGE
        finally:
            call.cancel()
        return False

    await rpc.advance_until(clock, compacted, first=1, step=1, limit=5, message="compaction")
    failure, _ = await rpc.stream_fails(
        lifecycle.WatchAgentStates(Request(since_revision=1)), grpc.StatusCode.OUT_OF_RANGE
    )
    assert failure.reason == "REVISION_COMPACTED"

    recent = await rpc.replay(lifecycle, history[-51].revision, head)
    assert revisions(recent) == [a.revision for a in history[-50:]]


async def test_slow_watcher_is_dropped(
    start_server: StartServer, connect: Connect, settings: Settings, clock: FakeClock, rpc: Rpc
) -> None:
    """A watcher that stops reading while large events pour in is ended with
    RESOURCE_EXHAUSTED (WATCHER_TOO_SLOW) instead of being buffered without bound."""
    server = await start_server(settings.model_copy(update={"watch_buffer": 8}), clock)
    lifecycle = await connect(server)
    agents = [f"big-{i}" for i in range(16)]
    for agent_id in agents:
        last = await register(lifecycle, agent_id)

    call = lifecycle.WatchAgentStates(Request(since_revision=last.revision))
    first = await report(lifecycle, rpc, agents[0], -1)
    await rpc.read_until_revision(call, first.revision)

    blob = "x" * 8000
    per_agent = 50

    async def flood(agent_id: str) -> None:
        for n in range(per_agent):
            await lifecycle.UpdateAgentState(
                pb.UpdateAgentStateRequest(
                    agent_id=agent_id,
                    state=pb.AGENT_STATE_BUSY,
                    details=rpc.struct(n=n, blob=blob),
                )
            )

    await asyncio.gather(*(flood(agent_id) for agent_id in agents))
    total = per_agent * len(agents)
    failure, delivered = await rpc.stream_fails(
        call, grpc.StatusCode.RESOURCE_EXHAUSTED, max_events=total
    )
    assert failure.reason == "WATCHER_TOO_SLOW"
    assert len(delivered) < total


async def test_since_revision_ahead_of_the_store_is_out_of_range(lifecycle: Stub, rpc: Rpc) -> None:
    """Resuming after a revision the store has not reached (another server, a restored
    database) fails at once with OUT_OF_RANGE naming the current revision, instead of a
    stream that stays silent; the current revision itself resumes live."""
    head = (await register(lifecycle, "a")).revision
    for ahead in (head + 1, head + 1000):
        call = lifecycle.WatchAgentStates(Request(since_revision=ahead))
        failure, events = await rpc.stream_fails(call, grpc.StatusCode.OUT_OF_RANGE)
        assert events == []
        assert failure.reason == "REVISION_AHEAD"
        assert failure.error_metadata == {
            "requested_revision": str(ahead),
            "current_revision": str(head),
        }
        assert str(head) in failure.message

    call = lifecycle.WatchAgentStates(Request(since_revision=head))
    try:
        changed = await report(lifecycle, rpc, "a", 1)
        assert revisions(await rpc.read_until_revision(call, changed.revision)) == [
            changed.revision
        ]
    finally:
        call.cancel()


# 400 agents with ~15 KB of metadata each (within the limits): 6 MB of agents, more
# than one message may carry.
BIG_AGENTS = 400


def big_metadata(agent_id: str) -> dict[str, str]:
    return {f"k{i:02d}": f"{agent_id}:" + "m" * 1000 for i in range(15)}


async def read_responses(
    call: grpc.aio.UnaryStreamCall, until: int, within: float = 10.0
) -> list[pb.WatchAgentStatesResponse]:
    """Raw responses of a watch until it has carried `until` events."""
    responses: list[pb.WatchAgentStatesResponse] = []

    async def read() -> None:
        while sum(len(r.events) for r in responses) < until:
            response = await call.read()
            assert response is not grpc.aio.EOF, "stream ended"
            responses.append(response)

    await asyncio.wait_for(read(), within)
    return responses


async def test_large_agents_replay_snapshot_and_burst_within_the_byte_budget(
    lifecycle: Stub, rpc: Rpc, settings: Settings
) -> None:
    """With agents whose metadata fills most of its limit, replay from 0, the initial
    state and a live burst of every agent changing together all arrive whole: the
    server cuts responses at the byte budget instead of failing with "message larger
    than max"."""
    budget = watch_response_bytes(settings.max_message_bytes)
    ids = [f"big-{i:03d}" for i in range(BIG_AGENTS)]
    for agent_id in ids:
        await lifecycle.RegisterAgent(
            pb.RegisterAgentRequest(
                agent_id=agent_id, name=agent_id, metadata=big_metadata(agent_id)
            )
        )

    def check(responses: list[pb.WatchAgentStatesResponse]) -> list[pb.AgentEvent]:
        assert len(responses) > 1
        assert all(r.ByteSize() <= budget for r in responses)
        events = flatten(responses)
        assert [e.agent.agent_id for e in events if e.HasField("agent")] == ids
        assert all(
            e.agent.metadata == big_metadata(e.agent.agent_id) for e in events if e.agent.agent_id
        )
        return events

    replay = lifecycle.WatchAgentStates(Request(since_revision=0))
    initial = lifecycle.WatchAgentStates(Request(send_initial_state=True))
    try:
        check(await read_responses(replay, BIG_AGENTS))
        snapshot = check(await read_responses(initial, BIG_AGENTS + 1))
        assert snapshot[-1].type == pb.AGENT_EVENT_TYPE_SYNCED

        # A burst of every agent changing at once reaches both live streams whole.
        updated = await asyncio.gather(*(report(lifecycle, rpc, a, 1) for a in ids))
        for call in (replay, initial):
            burst = await read_responses(call, BIG_AGENTS)
            assert all(r.ByteSize() <= budget for r in burst)
            assert sorted(revisions(flatten(burst))) == sorted(a.revision for a in updated)
    finally:
        replay.cancel()
        initial.cancel()


def largest_registration() -> pb.RegisterAgentRequest:
    """An agent at every limit, in 4-byte characters wherever text is allowed."""
    wide = "\U0001f600"  # 4 bytes in UTF-8
    limits = RequestLimits()
    entries = limits.max_metadata_entries
    half = limits.max_metadata_bytes // entries // 2
    return pb.RegisterAgentRequest(
        agent_id="x" * MAX_ID_LENGTH,
        name=wide * MAX_NAME_LENGTH,
        version=wide * MAX_VERSION_LENGTH,
        contact_endpoint=wide * MAX_ENDPOINT_LENGTH,
        capabilities=[
            f"{i:02d}" + wide * (MAX_CAPABILITY_LENGTH - 2) for i in range(limits.max_capabilities)
        ],
        metadata={f"{i:02d}" + wide * (half - 2): wide * half for i in range(entries)},
    )


async def test_largest_possible_agent_event_fits_one_response(
    lifecycle: Stub, rpc: Rpc, settings: Settings
) -> None:
    """An event of an agent at every field limit is below the computed bound, which is
    below the response budget and the send limit; settings under which the bound would
    not fit the send limit are refused at start."""
    limits = RequestLimits()
    registration = largest_registration()
    agent = await lifecycle.RegisterAgent(registration)
    details = rpc.struct(blob="")
    details.update({"blob": "d" * (limits.max_details_bytes - details.ByteSize() - 3)})
    assert details.ByteSize() <= limits.max_details_bytes
    changed = await lifecycle.UpdateAgentState(
        pb.UpdateAgentStateRequest(
            agent_id=agent.agent_id, state=pb.AGENT_STATE_BUSY, details=details
        )
    )
    call = lifecycle.WatchAgentStates(Request(since_revision=agent.revision))
    try:
        (response,) = await read_responses(call, 1)
    finally:
        call.cancel()
    (event,) = response.events
    assert event.revision == changed.revision
    assert event.agent.metadata == registration.metadata
    assert event.agent.state_details == details
    bound = max_agent_event_bytes(limits)
    assert response.ByteSize() <= bound <= watch_response_bytes(settings.max_message_bytes)
    assert bound <= Settings().max_message_bytes

    with pytest.raises(ConfigurationError, match="max_message_bytes"):
        load_settings(max_message_bytes=bound - 1)
    load_settings(max_message_bytes=bound)


# The slow-watcher memory test: agents at the metadata limit, updated with large details,
# so every event is ~33 KB on the wire.
SLOW_BUFFER_BYTES = 2 * 1024 * 1024
# Allocator slack, gRPC buffers, one response in flight. Measured here: 1.5 MiB; with
# only the 1,024-event bound the same run grew 34 MiB.
MEMORY_MARGIN = 16 * 1024 * 1024


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


async def test_slow_watcher_of_large_events_is_dropped_within_its_byte_bound(
    spawn_server: SpawnServer, tmp_path: Path, rpc: Rpc
) -> None:
    """A watcher that stops reading while large events pour in is dropped
    (WATCHER_TOO_SLOW) after at most OPSCORE_WATCH_BUFFER_BYTES of unread events, and
    the server's peak memory grows by less than that bound plus a margin, where an
    event-count bound alone would have let it hold 1,024 large events."""
    server = await spawn_server(
        tmp_path / "slow.db",
        OPSCORE_WATCH_BUFFER_BYTES=str(SLOW_BUFFER_BYTES),
        OPSCORE_LIVENESS_TIMEOUT="3600",
    )
    pid = server.proc.pid
    metadata = {f"k{i:02d}": "m" * 1000 for i in range(16)}
    blob = "d" * 15_000
    agents = [f"big-{i:02d}" for i in range(32)]

    async def flood(stub: Stub, rounds: int) -> None:
        async def one(agent_id: str) -> None:
            for n in range(rounds):
                await stub.UpdateAgentState(
                    pb.UpdateAgentStateRequest(
                        agent_id=agent_id,
                        state=(pb.AGENT_STATE_BUSY, pb.AGENT_STATE_IDLE)[n % 2],
                        details=rpc.struct(n=n, blob=blob),
                    )
                )

        await asyncio.gather(*(one(a) for a in agents))

    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        for agent_id in agents:
            await stub.RegisterAgent(
                pb.RegisterAgentRequest(agent_id=agent_id, name=agent_id, metadata=metadata)
            )
        # Warm up with a watcher that reads: the server's own working set (caches,
        # allocator, gRPC buffers) reaches its peak before the measurement.
        reader = stub.WatchAgentStates(Request())
        warm = asyncio.create_task(flood(stub, 20))
        await rpc.read_events(reader, lambda evs: len(evs) >= 20 * len(agents), within=60)
        await warm
        reader.cancel()
        before = vm_kib(pid, "VmHWM")

        # A watcher that never reads, on its own channel so that only its stream
        # stalls, while 40 rounds of updates (~42 MB of events, 1,280 of them) pour in.
        async with grpc.aio.insecure_channel(server.address) as slow_channel:
            slow = lifecycle_pb2_grpc.LifecycleServiceStub(slow_channel).WatchAgentStates(Request())
            await flood(stub, 40)
            grown = (vm_kib(pid, "VmHWM") - before) * 1024
            failure, delivered = await rpc.stream_fails(
                slow, grpc.StatusCode.RESOURCE_EXHAUSTED, max_events=40 * len(agents)
            )
    assert failure.reason == "WATCHER_TOO_SLOW"
    assert len(delivered) < 40 * len(agents)
    assert grown < SLOW_BUFFER_BYTES + MEMORY_MARGIN, f"server peak grew {grown >> 20} MiB"
