"""WatchAgentStates: replay and resume, initial snapshot, filters, compaction, slow watchers."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
from opspawn.opscore.v1 import lifecycle_pb2 as pb

from opscore.domain.clock import FakeClock
from opscore.server.config import Settings

if TYPE_CHECKING:
    from conftest import Connect, Rpc, StartServer, Stub

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
