"""Dispatch: capability routing, max_in_flight slots, agent states, pinned runs, and
lost agents (stream disconnect, deregistration, liveness OFFLINE)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import pytest
from opspawn.opscore.v1 import lifecycle_pb2 as L
from opspawn.opscore.v1 import session_pb2 as S
from opspawn.opscore.v1 import workflow_pb2 as W
from workflow_support import definition, of_type, single, task, task_of, to_dict

if TYPE_CHECKING:
    from conftest import Rpc
    from workflow_support import Harness

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
    (INVALID_ARGUMENT naming agent_id / max_in_flight)."""
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
    ]
    for request, code, fields in cases:
        call = ops.workflow.StreamTasks(request)
        try:
            failure = await rpc.fails(call.read(), code)
        finally:
            call.cancel()
        assert failure.fields == fields


# --------------------------------------------------------------------------- lost agents


async def test_disconnect_mid_task_requeues_to_another_agent(ops: Harness, rpc: Rpc) -> None:
    """When an agent's stream drops with a task unanswered, the task is re-queued at once
    (no clock movement) as a failed attempt and delivered to another capable agent as
    attempt 2; the lost attempt's token is refused."""
    first = await ops.agent("first", ["work"])
    session = await ops.start(single("dc"))
    lost = await first.next()
    second = await ops.agent("second", ["work"])
    await second.expect_none(0.1)

    await first.disconnect()
    redelivered = await second.next()
    assert (redelivered.task_id, redelivered.attempt) == ("only", 2)
    current = await ops.session(session.session_id)
    only = task_of(current, "only")
    assert (only.agent_id, only.attempt, only.status) == ("second", 2, S.TASK_STATUS_DISPATCHED)
    history = await ops.events(session.session_id)
    requeued = of_type(history, "TASK_QUEUED")[-1]
    assert "disconnect" in to_dict(requeued.detail)["reason"]
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
    """A disconnect counts as a failed attempt: with max_attempts=1 the session FAILS."""
    agent = await ops.agent("fragile", ["work"])
    session = await ops.start(single("last", retry={"max_attempts": 1}))
    await agent.next()
    await agent.disconnect()
    failed = await ops.wait_status(session.session_id, S.SESSION_STATUS_FAILED)
    assert "disconnected" in failed.error
    assert failed.error.startswith("task only failed")


async def test_reconnecting_agent_gets_its_requeued_task(ops: Harness) -> None:
    """An agent that drops and opens a new stream receives the re-queued task again
    (higher attempt) when it is the only capable agent."""
    agent = await ops.agent("flappy", ["work"])
    session = await ops.start(single())
    first = await agent.next()
    await agent.disconnect()
    await agent.connect()
    again = await agent.next()
    assert (again.session_id, again.task_id) == (first.session_id, first.task_id)
    assert again.attempt == 2
    await agent.complete(again)
    await ops.wait_status(session.session_id, S.SESSION_STATUS_COMPLETED)


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
async def test_offline_agent_loses_its_tasks_until_it_returns(ops: Harness) -> None:
    """An agent that stops heartbeating goes OFFLINE: its leased task is re-queued to a
    live agent, and it gets no work while OFFLINE even with its stream open; after a
    heartbeat brings it back it receives tasks again."""
    silent = await ops.agent("silent", ["work"], max_in_flight=5)
    session = await ops.start(single("off"))
    held = await silent.next()
    assert held.attempt == 1
    live = await ops.agent("live", ["work"], max_in_flight=1)

    async def keep_live() -> bool:
        await ops.lifecycle.Heartbeat(L.HeartbeatRequest(agent_id="live"))
        return await ops.agent_state("silent") == L.AGENT_STATE_OFFLINE

    await ops.tick_until(keep_live, limit=60, step=5)
    redelivered = await live.next()
    assert (redelivered.session_id, redelivered.attempt) == (session.session_id, 2)

    third = await ops.start(single("off"))
    await silent.expect_none()
    await ops.lifecycle.Heartbeat(L.HeartbeatRequest(agent_id="silent"))
    assert (await silent.next()).session_id == third.session_id
