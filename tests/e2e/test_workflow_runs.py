"""Workflow runs end to end: the sample two-step workflow, fan-out/fan-in, starting runs
(idempotency, inline definitions, versions, pins), failures and retries with backoff,
leases and heartbeats, and task tokens (forged, stale, duplicate)."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import grpc
import pytest
from opspawn.opscore.v1 import session_pb2 as S
from opspawn.opscore.v1 import workflow_pb2 as W
from workflow_support import (
    EXAMPLES,
    at,
    definition,
    event_types,
    of_type,
    single,
    task,
    task_of,
    to_dict,
)

from opscore.protocol.definition_files import load_definition

if TYPE_CHECKING:
    from conftest import Rpc
    from workflow_support import Harness

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


async def test_sample_two_step_workflow_runs_to_completion(ops: Harness) -> None:
    """The prototype's sample workflow, loaded from its JSON file, runs on two agents:
    step_1 on the test_capability agent, then step_2 on the other with step_1's output
    under payload.upstream.step_1; the session completes with step_2's output."""
    await ops.define(load_definition(EXAMPLES / "sample_workflow.json"))
    first = await ops.agent("agent-1", ["test_capability"])
    second = await ops.agent("agent-2", ["another_capability"])

    started = await ops.start("sample_workflow_id", {"user": "ada", "n": 1})
    assert started.workflow_definition_id == "sample_workflow_id"
    assert started.workflow_definition_version == "1.0"
    assert to_dict(started.input) == {"user": "ada", "n": 1.0}

    a1 = await first.next()
    assert (a1.task_id, a1.session_id, a1.workflow_id, a1.attempt) == (
        "step_1",
        started.session_id,
        "sample_workflow_id",
        1,
    )
    assert (a1.name, a1.agent_capability) == ("First Step", "test_capability")
    assert to_dict(a1.payload) == {
        "parameters": {"message": "This is the first step."},
        "input": {"user": "ada", "n": 1.0},
        "upstream": {},
    }
    assert at(a1.deadline) == ops.clock.now() + timedelta(seconds=60)  # type: ignore[union-attr]
    assert a1.lease.ToTimedelta() == timedelta(seconds=60)
    await second.expect_none()
    running = await ops.session(started.session_id)
    assert running.status == S.SESSION_STATUS_RUNNING
    assert task_of(running, "step_1").status == S.TASK_STATUS_DISPATCHED
    assert task_of(running, "step_2").status == S.TASK_STATUS_PENDING

    await first.complete(a1, {"summary": "hello", "tokens": 42})
    a2 = await second.next()
    assert (a2.task_id, a2.attempt) == ("step_2", 1)
    assert to_dict(a2.payload) == {
        "parameters": {"value": 123.0},
        "input": {"user": "ada", "n": 1.0},
        "upstream": {"step_1": {"summary": "hello", "tokens": 42.0}},
    }
    await second.complete(a2, {"result": "done"})

    done = await ops.wait_status(started.session_id, S.SESSION_STATUS_COMPLETED)
    assert to_dict(done.output) == {"step_2": {"result": "done"}}
    assert done.HasField("ended_at")
    assert not done.error
    assert [(t.task_id, t.status, t.attempt, t.agent_id) for t in done.tasks] == [
        ("step_1", S.TASK_STATUS_COMPLETED, 1, "agent-1"),
        ("step_2", S.TASK_STATUS_COMPLETED, 1, "agent-2"),
    ]
    assert to_dict(task_of(done, "step_1").output) == {"summary": "hello", "tokens": 42.0}
    history = await ops.events(started.session_id)
    assert event_types(history) == [
        "CREATED",
        "TASK_QUEUED",
        "TASK_DISPATCHED",
        "TASK_COMPLETED",
        "TASK_QUEUED",
        "TASK_DISPATCHED",
        "TASK_COMPLETED",
        "SESSION_COMPLETED",
    ]
    assert [e.task_id for e in history[1:7]] == ["step_1"] * 3 + ["step_2"] * 3
    await first.expect_none(0.05)


async def test_fan_out_fan_in(ops: Harness) -> None:
    """The fan-out/fan-in example: after fetch, summarize and translate are both
    dispatched before either completes; publish waits for both and receives both
    outputs; the session's output is publish's output."""
    await ops.define(load_definition(EXAMPLES / "fan_out_fan_in.yaml"))
    fetcher = await ops.agent("fetcher", ["fetch"])
    summarizer = await ops.agent("summarizer", ["summarize"])
    translator = await ops.agent("translator", ["translate"])
    publisher = await ops.agent("publisher", ["publish"])

    session = await ops.start("research_digest", {"doc": 7})
    fetch = await fetcher.next()
    assert fetch.task_id == "fetch"
    assert to_dict(fetch.payload)["parameters"] == {"url": "https://example.com/paper.pdf"}
    await fetcher.complete(fetch, {"text": "bonjour"})

    summarize = await summarizer.next()
    translate = await translator.next()
    assert (summarize.task_id, translate.task_id) == ("summarize", "translate")
    assert to_dict(summarize.payload)["upstream"] == {"fetch": {"text": "bonjour"}}
    assert to_dict(translate.payload)["parameters"] == {"language": "fr"}
    mid = await ops.session(session.session_id)
    assert task_of(mid, "summarize").status == S.TASK_STATUS_DISPATCHED
    assert task_of(mid, "translate").status == S.TASK_STATUS_DISPATCHED
    assert task_of(mid, "publish").status == S.TASK_STATUS_PENDING

    await summarizer.complete(summarize, {"summary": "short"})
    await publisher.expect_none()
    await translator.complete(translate, {"fr": "court"})
    publish = await publisher.next()
    assert to_dict(publish.payload)["upstream"] == {
        "summarize": {"summary": "short"},
        "translate": {"fr": "court"},
    }
    await publisher.complete(publish, {"url": "https://x/1"})
    done = await ops.wait_status(session.session_id, S.SESSION_STATUS_COMPLETED)
    assert to_dict(done.output) == {"publish": {"url": "https://x/1"}}
    history = await ops.events(session.session_id)
    dispatched = [e.task_id for e in of_type(history, "TASK_DISPATCHED")]
    assert dispatched[0] == "fetch"
    assert set(dispatched[1:3]) == {"summarize", "translate"}
    assert dispatched[3] == "publish"
    first_completion = min(
        e.sequence for e in of_type(history, "TASK_COMPLETED") if e.task_id != "fetch"
    )
    assert all(
        e.sequence < first_completion
        for e in of_type(history, "TASK_DISPATCHED")
        if e.task_id in ("summarize", "translate")
    )


async def test_outputs_of_every_final_task_make_the_session_output(ops: Harness) -> None:
    """With two independent branches, the session output holds both final tasks'
    outputs keyed by task_id (and not the intermediate one)."""
    defn = definition("branches", task("a", next_task_id="b"), task("b"), task("c"))
    agent = await ops.agent("w", ["work"], max_in_flight=2)
    session = await ops.start(defn)
    for assignment in await agent.take(2):
        await agent.complete(assignment, {"from": assignment.task_id})
    last = await agent.next()
    assert last.task_id == "b"
    await agent.complete(last, {"from": "b"})
    done = await ops.wait_status(session.session_id, S.SESSION_STATUS_COMPLETED)
    assert to_dict(done.output) == {"b": {"from": "b"}, "c": {"from": "c"}}


# --------------------------------------------------------------------------- starting runs


async def test_request_id_makes_start_idempotent(ops: Harness) -> None:
    """Retrying StartWorkflow with the same request_id returns the first session and
    starts nothing new; another request_id starts another session."""
    await ops.define(single("idem"))
    agent = await ops.agent("w", ["work"], max_in_flight=5)
    first = await ops.start("idem", {"try": 1}, request_id="req-1")
    again = await ops.start("idem", {"try": 2}, request_id="req-1")
    assert again.session_id == first.session_id
    assert to_dict(again.input) == {"try": 1.0}
    assignment = await agent.next()
    await agent.expect_none()
    await agent.complete(assignment)
    await ops.wait_status(first.session_id, S.SESSION_STATUS_COMPLETED)
    after_end = await ops.start("idem", request_id="req-1")
    assert after_end.session_id == first.session_id
    assert after_end.status == S.SESSION_STATUS_COMPLETED
    assert [s.session_id for s in await ops.list_all()] == [first.session_id]
    assert len(of_type(await ops.events(first.session_id), "CREATED")) == 1

    other = await ops.start("idem", request_id="req-2")
    assert other.session_id != first.session_id
    assert (await agent.next()).session_id == other.session_id


async def test_inline_definition_runs(ops: Harness) -> None:
    """A run given its definition inline (never stored) runs like a stored one."""
    agent = await ops.agent("w", ["work"])
    defn = definition("adhoc", task("x", parameters={"p": True}), version="7")
    session = await ops.start(defn, {"i": "n"})
    assert session.status == S.SESSION_STATUS_PENDING or session.status == (
        S.SESSION_STATUS_RUNNING
    )
    assert (session.workflow_definition_id, session.workflow_definition_version) == ("adhoc", "7")
    assignment = await agent.next()
    assert to_dict(assignment.payload) == {
        "parameters": {"p": True},
        "input": {"i": "n"},
        "upstream": {},
    }
    await agent.complete(assignment, {"ok": 1})
    await ops.wait_status(session.session_id, S.SESSION_STATUS_COMPLETED)
    listed = await ops.workflow.ListWorkflowDefinitions(W.ListWorkflowDefinitionsRequest())
    assert list(listed.definitions) == []


async def test_start_picks_newest_or_requested_version(ops: Harness) -> None:
    """Without a version the newest definition runs; with one, that version runs."""
    await ops.define(definition("ver", task("old"), version="1"))
    await ops.define(definition("ver", task("new"), version="2"))
    agent = await ops.agent("w", ["work"])
    newest = await ops.start("ver")
    assert newest.workflow_definition_version == "2"
    assert [t.task_id for t in newest.tasks] == ["new"]
    assert (await agent.next()).task_id == "new"
    pinned = await ops.start("ver", workflow_definition_version="1")
    assert pinned.workflow_definition_version == "1"
    assert [t.task_id for t in pinned.tasks] == ["old"]


async def test_start_refusals(ops: Harness, rpc: Rpc) -> None:
    """StartWorkflow refuses: no definition source or malformed fields
    (INVALID_ARGUMENT), unknown definition or version or pinned agent (NOT_FOUND), and a
    pinned agent lacking a needed capability (FAILED_PRECONDITION); nothing starts."""
    await ops.define(definition("two", task("a", "cap_a"), task("b", "cap_b")))
    await ops.agent("half", ["cap_a"], connect=False)

    failure = await rpc.fails(ops.workflow.StartWorkflow(W.StartWorkflowRequest()), INVALID)
    assert failure.fields == ["workflow_definition_id"]
    failure = await rpc.fails(ops.start("bad id!"), INVALID)
    assert failure.fields == ["workflow_definition_id"]
    failure = await rpc.fails(ops.start("two", agent_id="-x", request_id="r" * 257), INVALID)
    assert set(failure.fields) == {"agent_id", "request_id"}

    failure = await rpc.fails(ops.start("missing"), NOT_FOUND)
    assert failure.reason == "WORKFLOW_DEFINITION_NOT_FOUND"
    await rpc.fails(ops.start("two", workflow_definition_version="9"), NOT_FOUND)
    failure = await rpc.fails(ops.start("two", agent_id="ghost"), NOT_FOUND)
    assert failure.reason == "AGENT_NOT_FOUND"
    failure = await rpc.fails(ops.start("two", agent_id="half"), PRECONDITION)
    assert "cap_b" in failure.message
    assert await ops.list_all() == []


# --------------------------------------------------------------------------- failures


async def test_non_retryable_failure_fails_session_and_cancels_the_rest(
    ops: Harness, rpc: Rpc
) -> None:
    """FailTask(retryable=false) fails the task and the session at once (error "task X
    failed: ..."); the sibling still in flight is CANCELLED (its heartbeat says
    cancel_requested, its completion is refused) and the pending one never runs."""
    await ops.define(load_definition(EXAMPLES / "fan_out_fan_in.yaml"))
    agent = await ops.agent("all", ["fetch", "summarize", "translate", "publish"], 2)
    session = await ops.start("research_digest")
    fetch = await agent.next()
    await agent.complete(fetch, {"text": "t"})
    by_id = {a.task_id: a for a in await agent.take(2)}
    await agent.fail(by_id["summarize"], "bad input", retryable=False)

    failed = await ops.wait_status(session.session_id, S.SESSION_STATUS_FAILED)
    assert failed.error == "task summarize failed: bad input"
    assert failed.HasField("ended_at")
    statuses = {t.task_id: t.status for t in failed.tasks}
    assert statuses == {
        "fetch": S.TASK_STATUS_COMPLETED,
        "summarize": S.TASK_STATUS_FAILED,
        "translate": S.TASK_STATUS_CANCELLED,
        "publish": S.TASK_STATUS_CANCELLED,
    }
    assert task_of(failed, "summarize").error == "bad input"
    assert task_of(failed, "summarize").attempt == 1

    beat = await agent.heartbeat(by_id["translate"])
    assert beat.cancel_requested
    failure = await rpc.fails(agent.complete(by_id["translate"]), PRECONDITION)
    assert failure.reason == "ATTEMPT_ENDED"
    history = await ops.events(session.session_id)
    assert event_types(history)[-4:] == [
        "TASK_FAILED",
        "TASK_CANCELLED",
        "TASK_CANCELLED",
        "SESSION_FAILED",
    ]
    assert to_dict(of_type(history, "TASK_FAILED")[0].detail) == {
        "error": "bad input",
        "retryable": False,
    }
    assert not of_type(history, "TASK_RETRY_SCHEDULED")
    await agent.expect_none()


async def test_retries_back_off_with_jitter_then_fail_the_session(ops: Harness) -> None:
    """A task failing every attempt is retried after growing delays (initial 2s x3:
    each within [0.8, 1] x nominal, read from TASK_RETRY_SCHEDULED), is never
    redelivered before its delay has passed, and after max_attempts (4) the session
    FAILS with the last error."""
    assert ops.clock is not None
    defn = single(
        "flaky", retry={"max_attempts": 4, "initial_interval": 2, "backoff_coefficient": 3}
    )
    agent = await ops.agent("w", ["work"])
    session = await ops.start(defn)
    sid = session.session_id
    delays: list[float] = []
    for attempt in range(1, 5):
        assignment = await agent.next()
        assert (assignment.task_id, assignment.attempt) == ("only", attempt)
        await agent.fail(assignment, f"attempt {attempt} broke", retryable=True)
        if attempt == 4:
            break
        history = await ops.wait_event(sid, "TASK_RETRY_SCHEDULED", attempt)
        scheduled = of_type(history, "TASK_RETRY_SCHEDULED")[-1]
        detail = to_dict(scheduled.detail)
        assert detail["next_attempt"] == attempt + 1
        delay = detail["delay_seconds"]
        nominal = 2 * 3 ** (attempt - 1)
        assert 0.8 * nominal - 1e-6 <= delay <= nominal + 1e-6, (attempt, delay)
        delays.append(delay)
        waiting = task_of(await ops.session(sid), "only")
        assert waiting.status == S.TASK_STATUS_RETRY_WAIT
        assert waiting.error == f"attempt {attempt} broke"

        failed_at = at(scheduled.occurred_at)
        await ops.tick(delay - 0.2)
        await agent.expect_none(0.15)
        await ops.tick_until(lambda: agent.pending() > 0, limit=2)
        redispatch = of_type(await ops.events(sid), "TASK_DISPATCHED")[-1]
        assert redispatch.attempt == attempt + 1
        assert at(redispatch.occurred_at) - failed_at >= timedelta(seconds=delay)  # type: ignore[operator]

    assert delays == sorted(delays)
    assert delays[0] < delays[1] < delays[2]
    failed = await ops.wait_status(sid, S.SESSION_STATUS_FAILED)
    assert failed.error == "task only failed: attempt 4 broke"
    only = task_of(failed, "only")
    assert (only.status, only.attempt) == (S.TASK_STATUS_FAILED, 4)
    history = await ops.events(sid)
    assert len(of_type(history, "TASK_FAILED")) == 4
    assert len(of_type(history, "TASK_RETRY_SCHEDULED")) == 3
    assert event_types(history)[-1] == "SESSION_FAILED"
    await ops.clock.advance(60)  # type: ignore[union-attr]
    await agent.expect_none(0.1)


async def test_retry_delay_is_capped_by_maximum_interval(ops: Harness) -> None:
    """Backoff never exceeds maximum_interval: 2s x10 capped at 5s gives [1.6, 2] then
    [4, 5] seconds."""
    defn = single(
        "capped",
        retry={
            "max_attempts": 3,
            "initial_interval": 2,
            "backoff_coefficient": 10,
            "maximum_interval": 5,
        },
    )
    agent = await ops.agent("w", ["work"])
    session = await ops.start(defn)
    for attempt in (1, 2):
        assignment = await agent.next()
        await agent.fail(assignment, "again")
        history = await ops.wait_event(session.session_id, "TASK_RETRY_SCHEDULED", attempt)
        delay = to_dict(of_type(history, "TASK_RETRY_SCHEDULED")[-1].detail)["delay_seconds"]
        await ops.tick(delay - 0.5)
        await ops.tick_until(lambda: agent.pending() > 0, limit=3)
    delays = [to_dict(e.detail)["delay_seconds"] for e in of_type(history, "TASK_RETRY_SCHEDULED")]
    assert 1.6 <= delays[0] <= 2.0
    assert 4.0 <= delays[1] <= 5.0


# --------------------------------------------------------------------------- leases


async def test_lease_expiry_redelivers_the_task(ops: Harness, rpc: Rpc) -> None:
    """A task not answered within its 5s timeout times out (TASK_TIMED_OUT, HEARTBEAT),
    is retried after the backoff as attempt 2, and the first attempt's answers are
    then refused FAILED_PRECONDITION / ATTEMPT_ENDED and counted in the history."""
    defn = single("lease", timeout=5, retry={"initial_interval": 1})
    agent = await ops.agent("w", ["work"])
    session = await ops.start(defn)
    first = await agent.next()
    assert at(first.deadline) == ops.clock.now() + timedelta(seconds=5)  # type: ignore[union-attr]
    assert first.lease.ToTimedelta() == timedelta(seconds=5)

    await ops.tick(4.5)
    assert task_of(await ops.session(session.session_id), "only").status == (
        S.TASK_STATUS_DISPATCHED
    )
    await ops.tick_until(lambda: agent.pending() > 0, limit=5)
    second = await agent.next()
    assert (second.task_id, second.attempt) == ("only", 2)

    history = await ops.events(session.session_id)
    assert event_types(history) == [
        "CREATED",
        "TASK_QUEUED",
        "TASK_DISPATCHED",
        "TASK_TIMED_OUT",
        "TASK_RETRY_SCHEDULED",
        "TASK_DISPATCHED",
    ]
    assert history[3].attempt == 1
    assert history[3].timeout_type == S.TIMEOUT_TYPE_HEARTBEAT
    for call in (agent.complete(first), agent.heartbeat(first), agent.fail(first)):
        failure = await rpc.fails(call, PRECONDITION)
        assert failure.reason == "ATTEMPT_ENDED"
        assert "superseded by attempt 2" in failure.message
    await agent.complete(second, {"late": False})
    done = await ops.wait_status(session.session_id, S.SESSION_STATUS_COMPLETED)
    assert task_of(done, "only").attempt == 2
    refused = of_type(await ops.events(session.session_id), "TASK_ANSWER_REFUSED")
    assert [(e.attempt, to_dict(e.detail)["answer"]) for e in refused] == [
        (1, "completed"),
        (1, "failed"),
    ]


async def test_heartbeat_extends_the_lease(ops: Harness) -> None:
    """HeartbeatTask moves the deadline to now + timeout (task RUNNING, TASK_HEARTBEAT
    recorded), so the task outlives its first deadline; without further heartbeats it
    expires after the extended one."""
    assert ops.clock is not None
    agent = await ops.agent("w", ["work"])
    session = await ops.start(single("beat", timeout=5, retry={"max_attempts": 1}))
    assignment = await agent.next()
    await ops.tick(4)
    beat = await agent.heartbeat(assignment)
    assert not beat.cancel_requested
    assert at(beat.deadline) == ops.clock.now() + timedelta(seconds=5)
    running = await ops.session(session.session_id)
    assert task_of(running, "only").status == S.TASK_STATUS_RUNNING
    assert len(of_type(await ops.events(session.session_id), "TASK_HEARTBEAT")) == 1

    await ops.tick(4)  # 8s after dispatch: past the first deadline, before the new one
    still = await ops.session(session.session_id)
    assert still.status == S.SESSION_STATUS_RUNNING
    assert task_of(still, "only").status == S.TASK_STATUS_RUNNING

    async def failed() -> bool:
        return (await ops.session(session.session_id)).status == S.SESSION_STATUS_FAILED

    moved = await ops.tick_until(failed, limit=5)
    assert moved >= 1
    ended = await ops.session(session.session_id)
    assert ended.error == "task only failed: heartbeat timeout of 5s reached"
    assert event_types(await ops.events(session.session_id))[-2:] == [
        "TASK_TIMED_OUT",
        "SESSION_FAILED",
    ]


# --------------------------------------------------------------------------- tokens


@pytest.mark.parametrize("token", ["garbage", "abc.def", "e30.AAAA", "%%%"])
async def test_forged_tokens_are_invalid_argument(ops: Harness, rpc: Rpc, token: str) -> None:
    """Complete/Fail/HeartbeatTask with a token the server never issued are refused
    INVALID_ARGUMENT on field task_token."""
    calls = [
        ops.workflow.CompleteTask(W.CompleteTaskRequest(task_token=token)),
        ops.workflow.FailTask(W.FailTaskRequest(task_token=token)),
        ops.workflow.HeartbeatTask(W.HeartbeatTaskRequest(task_token=token)),
    ]
    for call in calls:
        failure = await rpc.fails(call, INVALID)
        assert failure.fields == ["task_token"]


async def test_tampered_and_missing_tokens_are_invalid_argument(ops: Harness, rpc: Rpc) -> None:
    """A real token with its body or signature altered, or no token at all, is
    INVALID_ARGUMENT; the genuine token still works afterwards."""
    agent = await ops.agent("w", ["work"])
    session = await ops.start(single("tamper"))
    assignment = await agent.next()
    body, _, signature = assignment.task_token.partition(".")
    flipped = "A" if body[-1] != "A" else "B"
    forged = [
        f"{body[:-1]}{flipped}.{signature}",
        f"{body}.{signature[::-1]}",
        body,
        "",
    ]
    for token in forged:
        failure = await rpc.fails(
            ops.workflow.CompleteTask(W.CompleteTaskRequest(task_token=token)), INVALID
        )
        assert failure.fields == ["task_token"]
    await agent.complete(assignment)
    await ops.wait_status(session.session_id, S.SESSION_STATUS_COMPLETED)


async def test_duplicate_and_stale_answers(ops: Harness, rpc: Rpc) -> None:
    """Completing (or failing) the same attempt twice is OK and records nothing more;
    the other answer for an ended attempt and any answer with a superseded attempt's
    token are FAILED_PRECONDITION / ATTEMPT_ENDED."""
    agent = await ops.agent("w", ["work"])
    session = await ops.start(
        definition("dup", task("a", retry={"initial_interval": 1}), task("b", depends_on=["a"]))
    )
    sid = session.session_id
    first = await agent.next()
    await agent.fail(first, "flaky")
    count = len(await ops.events(sid))
    await agent.fail(first, "flaky")
    assert len(await ops.events(sid)) == count
    failure = await rpc.fails(agent.complete(first), PRECONDITION)
    assert failure.reason == "ATTEMPT_ENDED"

    await ops.tick_until(lambda: agent.pending() > 0, limit=3)
    second = await agent.next()
    assert second.attempt == 2
    for call in (agent.complete(first), agent.fail(first), agent.heartbeat(first)):
        failure = await rpc.fails(call, PRECONDITION)
        assert failure.reason == "ATTEMPT_ENDED"

    await agent.complete(second, {"v": 1})
    b = await agent.next()  # b is dispatched once a completes; read history after that
    history = await ops.events(sid)
    await agent.complete(second, {"v": 2})
    assert await ops.events(sid) == history
    assert len(of_type(history, "TASK_COMPLETED")) == 1
    assert to_dict(task_of(await ops.session(sid), "a").output) == {"v": 1.0}
    failure = await rpc.fails(agent.fail(second), PRECONDITION)
    assert failure.reason == "ATTEMPT_ENDED"
    failure = await rpc.fails(agent.heartbeat(second), PRECONDITION)
    assert failure.reason == "ATTEMPT_ENDED"

    await agent.complete(b)
    await ops.wait_status(sid, S.SESSION_STATUS_COMPLETED)
