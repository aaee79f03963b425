"""State reports (UpdateAgentState), heartbeats, the liveness sweeper, and open task
streams as presence (connected, free slots, last contact, the grace after a stream
closes), on a fake clock."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf import timestamp_pb2
from opspawn.opscore.v1 import lifecycle_pb2 as pb
from opspawn.opscore.v1 import session_pb2 as S
from workflow_support import eventually, of_type, single, to_dict

from opscore.domain.clock import FakeClock

if TYPE_CHECKING:
    from conftest import Rpc, Stub
    from workflow_support import Harness

    from opscore.server.app import OpsCoreServer

INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def register(lifecycle: Stub, agent_id: str, *capabilities: str) -> pb.Agent:
    return await lifecycle.RegisterAgent(
        pb.RegisterAgentRequest(agent_id=agent_id, name=agent_id, capabilities=capabilities)
    )


async def get(lifecycle: Stub, agent_id: str) -> pb.Agent:
    return await lifecycle.GetAgent(pb.GetAgentRequest(agent_id=agent_id))


async def test_state_report_updates_agent_and_announces(
    lifecycle: Stub, rpc: Rpc, clock: FakeClock
) -> None:
    """A report changes state and details under a new revision, records observed_at and
    the server time of the change, and emits one STATE_CHANGED event."""
    agent = await register(lifecycle, "worker")
    await clock.advance(3)
    observed = clock.now() - timedelta(seconds=1)
    updated = await lifecycle.UpdateAgentState(
        pb.UpdateAgentStateRequest(
            agent_id="worker",
            state=pb.AGENT_STATE_BUSY,
            details=rpc.struct(task="t-1", progress=0.5),
            observed_at=rpc.ts(observed),
        )
    )
    assert updated.state == pb.AGENT_STATE_BUSY
    assert dict(updated.state_details) == {"task": "t-1", "progress": 0.5}
    assert updated.revision > agent.revision
    assert updated.state_observed_at.ToDatetime(tzinfo=UTC) == observed
    assert updated.state_updated_at.ToDatetime(tzinfo=UTC) == clock.now()
    assert await get(lifecycle, "worker") == updated

    events = await rpc.replay(lifecycle, agent.revision, updated.revision)
    assert [(e.type, e.revision) for e in events] == [
        (pb.AGENT_EVENT_TYPE_STATE_CHANGED, updated.revision)
    ]
    assert events[0].agent == updated


@pytest.mark.parametrize(
    "state",
    [pb.AGENT_STATE_UNSPECIFIED, pb.AGENT_STATE_OFFLINE, 99],
    ids=["unspecified", "offline", "unknown-99"],
)
async def test_refused_states(lifecycle: Stub, rpc: Rpc, state: int) -> None:
    """UNSPECIFIED, OFFLINE (server-only) and unknown enum numbers are INVALID_ARGUMENT on
    field state, and the agent keeps its state."""
    agent = await register(lifecycle, "worker")
    failure = await rpc.fails(
        lifecycle.UpdateAgentState(pb.UpdateAgentStateRequest(agent_id="worker", state=state)),
        INVALID,
    )
    assert failure.fields == ["state"]
    assert await get(lifecycle, "worker") == agent


async def test_stale_report_is_refused_and_changes_nothing(
    lifecycle: Stub, rpc: Rpc, clock: FakeClock
) -> None:
    """A report observed before the newest accepted one is FAILED_PRECONDITION
    (STALE_STATE_REPORT) and leaves state and revision as they were; a report with the
    same observed_at is accepted."""
    await register(lifecycle, "worker")
    await clock.advance(10)
    observed = clock.now() - timedelta(seconds=5)
    accepted = await lifecycle.UpdateAgentState(
        pb.UpdateAgentStateRequest(
            agent_id="worker", state=pb.AGENT_STATE_IDLE, observed_at=rpc.ts(observed)
        )
    )
    failure = await rpc.fails(
        lifecycle.UpdateAgentState(
            pb.UpdateAgentStateRequest(
                agent_id="worker",
                state=pb.AGENT_STATE_ERROR,
                details=rpc.struct(why="late"),
                observed_at=rpc.ts(observed - timedelta(milliseconds=1)),
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert failure.reason == "STALE_STATE_REPORT"
    assert await get(lifecycle, "worker") == accepted

    same_time = await lifecycle.UpdateAgentState(
        pb.UpdateAgentStateRequest(
            agent_id="worker", state=pb.AGENT_STATE_BUSY, observed_at=rpc.ts(observed)
        )
    )
    assert same_time.state == pb.AGENT_STATE_BUSY
    assert same_time.revision > accepted.revision


async def test_missing_observed_at_means_server_time(
    lifecycle: Stub, rpc: Rpc, clock: FakeClock
) -> None:
    """Without observed_at the report counts as observed now, so a later explicit report
    dated before now is stale."""
    await register(lifecycle, "worker")
    await clock.advance(10)
    updated = await lifecycle.UpdateAgentState(
        pb.UpdateAgentStateRequest(agent_id="worker", state=pb.AGENT_STATE_IDLE)
    )
    assert updated.state_observed_at.ToDatetime(tzinfo=UTC) == clock.now()
    await rpc.fails(
        lifecycle.UpdateAgentState(
            pb.UpdateAgentStateRequest(
                agent_id="worker",
                state=pb.AGENT_STATE_BUSY,
                observed_at=rpc.ts(clock.now() - timedelta(seconds=1)),
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )


async def test_observed_at_too_far_in_future_is_refused(
    lifecycle: Stub, rpc: Rpc, clock: FakeClock
) -> None:
    """observed_at more than max_clock_skew (60 s) ahead is INVALID_ARGUMENT on field
    observed_at; within the skew it is accepted."""
    await register(lifecycle, "worker")
    failure = await rpc.fails(
        lifecycle.UpdateAgentState(
            pb.UpdateAgentStateRequest(
                agent_id="worker",
                state=pb.AGENT_STATE_IDLE,
                observed_at=rpc.ts(clock.now() + timedelta(seconds=61)),
            )
        ),
        INVALID,
    )
    assert failure.fields == ["observed_at"]
    assert (await get(lifecycle, "worker")).state == pb.AGENT_STATE_INITIALIZING

    ahead = clock.now() + timedelta(seconds=30)
    accepted = await lifecycle.UpdateAgentState(
        pb.UpdateAgentStateRequest(
            agent_id="worker", state=pb.AGENT_STATE_IDLE, observed_at=rpc.ts(ahead)
        )
    )
    assert accepted.state_observed_at.ToDatetime(tzinfo=UTC) == ahead


async def test_identical_report_is_silent(lifecycle: Stub, rpc: Rpc) -> None:
    """Repeating the same state and details keeps the revision and emits no event, while
    changing only the details is a change (new revision, STATE_CHANGED)."""
    await register(lifecycle, "worker")
    request = pb.UpdateAgentStateRequest(
        agent_id="worker", state=pb.AGENT_STATE_BUSY, details=rpc.struct(task="t-1")
    )
    first = await lifecycle.UpdateAgentState(request)
    again = await lifecycle.UpdateAgentState(request)
    assert again.revision == first.revision
    assert again.state == pb.AGENT_STATE_BUSY

    details_only = await lifecycle.UpdateAgentState(
        pb.UpdateAgentStateRequest(
            agent_id="worker", state=pb.AGENT_STATE_BUSY, details=rpc.struct(task="t-2")
        )
    )
    assert details_only.revision > first.revision
    assert dict(details_only.state_details) == {"task": "t-2"}

    events = await rpc.replay(lifecycle, first.revision, details_only.revision)
    assert [(e.type, e.revision) for e in events] == [
        (pb.AGENT_EVENT_TYPE_STATE_CHANGED, details_only.revision)
    ]


async def test_oversized_details_are_refused(lifecycle: Stub, rpc: Rpc) -> None:
    """state details above 16 KiB are INVALID_ARGUMENT on field details; ~8 KB is fine."""
    await register(lifecycle, "worker")
    failure = await rpc.fails(
        lifecycle.UpdateAgentState(
            pb.UpdateAgentStateRequest(
                agent_id="worker",
                state=pb.AGENT_STATE_BUSY,
                details=rpc.struct(blob="x" * (17 * 1024)),
            )
        ),
        INVALID,
    )
    assert failure.fields == ["details"]
    ok = await lifecycle.UpdateAgentState(
        pb.UpdateAgentStateRequest(
            agent_id="worker", state=pb.AGENT_STATE_BUSY, details=rpc.struct(blob="x" * 8000)
        )
    )
    assert len(ok.state_details["blob"]) == 8000


async def test_unknown_agent_is_not_found(lifecycle: Stub, rpc: Rpc) -> None:
    """State reports and heartbeats for an unknown agent are NOT_FOUND (AGENT_NOT_FOUND)."""
    failure = await rpc.fails(
        lifecycle.UpdateAgentState(
            pb.UpdateAgentStateRequest(agent_id="ghost", state=pb.AGENT_STATE_IDLE)
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert failure.reason == "AGENT_NOT_FOUND"
    failure = await rpc.fails(
        lifecycle.Heartbeat(pb.HeartbeatRequest(agent_id="ghost")), grpc.StatusCode.NOT_FOUND
    )
    assert failure.reason == "AGENT_NOT_FOUND"


async def test_heartbeat_reports_state_timeout_and_time(
    lifecycle: Stub, rpc: Rpc, clock: FakeClock
) -> None:
    """A heartbeat moves last_heartbeat_at to now and answers the agent's state, the
    liveness timeout and the server time."""
    await register(lifecycle, "worker")
    await lifecycle.UpdateAgentState(
        pb.UpdateAgentStateRequest(agent_id="worker", state=pb.AGENT_STATE_IDLE)
    )
    await clock.advance(12)
    reply = await lifecycle.Heartbeat(pb.HeartbeatRequest(agent_id="worker"))
    assert reply.state == pb.AGENT_STATE_IDLE
    assert reply.liveness_timeout_seconds == 30
    assert reply.server_time.ToDatetime(tzinfo=UTC) == clock.now()
    agent = await get(lifecycle, "worker")
    assert agent.last_heartbeat_at.ToDatetime(tzinfo=UTC) == clock.now()


async def test_silent_agent_goes_offline_others_stay(
    lifecycle: Stub, rpc: Rpc, clock: FakeClock
) -> None:
    """Past the liveness timeout a silent agent becomes OFFLINE with an OFFLINE event,
    while agents that heartbeat or report state in time keep their state."""
    silent = await register(lifecycle, "silent")
    await register(lifecycle, "beating")
    await register(lifecycle, "reporting")
    await clock.advance(20)
    await lifecycle.Heartbeat(pb.HeartbeatRequest(agent_id="beating"))
    reporting = await lifecycle.UpdateAgentState(
        pb.UpdateAgentStateRequest(agent_id="reporting", state=pb.AGENT_STATE_BUSY)
    )

    async def silent_offline() -> bool:
        return (await get(lifecycle, "silent")).state == pb.AGENT_STATE_OFFLINE

    # "beating" and "reporting" would only time out 50 s after the start.
    await rpc.advance_until(
        clock, silent_offline, first=11, step=5, limit=29, message="silent agent OFFLINE"
    )
    assert (await get(lifecycle, "beating")).state == pb.AGENT_STATE_INITIALIZING
    assert (await get(lifecycle, "reporting")).state == pb.AGENT_STATE_BUSY

    offline = await get(lifecycle, "silent")
    assert offline.revision > reporting.revision
    events = await rpc.replay(lifecycle, reporting.revision, offline.revision)
    assert [(e.type, e.agent.agent_id) for e in events] == [(pb.AGENT_EVENT_TYPE_OFFLINE, "silent")]
    assert events[0].agent.state == pb.AGENT_STATE_OFFLINE
    assert silent.state == pb.AGENT_STATE_INITIALIZING


async def test_offline_agent_comes_back_idle_on_heartbeat(
    lifecycle: Stub, rpc: Rpc, clock: FakeClock
) -> None:
    """An OFFLINE agent that heartbeats again is IDLE, announced by STATE_CHANGED."""
    await register(lifecycle, "flaky")
    await lifecycle.UpdateAgentState(
        pb.UpdateAgentStateRequest(agent_id="flaky", state=pb.AGENT_STATE_BUSY)
    )

    async def offline() -> bool:
        return (await get(lifecycle, "flaky")).state == pb.AGENT_STATE_OFFLINE

    await rpc.advance_until(clock, offline, first=31, step=5, limit=60, message="OFFLINE")
    went_offline = await get(lifecycle, "flaky")

    reply = await lifecycle.Heartbeat(pb.HeartbeatRequest(agent_id="flaky"))
    assert reply.state == pb.AGENT_STATE_IDLE
    back = await get(lifecycle, "flaky")
    assert back.state == pb.AGENT_STATE_IDLE
    assert back.revision > went_offline.revision

    events = await rpc.replay(lifecycle, went_offline.revision, back.revision)
    assert [(e.type, e.agent.state) for e in events] == [
        (pb.AGENT_EVENT_TYPE_STATE_CHANGED, pb.AGENT_STATE_IDLE)
    ]


# --------------------------------------------------------------------------- open streams

# An agent process that takes one task and works on it until killed.
HOLDING_AGENT = """
import asyncio, sys
from opscore.sdk import Agent, TaskContext

agent = Agent(sys.argv[1], agent_id=sys.argv[2], capabilities=["work"], max_in_flight=1)

@agent.handler("work")
async def work(ctx: TaskContext) -> None:
    await asyncio.Event().wait()

asyncio.run(agent.run())
"""


def when(stamp: timestamp_pb2.Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


async def agent_record(ops: Harness, agent_id: str) -> pb.Agent:
    return await ops.lifecycle.GetAgent(pb.GetAgentRequest(agent_id=agent_id))


async def wait_connected(ops: Harness, agent_id: str, connected: bool) -> pb.Agent:
    """Polls GetAgent until the server sees the agent's stream open (or closed)."""
    seen: list[pb.Agent] = []

    async def check() -> bool:
        seen[:] = [await agent_record(ops, agent_id)]
        return seen[0].connected is connected

    await eventually(check, within=10, message=f"agent {agent_id} connected={connected}")
    return seen[0]


@pytest.mark.opscore_settings(stream_grace=2)
async def test_agents_show_connected_free_slots_and_last_contact(
    ops: Harness, rpc: Rpc, clock: FakeClock
) -> None:
    """Get, List and Watch show whether an agent has a task stream open, its free slots
    and the server time of its last contact: now while the stream is open (however long
    since its last heartbeat), the moment it closed once it has."""
    conn = await ops.agent("worker", ["work"], max_in_flight=3, connect=False)
    registered = await agent_record(ops, "worker")
    assert (registered.connected, registered.free_slots) == (False, 0)
    assert registered.last_contact_at == registered.last_heartbeat_at
    watch = ops.lifecycle.WatchAgentStates(pb.WatchAgentStatesRequest(send_initial_state=True))
    try:
        snapshot = await rpc.read_events(watch, lambda events: len(events) >= 2)
        assert snapshot[0].agent.connected is False

        await conn.connect()
        (ready,) = await rpc.read_events(watch, lambda events: len(events) >= 1)
        assert (ready.type, ready.agent.state) == (
            pb.AGENT_EVENT_TYPE_STATE_CHANGED,
            pb.AGENT_STATE_IDLE,
        )
        assert (ready.agent.connected, ready.agent.free_slots) == (True, 3)

        await ops.start(single())
        await conn.next()
        await clock.advance(50)  # within the task's 60 s lease
        working = await agent_record(ops, "worker")
        assert (working.connected, working.free_slots) == (True, 2)
        assert when(working.last_contact_at) == clock.now()
        assert when(working.last_heartbeat_at) < clock.now()
        (listed,) = (await ops.lifecycle.ListAgents(pb.ListAgentsRequest())).agents
        assert (listed.connected, listed.free_slots) == (True, 2)
        assert when(listed.last_contact_at) == clock.now()

        await conn.disconnect()
        closed_at = clock.now()
        gone = await wait_connected(ops, "worker", False)
        assert (gone.state, gone.free_slots) == (pb.AGENT_STATE_IDLE, 0)
        await clock.advance(1)
        assert when((await agent_record(ops, "worker")).last_contact_at) == closed_at

        async def gone_offline() -> bool:
            return await ops.agent_state("worker") == pb.AGENT_STATE_OFFLINE

        await ops.tick_until(gone_offline, limit=10)
        (offline,) = await rpc.read_events(watch, lambda events: len(events) >= 1)
        assert offline.type == pb.AGENT_EVENT_TYPE_OFFLINE
        assert (offline.agent.connected, when(offline.agent.last_contact_at)) == (False, closed_at)
    finally:
        watch.cancel()


@pytest.mark.opscore_settings(stream_grace=2, liveness_timeout=3600)
async def test_closed_stream_goes_offline_after_the_grace(ops: Harness, rpc: Rpc) -> None:
    """An agent whose stream closes is OFFLINE (with an OFFLINE event) once the short
    grace has passed, long before the liveness timeout; one that opens a new stream
    within the grace stays as it was."""
    stays = await ops.agent("stays", ["work"])
    leaves = await ops.agent("leaves", ["work"])
    before = await agent_record(ops, "stays")
    last = (await agent_record(ops, "leaves")).revision
    await stays.disconnect()
    await leaves.disconnect()
    await wait_connected(ops, "stays", False)
    await wait_connected(ops, "leaves", False)
    await ops.tick(1)
    await stays.connect()
    await wait_connected(ops, "stays", True)

    async def left() -> bool:
        return await ops.agent_state("leaves") == pb.AGENT_STATE_OFFLINE

    assert await ops.tick_until(left, limit=60, step=0.5) < 60
    await ops.tick(30)
    after = await agent_record(ops, "stays")
    assert (after.state, after.revision) == (pb.AGENT_STATE_IDLE, before.revision)
    offline = await agent_record(ops, "leaves")
    events = await rpc.replay(ops.lifecycle, last, offline.revision)
    assert [(e.type, e.agent.agent_id) for e in events] == [(pb.AGENT_EVENT_TYPE_OFFLINE, "leaves")]


@pytest.mark.opscore_settings(stream_grace=2, liveness_timeout=3600)
async def test_killed_agent_process_goes_offline_after_the_grace(
    ops: Harness, wf_server: OpsCoreServer
) -> None:
    """A real SDK agent killed with SIGKILL while it works on a task: its stream closes
    at once, the agent is OFFLINE after the grace (not the liveness timeout), and its
    task is re-queued as a failed attempt."""
    await ops.define(single("held"))
    session = await ops.start("held")
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-c", HOLDING_AGENT, wf_server.address, "doomed"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        await ops.wait_status(session.session_id, S.SESSION_STATUS_RUNNING, within=30)
        working = await wait_connected(ops, "doomed", True)
        assert (working.state, working.free_slots) == (pb.AGENT_STATE_IDLE, 0)
    finally:
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
    assert (await wait_connected(ops, "doomed", False)).state == pb.AGENT_STATE_IDLE

    async def offline() -> bool:
        return await ops.agent_state("doomed") == pb.AGENT_STATE_OFFLINE

    assert await ops.tick_until(offline, limit=60, step=0.5) < 60
    history = await ops.wait_event(session.session_id, "TASK_QUEUED", count=2)
    assert "offline" in to_dict(of_type(history, "TASK_QUEUED")[-1].detail)["reason"]
