"""Dispatch: capability routing, max_in_flight slots, agent states, pinned runs, and
lost agents (a stream that closes and is not reopened within the grace, deregistration),
adoption of held attempts by a new stream (reconnect, server restart), and open
streams as liveness."""

from __future__ import annotations

from datetime import UTC
from typing import TYPE_CHECKING

import grpc
import pytest
from opspawn.opscore.v1 import lifecycle_pb2 as L
from opspawn.opscore.v1 import session_pb2 as S
from opspawn.opscore.v1 import workflow_pb2 as W
from workflow_support import (
    Harness,
    definition,
    eventually,
    of_type,
    single,
    task,
    task_of,
    to_dict,
)

if TYPE_CHECKING:
    from conftest import Rpc, StartServer

    from opscore.domain.clock import FakeClock
    from opscore.server.config import Settings

PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


async def test_tasks_go_only_to_agents_with_the_capability(ops: Harness) -> None:
    """Across several agents each task reaches only an agent that registered its
    capability; a task whose capability nobody has stays PENDING."""
    defn = definition(
        "routing",
        task("t_alpha", "alpha"),
        task("t_beta", "beta"),
        task("t_gamma", "gamma"),
        task("t_omega", "omega"),
    )
    alpha = await ops.agent("a", ["alpha"], max_in_flight=10)
    beta = await ops.agent("b", ["beta", "unused"], max_in_flight=10)
    multi = await ops.agent("g", ["gamma", "delta"], max_in_flight=10)
    sessions = [await ops.start(defn) for _ in range(3)]

    got = {
        "a": await alpha.take(3),
        "b": await beta.take(3),
        "g": await multi.take(3),
    }
    for agent in (alpha, beta, multi):
        await agent.expect_none(0.1)
    assert {a.task_id for a in got["a"]} == {"t_alpha"}
    assert {a.task_id for a in got["b"]} == {"t_beta"}
    assert {a.task_id for a in got["g"]} == {"t_gamma"}
    for assignments in got.values():
        assert {a.session_id for a in assignments} == {s.session_id for s in sessions}
    for session in sessions:
        current = await ops.session(session.session_id)
        assert task_of(current, "t_omega").status == S.TASK_STATUS_PENDING
        assert task_of(current, "t_omega").attempt == 0
        assert {t.agent_id for t in current.tasks if t.task_id != "t_omega"} == {"a", "b", "g"}


async def test_busy_agent_waits_for_a_free_slot(ops: Harness) -> None:
    """An agent with max_in_flight=1 and one unanswered task gets nothing more until it
    completes that task; then it receives the next one."""
    await ops.define(single("one"))
    agent = await ops.agent("solo", ["work"], max_in_flight=1)
    first = await ops.start("one")
    second = await ops.start("one")
    a1 = await agent.next()
    assert a1.session_id == first.session_id
    await agent.expect_none()
    waiting = await ops.session(second.session_id)
    assert task_of(waiting, "only").status == S.TASK_STATUS_PENDING
    await agent.complete(a1)
    a2 = await agent.next()
    assert a2.session_id == second.session_id


async def test_max_in_flight_bounds_concurrent_tasks(ops: Harness) -> None:
    """With max_in_flight=3 an agent holds three tasks at once; the fourth waits until a
    slot frees (a failure frees it just as a completion does), oldest run first."""
    await ops.define(single("one", retry={"max_attempts": 1}))
    agent = await ops.agent("triple", ["work"], max_in_flight=3)
    started = [await ops.start("one") for _ in range(5)]
    held = await agent.take(3)
    assert [a.session_id for a in held] == [s.session_id for s in started[:3]]
    await agent.expect_none()
    await agent.fail(held[1], "nope", retryable=False)
    fourth = await agent.next()
    assert fourth.session_id == started[3].session_id
    await agent.expect_none()
    await agent.complete(held[0])
    assert (await agent.next()).session_id == started[4].session_id


async def test_busy_state_with_free_slots_still_receives(ops: Harness) -> None:
    """An agent reporting BUSY still gets tasks into its free max_in_flight slots."""
    agent = await ops.agent("busy", ["work"], max_in_flight=2)
    await agent.set_state(L.AGENT_STATE_BUSY)
    await ops.start(single())
    await ops.start(single())
    assert len(await agent.take(2)) == 2


@pytest.mark.parametrize("state", [L.AGENT_STATE_DRAINING, L.AGENT_STATE_ERROR])
async def test_draining_or_error_agent_gets_nothing_until_idle(ops: Harness, state: int) -> None:
    """A DRAINING or ERROR agent receives no task even with free slots; the task waits
    PENDING and is delivered once the agent reports IDLE again."""
    agent = await ops.agent("shy", ["work"], max_in_flight=5)
    await agent.set_state(state)
    session = await ops.start(single())
    await agent.expect_none()
    assert task_of(await ops.session(session.session_id), "only").status == (S.TASK_STATUS_PENDING)
    await agent.set_state(L.AGENT_STATE_IDLE)
    assert (await agent.next()).session_id == session.session_id


async def test_tasks_wait_for_a_capable_agent_to_connect(ops: Harness) -> None:
    """Runs started while no capable agent is connected stay PENDING, then are all
    delivered, oldest first, once one connects."""
    await ops.define(single("later"))
    started = [await ops.start("later") for _ in range(3)]
    assert all(s.status == S.SESSION_STATUS_PENDING for s in started)
    agent = await ops.agent("late", ["work"], max_in_flight=5)
    got = await agent.take(3)
    assert [a.session_id for a in got] == [s.session_id for s in started]
    assert (await ops.session(started[0].session_id)).status == S.SESSION_STATUS_RUNNING


async def test_pinned_run_goes_only_to_its_agent(ops: Harness) -> None:
    """A run started with agent_id runs every task on that agent, even while another
    capable agent has free slots; unpinned runs may go to either."""
    await ops.define(definition("chain", task("a", next_task_id="b"), task("b")))
    other = await ops.agent("other", ["work"], max_in_flight=10)
    pinned = await ops.agent("pinned", ["work"], max_in_flight=10)
    session = await ops.start("chain", agent_id="pinned")
    assert session.agent_id == "pinned"
    a = await pinned.next()
    assert a.task_id == "a"
    await other.expect_none()
    await pinned.complete(a)
    b = await pinned.next()
    assert b.task_id == "b"
    await other.expect_none(0.1)
    await pinned.complete(b)
    done = await ops.wait_status(session.session_id, S.SESSION_STATUS_COMPLETED)
    assert {t.agent_id for t in done.tasks} == {"pinned"}


async def test_pinned_run_waits_for_its_busy_agent(ops: Harness) -> None:
    """A pinned run whose agent has no free slot waits rather than going elsewhere."""
    await ops.define(single("one"))
    pinned = await ops.agent("pinned", ["work"], max_in_flight=1)
    other = await ops.agent("other", ["work"], max_in_flight=5)
    first = await ops.start("one", agent_id="pinned")
    held = await pinned.next()
    second = await ops.start("one", agent_id="pinned")
    await other.expect_none()
    await pinned.complete(held)
    assert (await pinned.next()).session_id == second.session_id
    assert (await ops.session(first.session_id)).status == S.SESSION_STATUS_COMPLETED


async def test_backlog_pinned_to_a_busy_agent_does_not_hold_up_other_work(
    ops: Harness,
) -> None:
    """Ready tasks no free slot may take (pinned to a busy agent) do not hide work an
    idle agent could take, however many of them are queued ahead of it."""
    await ops.define(single("one"))
    busy = await ops.agent("busy", ["work"], max_in_flight=1)
    await ops.start("one")
    await busy.next()  # busy is full from here on
    for _ in range(30):  # more than one claim query's window
        await ops.start("one", agent_id="busy")
    late = await ops.start("one")
    assert (await ops.session(late.session_id)).status == S.SESSION_STATUS_PENDING
    idle = await ops.agent("idle", ["work"], max_in_flight=1)  # its stream opens a pass
    assert (await idle.next()).session_id == late.session_id


async def test_stream_tasks_refusals(ops: Harness, rpc: Rpc) -> None:
    """StreamTasks refuses an unknown agent (NOT_FOUND) and malformed requests
    (INVALID_ARGUMENT naming agent_id / max_in_flight / held_task_tokens, including a
    token this server did not issue), and the agent stays as it was."""
    await ops.agent("known", ["work"], connect=False)
    cases = [
        (W.StreamTasksRequest(agent_id="ghost"), grpc.StatusCode.NOT_FOUND, []),
        (W.StreamTasksRequest(agent_id=""), grpc.StatusCode.INVALID_ARGUMENT, ["agent_id"]),
        (
            W.StreamTasksRequest(agent_id="known", max_in_flight=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["max_in_flight"],
        ),
        (
            W.StreamTasksRequest(agent_id="bad id", max_in_flight=1001),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["agent_id", "max_in_flight"],
        ),
        (
            W.StreamTasksRequest(agent_id="known", held_task_tokens=["", "x" * 2000]),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["held_task_tokens[0]", "held_task_tokens[1]"],
        ),
        (
            W.StreamTasksRequest(agent_id="known", held_task_tokens=["forged.token"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["held_task_tokens[0]"],
        ),
    ]
    for request, code, fields in cases:
        call = ops.workflow.StreamTasks(request)
        try:
            failure = await rpc.fails(call.read(), code)
        finally:
            call.cancel()
        assert failure.fields == fields
    assert await ops.agent_state("known") == L.AGENT_STATE_INITIALIZING


# --------------------------------------------------------------------------- lost agents


async def agent_record(ops: Harness, agent_id: str) -> L.Agent:
    return await ops.lifecycle.GetAgent(L.GetAgentRequest(agent_id=agent_id))


async def wait_connected(ops: Harness, agent_id: str, connected: bool) -> L.Agent:
    """Polls GetAgent until the server sees the agent's stream open (or closed)."""
    seen: list[L.Agent] = []

    async def check() -> bool:
        seen[:] = [await agent_record(ops, agent_id)]
        return seen[0].connected is connected

    await eventually(check, message=f"agent {agent_id} connected={connected}")
    return seen[0]


async def test_disconnect_mid_task_requeues_after_the_grace(ops: Harness, rpc: Rpc) -> None:
    """When an agent's stream drops with a task unanswered, the task stays its own
    through the stream grace (no other agent gets it); once the grace passes without a
    new stream the agent is OFFLINE and the task is re-queued as a failed attempt and
    delivered to another capable agent as attempt 2; the lost attempt's token is
    refused."""
    first = await ops.agent("first", ["work"])
    session = await ops.start(single("dc"))
    lost = await first.next()
    second = await ops.agent("second", ["work"])

    await first.disconnect()
    gone = await wait_connected(ops, "first", False)
    assert gone.state == L.AGENT_STATE_IDLE
    await second.expect_none()
    only = task_of(await ops.session(session.session_id), "only")
    assert (only.agent_id, only.attempt, only.status) == ("first", 1, S.TASK_STATUS_DISPATCHED)

    async def offline() -> bool:
        return await ops.agent_state("first") == L.AGENT_STATE_OFFLINE

    assert await ops.tick_until(offline, limit=30, step=1) >= 5  # the default grace
    redelivered = await second.next()
    assert (redelivered.task_id, redelivered.attempt) == ("only", 2)
    current = await ops.session(session.session_id)
    only = task_of(current, "only")
    assert (only.agent_id, only.attempt, only.status) == ("second", 2, S.TASK_STATUS_DISPATCHED)
    history = await ops.events(session.session_id)
    requeued = of_type(history, "TASK_QUEUED")[-1]
    assert "offline" in to_dict(requeued.detail)["reason"]
    assert [(e.agent_id, e.attempt) for e in of_type(history, "TASK_DISPATCHED")] == [
        ("first", 1),
        ("second", 2),
    ]
    failure = await rpc.fails(
        ops.workflow.CompleteTask(W.CompleteTaskRequest(task_token=lost.task_token)),
        PRECONDITION,
    )
    assert failure.reason == "ATTEMPT_ENDED"
    await second.complete(redelivered)
    await ops.wait_status(session.session_id, S.SESSION_STATUS_COMPLETED)


async def test_disconnect_on_last_attempt_fails_the_session(ops: Harness) -> None:
    """An agent lost with its task counts as a failed attempt: with max_attempts=1 the
    session FAILS once the grace has passed."""
    agent = await ops.agent("fragile", ["work"])
    session = await ops.start(single("last", retry={"max_attempts": 1}))
    await agent.next()
    await agent.disconnect()
    await wait_connected(ops, "fragile", False)

    async def failed() -> bool:
        return (await ops.session(session.session_id)).status == S.SESSION_STATUS_FAILED

    await ops.tick_until(failed, limit=30, step=1)
    current = await ops.session(session.session_id)
    assert "offline" in current.error
    assert current.error.startswith("task only failed")


async def test_reconnect_within_the_grace_adopts_the_held_task(ops: Harness) -> None:
    """An agent whose stream drops and comes back within the grace, naming the task it
    still runs, keeps it: it is not dispatched again, the new stream shows no free slot
    while the task runs, the first attempt's answer is accepted and frees the slot, and
    the agent never goes OFFLINE."""
    agent = await ops.agent("flappy", ["work"], max_in_flight=1)
    session = await ops.start(single())
    first = await agent.next()
    await agent.disconnect()
    await wait_connected(ops, "flappy", False)
    await ops.tick(3)  # within the 5 s grace
    await agent.connect(held=[first])
    back = await wait_connected(ops, "flappy", True)
    assert (back.state, back.free_slots) == (L.AGENT_STATE_IDLE, 0)
    await ops.tick(30)  # long past the grace
    assert await ops.agent_state("flappy") == L.AGENT_STATE_IDLE

    later = await ops.start(single())
    await agent.expect_none()  # its one slot is the adopted attempt's
    await agent.complete(first)
    assert (await agent.next()).session_id == later.session_id
    done = await ops.wait_status(session.session_id, S.SESSION_STATUS_COMPLETED)
    assert task_of(done, "only").attempt == 1
    assert len(of_type(await ops.events(session.session_id), "TASK_DISPATCHED")) == 1


async def test_reconnect_without_a_task_gives_it_back_under_the_same_attempt(
    ops: Harness,
) -> None:
    """A task the store says the agent holds but its new stream does not name never
    reached a handler: it goes back to the queue under the same attempt number and is
    delivered again, as attempt 1."""
    agent = await ops.agent("forgetful", ["work"], max_in_flight=1)
    session = await ops.start(single())
    await agent.next()
    await agent.disconnect()
    await wait_connected(ops, "forgetful", False)
    await agent.connect()
    again = await agent.next()
    assert (again.session_id, again.attempt) == (session.session_id, 1)
    await agent.complete(again)
    done = await ops.wait_status(session.session_id, S.SESSION_STATUS_COMPLETED)
    assert task_of(done, "only").attempt == 1
    history = await ops.events(session.session_id)
    assert "reconnected without it" in to_dict(of_type(history, "TASK_QUEUED")[-1].detail)["reason"]
    assert of_type(history, "TASK_FAILED") == []


async def test_adopted_tasks_beyond_max_in_flight_leave_no_free_slot(ops: Harness) -> None:
    """An agent that comes back with a smaller max_in_flight than the attempts it holds
    gets nothing new until enough of them have ended."""
    await ops.define(single("one"))
    agent = await ops.agent("shrinking", ["work"], max_in_flight=2)
    started = [await ops.start("one") for _ in range(2)]
    held = await agent.take(2)
    await agent.disconnect()
    await wait_connected(ops, "shrinking", False)
    await agent.connect(max_in_flight=1, held=held)
    assert (await wait_connected(ops, "shrinking", True)).free_slots == 0
    waiting = await ops.start("one")
    await agent.expect_none()
    await agent.complete(held[0])
    await agent.expect_none()  # the other adopted attempt fills its one slot
    assert (await agent_record(ops, "shrinking")).free_slots == 0
    await agent.complete(held[1])
    assert (await agent.next()).session_id == waiting.session_id
    for session in started:
        await ops.wait_status(session.session_id, S.SESSION_STATUS_COMPLETED)


async def test_restart_keeps_valid_leases_and_accepts_their_answers(
    start_server: StartServer, wf_settings: Settings, clock: FakeClock
) -> None:
    """A server restart dispatches no task whose lease is still valid: the agent's new
    stream adopts the attempt (no free slot while it runs), and the first attempt's
    answer, given after the restart, is accepted."""
    server = await start_server(wf_settings, clock)
    async with grpc.aio.insecure_channel(server.address) as channel:
        ops = Harness(channel, clock)
        agent = await ops.agent("steady", ["work"], max_in_flight=1)
        session = await ops.start(single("restart"))
        held = await agent.next()
        await server.stop(grace=0)
        await ops.close()

    again = await start_server(wf_settings, clock)
    async with grpc.aio.insecure_channel(again.address) as channel:
        ops = Harness(channel, clock)
        agent = await ops.agent("steady", ["work"], max_in_flight=1, connect=False)
        await agent.connect(held=[held])
        assert (await wait_connected(ops, "steady", True)).free_slots == 0
        later = await ops.start(single("restart"))
        await agent.expect_none()
        only = task_of(await ops.session(session.session_id), "only")
        assert (only.status, only.attempt) == (S.TASK_STATUS_DISPATCHED, 1)
        await agent.complete(held)
        assert (await agent.next()).session_id == later.session_id
        done = await ops.wait_status(session.session_id, S.SESSION_STATUS_COMPLETED)
        assert task_of(done, "only").attempt == 1
        assert len(of_type(await ops.events(session.session_id), "TASK_DISPATCHED")) == 1
        await ops.close()


async def test_deregistered_agent_loses_its_tasks(ops: Harness) -> None:
    """Deregistering an agent ends its stream (NOT_FOUND) and re-queues its leased task
    to another capable agent."""
    doomed = await ops.agent("doomed", ["work"])
    session = await ops.start(single())
    await doomed.next()
    heir = await ops.agent("heir", ["work"])
    await ops.lifecycle.DeregisterAgent(L.DeregisterAgentRequest(agent_id="doomed"))
    redelivered = await heir.next()
    assert (redelivered.session_id, redelivered.attempt) == (session.session_id, 2)
    assert doomed.error is not None
    assert doomed.error.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.opscore_settings(liveness_timeout=30, liveness_check_interval=5)
async def test_open_stream_is_contact_however_long_the_handler_runs(ops: Harness) -> None:
    """An agent whose stream is open stays IDLE and keeps its task while its handler
    runs for three liveness timeouts without an agent heartbeat (only the task's lease
    is renewed, as the SDK does); an agent without a stream, as silent, goes OFFLINE."""
    busy = await ops.agent("busy", ["work"])
    await ops.agent("silent", ["other"], connect=False)
    session = await ops.start(single("long"))
    held = await busy.next()
    for _ in range(18):  # 90 s
        await ops.tick(5, step=5)
        await busy.heartbeat(held)
    await ops.wait_agent_state("silent", L.AGENT_STATE_OFFLINE)
    record = await agent_record(ops, "busy")
    assert (record.state, record.connected, record.free_slots) == (L.AGENT_STATE_IDLE, True, 0)
    assert record.last_contact_at.ToDatetime(tzinfo=UTC) == ops.clock.now()
    await busy.complete(held)
    done = await ops.wait_status(session.session_id, S.SESSION_STATUS_COMPLETED)
    assert task_of(done, "only").attempt == 1
