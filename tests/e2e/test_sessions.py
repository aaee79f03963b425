"""SessionService: reading a run (status, tasks, timestamps), listing with filters and
stable paging, cancelling, the event history, live watch with resume, and retention."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from opspawn.opscore.v1 import session_pb2 as S
from workflow_support import at, definition, event_types, of_type, single, task, task_of, to_dict

from opscore.protocol.limits import MAX_ERROR_MESSAGE_LENGTH, MAX_SESSION_EVENT_BYTES
from opscore.store.sqlite import store as sqlite_store

if TYPE_CHECKING:
    from conftest import Rpc
    from workflow_support import Harness

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
READ = 5.0


async def read_events(call: Any, count: int, within: float = READ) -> list[S.SessionEvent]:
    """Reads exactly `count` events from a WatchSession call."""
    events: list[S.SessionEvent] = []
    for _ in range(count):
        event = await asyncio.wait_for(call.read(), within)
        assert event is not grpc.aio.EOF, f"watch ended after {len(events)} events"
        events.append(event)
    return events


async def read_to_end(call: Any, within: float = READ) -> list[S.SessionEvent]:
    """Reads a WatchSession call until it ends; asserts it ended with OK."""
    events: list[S.SessionEvent] = []
    while True:
        event = await asyncio.wait_for(call.read(), within)
        if event is grpc.aio.EOF:
            break
        events.append(event)
    assert await call.code() == grpc.StatusCode.OK
    return events


# --------------------------------------------------------------------------- GetSession


async def test_session_moves_pending_running_completed(ops: Harness) -> None:
    """GetSession follows a run: PENDING with no attempt before any agent, RUNNING with
    the agent and attempt once dispatched (RUNNING task after a heartbeat), COMPLETED with
    outputs and ended_at; created/updated/ended_at follow the (fake) clock."""
    clock = ops.clock
    assert clock is not None
    t0 = clock.now()
    started = await ops.start(single("life"), {"q": "x"})
    sid = started.session_id
    pending = await ops.session(sid)
    assert pending.status == S.SESSION_STATUS_PENDING
    assert at(pending.created_at) == t0
    assert at(pending.updated_at) == t0
    assert not pending.HasField("ended_at")
    only = task_of(pending, "only")
    assert (only.status, only.attempt, only.agent_id) == (S.TASK_STATUS_PENDING, 0, "")
    assert (only.name, only.agent_capability) == ("only", "work")
    assert to_dict(pending.input) == {"q": "x"}
    assert pending == started

    await clock.advance(2)
    agent = await ops.agent("runner", ["work"])
    assignment = await agent.next()
    running = await ops.session(sid)
    assert running.status == S.SESSION_STATUS_RUNNING
    assert at(running.updated_at) == t0 + timedelta(seconds=2)
    only = task_of(running, "only")
    assert (only.status, only.attempt, only.agent_id) == (S.TASK_STATUS_DISPATCHED, 1, "runner")
    assert at(only.updated_at) == t0 + timedelta(seconds=2)

    await clock.advance(1)
    await agent.heartbeat(assignment)
    assert task_of(await ops.session(sid), "only").status == S.TASK_STATUS_RUNNING

    await clock.advance(1)
    await agent.complete(assignment, {"answer": 42})
    done = await ops.session(sid)
    assert done.status == S.SESSION_STATUS_COMPLETED
    assert at(done.ended_at) == t0 + timedelta(seconds=4)
    assert at(done.updated_at) == t0 + timedelta(seconds=4)
    assert at(done.created_at) == t0
    assert to_dict(task_of(done, "only").output) == {"answer": 42.0}
    assert to_dict(done.output) == {"only": {"answer": 42.0}}
    assert not done.error


async def test_get_session_refusals(ops: Harness, rpc: Rpc) -> None:
    """GetSession: unknown id is NOT_FOUND (SESSION_NOT_FOUND), a missing or malformed
    id INVALID_ARGUMENT on session_id."""
    failure = await rpc.fails(ops.session("no-such-session"), NOT_FOUND)
    assert failure.reason == "SESSION_NOT_FOUND"
    for bad in ("", "has space", "-x"):
        failure = await rpc.fails(ops.session(bad), INVALID)
        assert failure.fields == ["session_id"]


# --------------------------------------------------------------------------- ListSessions


async def _five_sessions(ops: Harness) -> list[str]:
    """s1 COMPLETED (wf.a), s2 PENDING (wf.b), s3 RUNNING (wf.a, pinned to p1),
    s4 CANCELLED (wf.b), s5 FAILED (wf.a); returns their ids in creation order."""
    await ops.define(single("wf.a", "work"))
    await ops.define(single("wf.b", "nobody_has_it"))
    agent = await ops.agent("p1", ["work"], max_in_flight=10)
    s1 = (await ops.start("wf.a")).session_id
    await agent.complete(await agent.next())
    s2 = (await ops.start("wf.b")).session_id
    s3 = (await ops.start("wf.a", agent_id="p1")).session_id
    await agent.next()
    s4 = (await ops.start("wf.b")).session_id
    await ops.sessions.CancelSession(S.CancelSessionRequest(session_id=s4))
    s5 = (await ops.start("wf.a")).session_id
    await agent.fail(await agent.next(), "fatal", retryable=False)
    await ops.wait_status(s1, S.SESSION_STATUS_COMPLETED)
    await ops.wait_status(s5, S.SESSION_STATUS_FAILED)
    return [s1, s2, s3, s4, s5]


async def test_list_sessions_newest_first_with_filters(ops: Harness) -> None:
    """ListSessions returns newest first and filters by statuses (any of), definition
    id and pinned agent, alone or combined."""
    s1, s2, s3, s4, s5 = await _five_sessions(ops)

    async def ids(**filters: Any) -> list[str]:
        return [s.session_id for s in await ops.list_all(**filters)]

    assert await ids() == [s5, s4, s3, s2, s1]
    assert await ids(statuses=[S.SESSION_STATUS_COMPLETED]) == [s1]
    assert await ids(statuses=[S.SESSION_STATUS_PENDING, S.SESSION_STATUS_CANCELLED]) == [s4, s2]
    assert await ids(statuses=[S.SESSION_STATUS_RUNNING]) == [s3]
    assert await ids(statuses=[S.SESSION_STATUS_FAILED]) == [s5]
    assert await ids(workflow_definition_id="wf.b") == [s4, s2]
    assert await ids(workflow_definition_id="wf.a") == [s5, s3, s1]
    assert await ids(agent_id="p1") == [s3]
    assert await ids(workflow_definition_id="wf.a", statuses=[S.SESSION_STATUS_FAILED]) == [s5]
    assert await ids(workflow_definition_id="wf.b", statuses=[S.SESSION_STATUS_RUNNING]) == []
    assert await ids(workflow_definition_id="wf.zzz") == []
    assert await ids(agent_id="other") == []
    assert await ids(page_size=2) == [s5, s4, s3, s2, s1]
    assert await ids(page_size=1, workflow_definition_id="wf.a") == [s5, s3, s1]
    listed = (await ops.list_all())[0]
    assert listed == await ops.session(s5)


async def test_list_sessions_refusals(ops: Harness, rpc: Rpc) -> None:
    """Unknown or UNSPECIFIED statuses, malformed ids, a negative page size, a garbage
    token or a token reused with other filters are INVALID_ARGUMENT naming the field."""
    await ops.define(single("wf"))
    for _ in range(3):
        await ops.start("wf")
    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({"statuses": [99]}, ["statuses[0]"]),
        ({"statuses": [S.SESSION_STATUS_RUNNING, 0]}, ["statuses[1]"]),
        ({"workflow_definition_id": "bad id"}, ["workflow_definition_id"]),
        ({"agent_id": "-a"}, ["agent_id"]),
        ({"page_size": -1}, ["page_size"]),
        ({"page_token": "garbage!"}, ["page_token"]),
    ]
    for request, fields in cases:
        failure = await rpc.fails(
            ops.sessions.ListSessions(S.ListSessionsRequest(**request)), INVALID
        )
        assert failure.fields == fields, request
    page = await ops.sessions.ListSessions(S.ListSessionsRequest(page_size=1))
    assert page.next_page_token
    failure = await rpc.fails(
        ops.sessions.ListSessions(
            S.ListSessionsRequest(page_token=page.next_page_token, workflow_definition_id="wf")
        ),
        INVALID,
    )
    assert failure.fields == ["page_token"]


async def test_list_paging_is_stable_under_concurrent_inserts(ops: Harness) -> None:
    """Sessions started while a client pages through the list neither shift nor repeat
    entries: the pages together hold every session that existed when paging began,
    once each, newest first."""
    await ops.define(single("wf"))
    before = [(await ops.start("wf")).session_id for _ in range(8)]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await ops.sessions.ListSessions(S.ListSessionsRequest(page_size=3, page_token=token))
        seen.extend(s.session_id for s in page.sessions)
        pages += 1
        # Others keep starting runs meanwhile.
        await asyncio.gather(*(ops.start("wf") for _ in range(2)))
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert len(seen) == len(set(seen))
    assert seen == list(reversed(before))
    assert len(await ops.list_all()) == 8 + 2 * pages


# --------------------------------------------------------------------------- CancelSession


async def test_cancel_running_session(ops: Harness, rpc: Rpc) -> None:
    """CancelSession cancels every open task: queued ones are never delivered, the
    running one's heartbeat returns cancel_requested and its late answers are refused;
    the session is CANCELLED with the reason, and cannot be cancelled again."""
    defn = definition("cancel", task("a"), task("b", depends_on=["a"]), task("c", "nobody_has_it"))
    agent = await ops.agent("w", ["work"])
    session = await ops.start(defn)
    sid = session.session_id
    running = await agent.next()
    await agent.heartbeat(running)
    assert ops.clock is not None
    await ops.clock.advance(3)

    cancelled = await ops.sessions.CancelSession(
        S.CancelSessionRequest(session_id=sid, reason="operator said so")
    )
    assert cancelled.status == S.SESSION_STATUS_CANCELLED
    assert cancelled.error == "operator said so"
    assert at(cancelled.ended_at) == ops.clock.now()
    assert {t.status for t in cancelled.tasks} == {S.TASK_STATUS_CANCELLED}
    assert await ops.session(sid) == cancelled

    beat = await agent.heartbeat(running)
    assert beat.cancel_requested
    for call in (agent.complete(running, {"late": True}), agent.fail(running, "late")):
        failure = await rpc.fails(call, PRECONDITION)
        assert failure.reason == "ATTEMPT_ENDED"
    history = await ops.events(sid)
    tail = history[-4:]
    assert event_types(tail) == ["TASK_CANCELLED"] * 3 + ["SESSION_CANCELLED"]
    assert {e.task_id for e in tail[:3]} == {"a", "b", "c"}
    assert to_dict(tail[3].detail) == {"reason": "operator said so"}
    assert not of_type(history, "TASK_COMPLETED")

    late = await ops.agent("late", ["nobody_has_it"])
    await late.expect_none()
    failure = await rpc.fails(
        ops.sessions.CancelSession(S.CancelSessionRequest(session_id=sid)), PRECONDITION
    )
    assert failure.reason == "INVALID_STATE"
    assert await ops.events(sid) == history


async def test_cancel_pending_session_and_default_reason(ops: Harness) -> None:
    """A session cancelled before any dispatch never reaches an agent that connects
    later; without a reason its error reads "cancelled"."""
    session = await ops.start(single())
    cancelled = await ops.sessions.CancelSession(
        S.CancelSessionRequest(session_id=session.session_id)
    )
    assert cancelled.status == S.SESSION_STATUS_CANCELLED
    assert cancelled.error == "cancelled"
    assert task_of(cancelled, "only").attempt == 0
    agent = await ops.agent("w", ["work"])
    await agent.expect_none()


async def test_cancel_while_waiting_for_a_retry(ops: Harness, rpc: Rpc) -> None:
    """A session cancelled while its task waits out a retry backoff is never retried:
    the task ends CANCELLED and nothing reaches the agent after the delay passes."""
    agent = await ops.agent("w", ["work"])
    session = await ops.start(single())
    first = await agent.next()
    await agent.fail(first, "flaky", retryable=True)
    waiting = await ops.wait_status(session.session_id, S.SESSION_STATUS_RUNNING)
    assert task_of(waiting, "only").status == S.TASK_STATUS_RETRY_WAIT
    cancelled = await ops.sessions.CancelSession(
        S.CancelSessionRequest(session_id=session.session_id, reason="enough")
    )
    assert cancelled.status == S.SESSION_STATUS_CANCELLED
    assert task_of(cancelled, "only").status == S.TASK_STATUS_CANCELLED
    await ops.tick(5)
    await agent.expect_none()
    history = await ops.events(session.session_id)
    assert event_types(history)[-2:] == ["TASK_CANCELLED", "SESSION_CANCELLED"]
    assert len(of_type(history, "TASK_DISPATCHED")) == 1


async def test_cancel_refusals(ops: Harness, rpc: Rpc) -> None:
    """Cancelling a finished session is FAILED_PRECONDITION (and changes nothing); an
    unknown one NOT_FOUND; a missing id or an over-long reason INVALID_ARGUMENT."""
    agent = await ops.agent("w", ["work"])
    session = await ops.start(single())
    await agent.complete(await agent.next())
    done = await ops.wait_status(session.session_id, S.SESSION_STATUS_COMPLETED)
    await rpc.fails(
        ops.sessions.CancelSession(S.CancelSessionRequest(session_id=session.session_id)),
        PRECONDITION,
    )
    assert await ops.session(session.session_id) == done
    failure = await rpc.fails(
        ops.sessions.CancelSession(S.CancelSessionRequest(session_id="ghost")), NOT_FOUND
    )
    assert failure.reason == "SESSION_NOT_FOUND"
    failure = await rpc.fails(
        ops.sessions.CancelSession(S.CancelSessionRequest(session_id="", reason="r" * 1025)),
        INVALID,
    )
    assert set(failure.fields) == {"session_id", "reason"}


# --------------------------------------------------------------------------- history


async def test_event_history_is_gap_free_and_pages(ops: Harness) -> None:
    """ListSessionEvents returns the run's history with sequences 1..n without gaps,
    each event carrying session, task, attempt, agent and the clock time; paging with a
    small page size yields the same list."""
    assert ops.clock is not None
    agent = await ops.agent("w", ["work"])
    session = await ops.start(
        definition("hist", task("a", retry={"initial_interval": 1}), task("b", depends_on=["a"]))
    )
    sid = session.session_id
    first = await agent.next()
    await agent.heartbeat(first)
    await agent.fail(first, "transient")
    await ops.tick_until(lambda: agent.pending() > 0, limit=3)
    await agent.complete(await agent.next(), {"a": 1})
    await agent.complete(await agent.next(), {"b": 2})
    await ops.wait_status(sid, S.SESSION_STATUS_COMPLETED)

    history = await ops.events(sid)
    assert [e.sequence for e in history] == list(range(1, len(history) + 1))
    assert {e.session_id for e in history} == {sid}
    assert event_types(history) == [
        "CREATED",
        "TASK_QUEUED",
        "TASK_DISPATCHED",
        "TASK_HEARTBEAT",
        "TASK_FAILED",
        "TASK_RETRY_SCHEDULED",
        "TASK_DISPATCHED",
        "TASK_COMPLETED",
        "TASK_QUEUED",
        "TASK_DISPATCHED",
        "TASK_COMPLETED",
        "SESSION_COMPLETED",
    ]
    assert to_dict(history[0].detail) == {"workflow_definition_id": "hist"}
    assert [(e.task_id, e.attempt, e.agent_id) for e in of_type(history, "TASK_DISPATCHED")] == [
        ("a", 1, "w"),
        ("a", 2, "w"),
        ("b", 1, "w"),
    ]
    assert to_dict(history[4].detail) == {"error": "transient", "retryable": True}
    retry = to_dict(history[5].detail)
    assert retry["next_attempt"] == 2
    assert 0.8 <= retry["delay_seconds"] <= 1.0
    times = [at(e.occurred_at) for e in history]
    assert times == sorted(times)
    assert times[-1] == ops.clock.now()

    for size in (1, 2, 5):
        assert await ops.events(sid, page_size=size) == history


async def test_event_history_refusals(ops: Harness, rpc: Rpc) -> None:
    """ListSessionEvents: unknown session NOT_FOUND; missing id, negative page size, or a
    token from another session's history INVALID_ARGUMENT."""
    one = await ops.start(single())
    two = await ops.start(single())
    await rpc.fails(
        ops.sessions.ListSessionEvents(S.ListSessionEventsRequest(session_id="ghost")), NOT_FOUND
    )
    for request, field in [
        (S.ListSessionEventsRequest(session_id=""), "session_id"),
        (S.ListSessionEventsRequest(session_id=one.session_id, page_size=-3), "page_size"),
    ]:
        failure = await rpc.fails(ops.sessions.ListSessionEvents(request), INVALID)
        assert failure.fields == [field]
    page = await ops.sessions.ListSessionEvents(
        S.ListSessionEventsRequest(session_id=one.session_id, page_size=1)
    )
    failure = await rpc.fails(
        ops.sessions.ListSessionEvents(
            S.ListSessionEventsRequest(session_id=two.session_id, page_token=page.next_page_token)
        ),
        INVALID,
    )
    assert failure.fields == ["page_token"]


# --------------------------------------------------------------------------- WatchSession


async def test_watch_replays_then_streams_live_and_ends(ops: Harness) -> None:
    """A watch from 0 replays the history so far, then streams new events as they
    happen, and ends cleanly (OK) right after the terminal event."""
    session = await ops.start(single())
    sid = session.session_id
    call = ops.sessions.WatchSession(S.WatchSessionRequest(session_id=sid))
    replayed = await read_events(call, 2)
    assert event_types(replayed) == ["CREATED", "TASK_QUEUED"]

    agent = await ops.agent("w", ["work"])
    assignment = await agent.next()
    live = await read_events(call, 1)
    assert event_types(live) == ["TASK_DISPATCHED"]
    assert (live[0].agent_id, live[0].attempt) == ("w", 1)
    await agent.complete(assignment)
    rest = await read_to_end(call)
    assert event_types(rest) == ["TASK_COMPLETED", "SESSION_COMPLETED"]
    assert replayed + live + rest == await ops.events(sid)


async def test_watch_from_a_sequence_and_of_a_finished_session(ops: Harness) -> None:
    """since_sequence replays only later events; watching a finished session replays
    its history and ends at once."""
    agent = await ops.agent("w", ["work"])
    session = await ops.start(single())
    await agent.complete(await agent.next())
    await ops.wait_status(session.session_id, S.SESSION_STATUS_COMPLETED)
    history = await ops.events(session.session_id)

    whole = await read_to_end(
        ops.sessions.WatchSession(S.WatchSessionRequest(session_id=session.session_id))
    )
    assert whole == history
    tail = await read_to_end(
        ops.sessions.WatchSession(
            S.WatchSessionRequest(session_id=session.session_id, since_sequence=2)
        )
    )
    assert tail == history[2:]


async def test_watch_resumes_without_loss_or_repeat(ops: Harness) -> None:
    """A watch cancelled midway and resumed with since_sequence = the last sequence seen
    yields exactly the events it missed, including those that happened in between."""
    agent = await ops.agent("w", ["work"], max_in_flight=3)
    session = await ops.start(definition("fan", task("x"), task("y"), task("z")))
    sid = session.session_id
    call = ops.sessions.WatchSession(S.WatchSessionRequest(session_id=sid))
    seen = await read_events(call, 3)
    call.cancel()
    assignments = await agent.take(3)
    await agent.complete(assignments[0])
    await agent.heartbeat(assignments[1])

    resumed = ops.sessions.WatchSession(
        S.WatchSessionRequest(session_id=sid, since_sequence=seen[-1].sequence)
    )
    so_far = await ops.events(sid)
    seen += await read_events(resumed, len(so_far) - len(seen))
    assert seen == so_far
    resumed.cancel()

    await agent.complete(assignments[1])
    third = ops.sessions.WatchSession(
        S.WatchSessionRequest(session_id=sid, since_sequence=seen[-1].sequence)
    )
    await agent.complete(assignments[2])
    seen += await read_to_end(third)
    assert seen == await ops.events(sid)
    assert [e.sequence for e in seen] == list(range(1, len(seen) + 1))


async def test_watch_resumed_after_the_terminal_event_ends(ops: Harness) -> None:
    """Resuming a watch with since_sequence = the terminal event's sequence (the client
    saw it but not the end of the stream) ends at once, with no events."""
    agent = await ops.agent("w", ["work"])
    session = await ops.start(single())
    await agent.complete(await agent.next())
    await ops.wait_status(session.session_id, S.SESSION_STATUS_COMPLETED)
    last = (await ops.events(session.session_id))[-1].sequence
    call = ops.sessions.WatchSession(
        S.WatchSessionRequest(session_id=session.session_id, since_sequence=last)
    )
    assert await read_to_end(call, within=1.0) == []


async def test_watch_refusals(ops: Harness, rpc: Rpc) -> None:
    """WatchSession: unknown session NOT_FOUND; missing id or negative since_sequence
    INVALID_ARGUMENT."""
    session = await ops.start(single())
    cases = [
        (S.WatchSessionRequest(session_id="ghost"), NOT_FOUND, []),
        (S.WatchSessionRequest(session_id=""), INVALID, ["session_id"]),
        (
            S.WatchSessionRequest(session_id=session.session_id, since_sequence=-1),
            INVALID,
            ["since_sequence"],
        ),
    ]
    for request, code, fields in cases:
        call = ops.sessions.WatchSession(request)
        failure = await rpc.fails(call.read(), code)
        assert failure.fields == fields


async def test_watch_since_a_sequence_the_session_has_not_reached_is_out_of_range(
    ops: Harness, rpc: Rpc
) -> None:
    """since_sequence beyond the session's last event is OUT_OF_RANGE naming the last
    sequence (no event would ever come); the last sequence itself waits for live ones."""
    session = await ops.start(single())
    sid = session.session_id
    last = (await ops.events(sid))[-1].sequence
    call = ops.sessions.WatchSession(S.WatchSessionRequest(session_id=sid, since_sequence=last + 1))
    failure = await rpc.fails(call.read(), grpc.StatusCode.OUT_OF_RANGE)
    assert failure.reason == "SEQUENCE_AHEAD"
    assert failure.error_metadata == {
        "session_id": sid,
        "requested_sequence": str(last + 1),
        "last_sequence": str(last),
    }

    live = ops.sessions.WatchSession(S.WatchSessionRequest(session_id=sid, since_sequence=last))
    agent = await ops.agent("w", ["work"])
    await agent.next()
    assert event_types(await read_events(live, 1)) == ["TASK_DISPATCHED"]
    live.cancel()


async def test_largest_session_events_are_within_their_bound(ops: Harness) -> None:
    """A failure with the longest error message the limits allow (4-byte characters)
    is watched whole, and every event stays under MAX_SESSION_EVENT_BYTES."""
    agent = await ops.agent("w", ["work"])
    session = await ops.start(single())
    message = "\U0001f600" * MAX_ERROR_MESSAGE_LENGTH
    await agent.fail(await agent.next(), message=message, retryable=False)
    events = await read_to_end(
        ops.sessions.WatchSession(S.WatchSessionRequest(session_id=session.session_id))
    )
    assert event_types(events)[-2:] == ["TASK_FAILED", "SESSION_FAILED"]
    assert to_dict(events[-2].detail)["error"] == message
    assert all(e.ByteSize() <= MAX_SESSION_EVENT_BYTES for e in events)


# --------------------------------------------------------------------------- retention


@pytest.mark.opscore_settings(session_retention=60, compaction_interval=10)
async def test_finished_sessions_are_pruned_after_retention(ops: Harness, rpc: Rpc) -> None:
    """A session is kept session_retention seconds after it ends, then pruned with its
    history (NOT_FOUND everywhere); sessions still running, or ended later, are kept."""
    agent = await ops.agent("w", ["work"])
    done = await ops.start(single())
    await agent.complete(await agent.next())
    await ops.wait_status(done.session_id, S.SESSION_STATUS_COMPLETED)
    still_running = await ops.start(single("other", "nobody_has_it"))

    await ops.tick(50, step=5)
    assert (await ops.session(done.session_id)).status == S.SESSION_STATUS_COMPLETED
    cancelled_later = await ops.start(single("other", "nobody_has_it"))
    await ops.sessions.CancelSession(S.CancelSessionRequest(session_id=cancelled_later.session_id))

    async def pruned() -> bool:
        try:
            await ops.session(done.session_id)
        except grpc.aio.AioRpcError as err:
            return err.code() == NOT_FOUND
        return False

    moved = await ops.tick_until(pruned, limit=40, step=5)
    assert 50 + moved >= 60
    await rpc.fails(
        ops.sessions.ListSessionEvents(S.ListSessionEventsRequest(session_id=done.session_id)),
        NOT_FOUND,
    )
    await rpc.fails(
        ops.sessions.WatchSession(S.WatchSessionRequest(session_id=done.session_id)).read(),
        NOT_FOUND,
    )
    remaining = {s.session_id for s in await ops.list_all()}
    assert remaining == {still_running.session_id, cancelled_later.session_id}
    assert (await ops.session(cancelled_later.session_id)).status == S.SESSION_STATUS_CANCELLED

    await ops.tick(3600, step=100)
    assert {s.session_id for s in await ops.list_all()} == {still_running.session_id}


@pytest.mark.opscore_settings(session_retention=60, compaction_interval=10)
async def test_pruning_a_backlog_takes_several_chunks(
    ops: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention deletes a backlog one bounded chunk per write (one session each here),
    and still deletes all of it."""
    monkeypatch.setattr(sqlite_store, "PRUNE_CHUNK", 1)
    for _ in range(5):
        run = await ops.start(single("other", "nobody_has_it"))
        await ops.sessions.CancelSession(S.CancelSessionRequest(session_id=run.session_id))
    assert len(await ops.list_all()) == 5
    await ops.tick(80, step=10)
    assert await ops.list_all() == []
