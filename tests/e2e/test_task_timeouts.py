"""Task time limits (start_to_close, heartbeat, schedule_to_start) and why a task waits,
end to end on a real server with a fake clock: what a definition says, what an agent
receives, what the history records, and what GetSession shows."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import grpc
import pytest
from workflow_support import (
    S,
    W,
    at,
    definition,
    duration,
    event_types,
    of_type,
    single,
    task,
    task_of,
    to_dict,
)

if TYPE_CHECKING:
    from conftest import Rpc
    from workflow_support import Harness

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


async def test_start_to_close_ends_an_attempt_that_keeps_heartbeating(ops: Harness) -> None:
    """An attempt that heartbeats every 2s still ends at its 6s start_to_close limit:
    TASK_TIMED_OUT (START_TO_CLOSE), then the retry policy's next attempt."""
    assert ops.clock is not None
    defn = single(
        "s2c",
        timeouts={"start_to_close": 6, "heartbeat": 4},
        retry={"max_attempts": 2, "initial_interval": 1},
    )
    agent = await ops.agent("w", ["work"])
    session = await ops.start(defn)
    first = await agent.next()
    dispatched = ops.clock.now()
    assert at(first.attempt_deadline) == dispatched + timedelta(seconds=6)
    assert first.start_to_close.ToTimedelta() == timedelta(seconds=6)
    assert first.lease.ToTimedelta() == timedelta(seconds=4)
    assert first.max_attempts == 2
    for _ in range(2):
        await ops.tick(2)
        beat = await agent.heartbeat(first)
    # The lease never reaches past the attempt's deadline.
    assert at(beat.deadline) == dispatched + timedelta(seconds=6)
    await ops.tick_until(lambda: agent.pending() > 0, limit=5)
    second = await agent.next()
    assert second.attempt == 2
    history = await ops.events(session.session_id)
    timed_out = of_type(history, "TASK_TIMED_OUT")
    assert [(e.attempt, e.timeout_type) for e in timed_out] == [(1, S.TIMEOUT_TYPE_START_TO_CLOSE)]
    assert to_dict(timed_out[0].detail)["error"] == "start_to_close timeout of 6s reached"
    await agent.complete(second)
    await ops.wait_status(session.session_id, S.SESSION_STATUS_COMPLETED)


async def test_an_answer_after_the_deadline_is_refused_and_the_timeout_recorded(
    ops: Harness, rpc: Rpc
) -> None:
    """A completion that arrives after the lease ended, before the scheduler looked,
    is refused (ATTEMPT_ENDED), and the history says the attempt timed out."""
    assert ops.clock is not None
    agent = await ops.agent("w", ["work"])
    session = await ops.start(single("late", timeout=5, retry={"max_attempts": 1}))
    assignment = await agent.next()
    await ops.clock.advance(6)  # no pause: the scheduler has not run yet
    failure = await rpc.fails(agent.complete(assignment), PRECONDITION)
    assert failure.reason == "ATTEMPT_ENDED"
    ended = await ops.wait_status(session.session_id, S.SESSION_STATUS_FAILED)
    assert ended.error == "task only failed: heartbeat timeout of 5s reached"
    assert event_types(await ops.events(session.session_id))[-2:] == [
        "TASK_TIMED_OUT",
        "SESSION_FAILED",
    ]


async def test_schedule_to_start_fails_a_task_no_agent_takes(ops: Harness) -> None:
    """With no capable agent, a task with schedule_to_start 10s times out
    (SCHEDULE_TO_START) after 10s without any attempt; out of attempts, the session
    fails saying why."""
    session = await ops.start(
        single("s2s", "nobody", timeouts={"schedule_to_start": 10}, retry={"max_attempts": 1})
    )
    await ops.tick(9.5)
    assert (await ops.session(session.session_id)).status == S.SESSION_STATUS_PENDING

    async def failed() -> bool:
        return (await ops.session(session.session_id)).status == S.SESSION_STATUS_FAILED

    await ops.tick_until(failed, limit=3)
    ended = await ops.session(session.session_id)
    assert ended.error == "task only failed: schedule_to_start timeout of 10s reached"
    assert task_of(ended, "only").attempt == 0
    timed_out = of_type(await ops.events(session.session_id), "TASK_TIMED_OUT")
    assert [e.timeout_type for e in timed_out] == [S.TIMEOUT_TYPE_SCHEDULE_TO_START]


async def test_workflow_defaults_apply_and_a_task_overrides_them(ops: Harness) -> None:
    """task_timeouts are every task's defaults; a task's own limits win; the stored
    definition reads back with both."""
    defn = definition(
        "defaults",
        task("a", next_task_id="b"),
        task("b", timeouts={"start_to_close": 30}),
        task_timeouts=W.TaskTimeouts(start_to_close=duration(120), heartbeat=duration(20)),
    )
    stored = await ops.define(defn)
    assert stored.task_timeouts.start_to_close.ToTimedelta() == timedelta(seconds=120)
    by_id = {t.task_id: t for t in stored.tasks}
    assert by_id["a"].timeouts.start_to_close.ToTimedelta() == timedelta(seconds=120)
    assert by_id["b"].timeouts.start_to_close.ToTimedelta() == timedelta(seconds=30)
    assert by_id["b"].timeouts.heartbeat.ToTimedelta() == timedelta(seconds=20)
    assert by_id["b"].timeout.ToTimedelta() == timedelta(seconds=20)
    assert not by_id["b"].timeouts.HasField("schedule_to_start")
    agent = await ops.agent("w", ["work"])
    await ops.start("defaults")
    a = await agent.next()
    assert a.start_to_close.ToTimedelta() == timedelta(seconds=120)
    assert a.lease.ToTimedelta() == timedelta(seconds=20)
    await agent.complete(a)
    b = await agent.next()
    assert b.start_to_close.ToTimedelta() == timedelta(seconds=30)


@pytest.mark.parametrize(
    ("timeouts", "field"),
    [
        ({"start_to_close": 0}, "definition.tasks[0].timeouts.start_to_close"),
        ({"schedule_to_start": -1}, "definition.tasks[0].timeouts.schedule_to_start"),
        ({"heartbeat": 10**9}, "definition.tasks[0].timeout"),
        ({"heartbeat": 7}, "definition.tasks[0].timeout"),  # differs from timeout=5
    ],
)
async def test_bad_limits_are_invalid_argument(
    ops: Harness, rpc: Rpc, timeouts: dict[str, float], field: str
) -> None:
    """Zero, negative, too long, or two different heartbeat limits: INVALID_ARGUMENT
    naming the field, and nothing is stored."""
    failure = await rpc.fails(ops.define(single("bad", timeout=5, timeouts=timeouts)), INVALID)
    assert field in failure.fields
    listed = await ops.workflow.ListWorkflowDefinitions(W.ListWorkflowDefinitionsRequest())
    assert list(listed.definitions) == []


async def test_a_pending_task_says_why_it_waits(ops: Harness) -> None:
    """No capable agent, then all capable agents busy, then a retry's backoff, and a
    task behind its dependency: each is the waiting_reason GetSession shows, and the
    TASK_QUEUED event of the watch carries the reason at queue time."""
    assert ops.clock is not None
    defn = definition(
        "why",
        task("a", next_task_id="b", retry={"initial_interval": 30}),
        task("b"),
    )
    first = await ops.start(defn)
    shown = await ops.session(first.session_id)
    a, b = task_of(shown, "a"), task_of(shown, "b")
    assert a.waiting_reason == S.WAITING_REASON_NO_CAPABLE_AGENT
    assert a.waiting_message == "no connected agent with capability 'work' takes work"
    assert b.waiting_reason == S.WAITING_REASON_DEPENDENCIES
    assert a.max_attempts == 3
    queued = of_type(await ops.events(first.session_id), "TASK_QUEUED")
    assert to_dict(queued[0].detail)["waiting_reason"] == "NO_CAPABLE_AGENT"

    agent = await ops.agent("w", ["work"])  # max_in_flight 1: takes first's task a
    held = await agent.next()
    second = await ops.start(defn)
    waiting = task_of(await ops.session(second.session_id), "a")
    assert waiting.waiting_reason == S.WAITING_REASON_AGENTS_BUSY
    assert waiting.waiting_message == "all 1 connected agents with capability 'work' are busy"
    queued = of_type(await ops.events(second.session_id), "TASK_QUEUED")
    assert to_dict(queued[0].detail)["waiting_reason"] == "AGENTS_BUSY"

    await agent.fail(held, "flaky")
    backing_off = task_of(await ops.session(first.session_id), "a")
    assert backing_off.status == S.TASK_STATUS_RETRY_WAIT
    assert backing_off.waiting_reason == S.WAITING_REASON_BACKOFF
    assert at(backing_off.ready_at) > ops.clock.now()
    await agent.next()  # the freed slot takes the second session's task
    running = task_of(await ops.session(second.session_id), "a")
    assert running.waiting_reason == S.WAITING_REASON_UNSPECIFIED
