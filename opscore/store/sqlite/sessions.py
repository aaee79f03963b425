"""SQL of sessions on one SQLite connection: load a Session aggregate and write back
what it changed, the claim walk of dispatch, leases, listing, history and pruning.
Write functions run inside the engine's batch transaction; reads in one snapshot."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from opscore.domain.dispatch.matching import Claim, Matcher, Offer
from opscore.domain.workflows.session import (
    Assignment,
    Session,
    SessionEvent,
    SessionFilter,
    SessionTask,
    TaskKey,
)
from opscore.protocol.enums import SessionEventType, SessionStatus, TaskStatus
from opscore.protocol.errors import StorageError
from opscore.protocol.values import epoch_micros, from_epoch_micros
from opscore.store.sqlite.codec import (
    assignments,
    definition_from_json,
    definition_to_json,
    dumps,
    optional_from_micros,
    optional_json,
    optional_loads,
    optional_micros,
)

SESSION_COLUMNS = (
    "session_id, definition, agent_id, status, input, output, error, request_id, "
    "created_at, updated_at, ended_at, last_sequence"
)
# The columns of a task row that change as its session goes on (see _task_state).
TASK_STATE = (
    "status, attempt, failures, agent_id, output, error, ended_by, ready_at, "
    "lease_expires_at, updated_at, attempt_deadline, wait_deadline"
)
TASK_COLUMNS = f"task_id, {TASK_STATE}"
TASK_STATE_ASSIGNMENTS = assignments(TASK_STATE)
EVENT_COLUMNS = "session_id, sequence, type, task_id, attempt, agent_id, detail, occurred_at"


def load_session(conn: sqlite3.Connection, session_id: str) -> Session | None:
    row = conn.execute(
        f"SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,)
    ).fetchone()
    if row is None:
        return None
    return session_from_rows(conn, row)


def session_from_rows(conn: sqlite3.Connection, row: Sequence[Any]) -> Session:
    definition = definition_from_json(row[1])
    session = Session(
        session_id=row[0],
        definition=definition,
        agent_id=row[2],
        status=SessionStatus(row[3]),
        input=json.loads(row[4]),
        output=optional_loads(row[5]),
        error=row[6],
        request_id=row[7] or "",
        created_at=from_epoch_micros(row[8]),
        updated_at=from_epoch_micros(row[9]),
        ended_at=optional_from_micros(row[10]),
        last_sequence=row[11],
    )
    specs = {t.task_id: t for t in definition.tasks}
    for t in conn.execute(
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE session_id = ? ORDER BY position", (row[0],)
    ):
        session.tasks[t[0]] = SessionTask(
            spec=specs[t[0]],
            status=TaskStatus(t[1]),
            attempt=t[2],
            failures=t[3],
            agent_id=t[4],
            output=optional_loads(t[5]),
            error=t[6],
            ended_by=t[7],
            ready_at=optional_from_micros(t[8]),
            lease_expires_at=optional_from_micros(t[9]),
            updated_at=optional_from_micros(t[10]),
            attempt_deadline=optional_from_micros(t[11]),
            wait_deadline=optional_from_micros(t[12]),
        )
    return session


def insert_session(conn: sqlite3.Connection, session: Session) -> None:
    conn.execute(
        "INSERT INTO sessions (session_id, definition_id, definition_version, definition, "
        "agent_id, status, input, output, error, request_id, created_at, updated_at, ended_at, "
        "last_sequence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            session.session_id,
            session.definition.id,
            session.definition.version,
            definition_to_json(session.definition),
            session.agent_id,
            int(session.status),
            dumps(session.input),
            optional_json(session.output),
            session.error,
            session.request_id or None,
            epoch_micros(session.created_at),
            epoch_micros(session.updated_at or session.created_at),
            optional_micros(session.ended_at),
            session.last_sequence,
        ),
    )
    _write_changes(conn, session, new=True)


def save_session(conn: sqlite3.Connection, session: Session) -> None:
    conn.execute(
        "UPDATE sessions SET status = ?, output = ?, error = ?, updated_at = ?, ended_at = ?, "
        "last_sequence = ? WHERE session_id = ?",
        (
            int(session.status),
            optional_json(session.output),
            session.error,
            epoch_micros(session.updated_at or session.created_at),
            optional_micros(session.ended_at),
            session.last_sequence,
            session.session_id,
        ),
    )
    _write_changes(conn, session)


def _task_state(session: Session, task: SessionTask) -> tuple[Any, ...]:
    """The TASK_STATE columns of a task row."""
    return (
        int(task.status),
        task.attempt,
        task.failures,
        task.agent_id,
        optional_json(task.output),
        task.error,
        task.ended_by,
        optional_micros(task.ready_at),
        optional_micros(task.lease_expires_at),
        epoch_micros(task.updated_at or session.created_at),
        optional_micros(task.attempt_deadline),
        optional_micros(task.wait_deadline),
    )


def _write_changes(conn: sqlite3.Connection, session: Session, new: bool = False) -> None:
    """Writes the tasks the session changed (a new session: all of them) and its new events.
    Existing task rows are UPDATEd, not replaced: REPLACE deletes and reinserts every
    index entry, about three times the cost."""
    changed = [session.tasks[task_id] for task_id in sorted(session.changed_tasks)]
    if new:
        positions = {t.task_id: i for i, t in enumerate(session.definition.tasks)}
        conn.executemany(
            "INSERT INTO tasks (session_id, task_id, position, capability, pinned_agent, "
            f"{TASK_STATE}) VALUES ({', '.join('?' * (5 + TASK_STATE.count(',') + 1))})",
            [
                (
                    session.session_id,
                    t.spec.task_id,
                    positions[t.spec.task_id],
                    t.spec.agent_capability,
                    session.agent_id,
                    *_task_state(session, t),
                )
                for t in changed
            ],
        )
    else:
        updated = conn.executemany(
            f"UPDATE tasks SET {TASK_STATE_ASSIGNMENTS} WHERE session_id = ? AND task_id = ?",
            [(*_task_state(session, t), session.session_id, t.spec.task_id) for t in changed],
        ).rowcount
        if updated != len(changed):  # every task row is written when its session starts
            raise StorageError(
                f"session {session.session_id}: {len(changed) - updated} task rows gone"
            )
    conn.executemany(
        f"INSERT INTO session_events ({EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                e.session_id,
                e.sequence,
                int(e.type),
                e.task_id,
                e.attempt,
                e.agent_id,
                dumps(e.detail),
                epoch_micros(e.occurred_at),
            )
            for e in session.new_events
        ],
    )


def event_from_row(row: Sequence[Any]) -> SessionEvent:
    return SessionEvent(
        session_id=row[0],
        sequence=row[1],
        type=SessionEventType(row[2]),
        task_id=row[3],
        attempt=row[4],
        agent_id=row[5],
        detail=json.loads(row[6]),
        occurred_at=from_epoch_micros(row[7]),
    )


def create_session(
    conn: sqlite3.Connection, events: list[Any], session: Session
) -> tuple[Session, bool]:
    if session.request_id:
        row = conn.execute(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE request_id = ?", (session.request_id,)
        ).fetchone()
        if row is not None:
            return session_from_rows(conn, row), False
    insert_session(conn, session)
    events.extend(session.new_events)
    return session, True


def claim_tasks(
    conn: sqlite3.Connection,
    events: list[Any],
    offers: list[Offer],
    now: datetime,
    dispatch: Callable[[Session, str, str], Assignment],
) -> Claim:
    """Walks ready tasks, oldest first, through the matching rule, reading only rows
    some offer with a free slot may take (keyset-paged by (ready_at, rowid))."""
    matcher = Matcher(offers)
    limit = sum(o.slots for o in offers) * 4 + 16  # rows per look: every slot, some left
    sessions: dict[str, Session] = {}
    claimed: list[tuple[int, Assignment]] = []
    after = (-1, -1)  # (ready_at, rowid) of the last row looked at
    while True:
        wanted, agents = matcher.wanted()
        if not wanted:
            return _claimed(conn, events, claimed, sessions, now, set())
        rows = conn.execute(
            "SELECT ready_at, rowid, session_id, task_id, capability, pinned_agent "
            "FROM tasks WHERE ready_at IS NOT NULL AND ready_at <= ? "
            "AND (ready_at, rowid) > (?, ?) "
            f"AND capability IN ({', '.join('?' * len(wanted))}) "
            f"AND pinned_agent IN ('', {', '.join('?' * len(agents))}) "
            "ORDER BY ready_at, rowid LIMIT ?",
            (epoch_micros(now), *after, *wanted, *agents, limit),
        ).fetchall()
        for _ready_at, _rowid, session_id, task_id, capability, pinned in rows:
            chosen = matcher.choose(capability, pinned)
            if chosen is None:
                continue
            session = sessions.get(session_id) or load_session(conn, session_id)
            assert session is not None
            sessions[session_id] = session
            claimed.append((chosen, dispatch(session, task_id, offers[chosen].agent_id)))
        if len(rows) < limit:  # every row the open offers may take was seen
            return _claimed(conn, events, claimed, sessions, now, matcher.maybe_exhausted(wanted))
        after = (rows[-1][0], rows[-1][1])


def _claimed(
    conn: sqlite3.Connection,
    events: list[Any],
    claimed: list[tuple[int, Assignment]],
    sessions: dict[str, Session],
    now: datetime,
    maybe_exhausted: set[str],
) -> Claim:
    """Saves the claimed sessions; a capability is exhausted only if no ready task needs
    it at all (tasks pinned to busy agents included: their agents' freed slots must
    still wake the dispatcher)."""
    for session in sessions.values():
        save_session(conn, session)
        events.extend(session.new_events)
    if maybe_exhausted:
        maybe_exhausted -= {
            row[0]
            for row in conn.execute(
                "SELECT DISTINCT capability FROM tasks "
                "WHERE ready_at IS NOT NULL AND ready_at <= ? "
                f"AND capability IN ({', '.join('?' * len(maybe_exhausted))})",
                (epoch_micros(now), *sorted(maybe_exhausted)),
            )
        }
    return Claim(claimed, list(sessions.values()), frozenset(maybe_exhausted))


def timed_out_tasks(conn: sqlite3.Connection, now: datetime) -> list[TaskKey]:
    """Attempts whose lease ran out, and ready tasks that waited out their
    schedule_to_start limit."""
    rows = conn.execute(
        "SELECT session_id, task_id, attempt FROM tasks "
        "WHERE lease_expires_at IS NOT NULL AND lease_expires_at <= ? "
        "UNION ALL SELECT session_id, task_id, attempt FROM tasks "
        "WHERE wait_deadline IS NOT NULL AND wait_deadline <= ?",
        (epoch_micros(now), epoch_micros(now)),
    ).fetchall()
    return [TaskKey(*r) for r in rows]


def leased_tasks(conn: sqlite3.Connection, agent_id: str | None) -> list[TaskKey]:
    sql = "SELECT session_id, task_id, attempt FROM tasks WHERE lease_expires_at IS NOT NULL"
    params: tuple[Any, ...] = ()
    if agent_id is not None:
        sql += " AND agent_id = ?"
        params = (agent_id,)
    return [TaskKey(*r) for r in conn.execute(sql, params).fetchall()]


def list_session_events(
    conn: sqlite3.Connection, session_id: str, after_sequence: int, limit: int
) -> list[SessionEvent]:
    rows = conn.execute(
        f"SELECT {EVENT_COLUMNS} FROM session_events "
        "WHERE session_id = ? AND sequence > ? ORDER BY sequence LIMIT ?",
        (session_id, after_sequence, limit),
    ).fetchall()
    return [event_from_row(r) for r in rows]


def list_sessions(
    conn: sqlite3.Connection, flt: SessionFilter, before_seq: int, limit: int
) -> list[tuple[int, Session]]:
    clauses: list[str] = ["seq < ?"]
    params: list[Any] = [before_seq or 2**62]
    if flt.statuses:
        clauses.append(f"status IN ({', '.join('?' * len(flt.statuses))})")
        params.extend(int(s) for s in sorted(flt.statuses))
    if flt.workflow_definition_id:
        clauses.append("definition_id = ?")
        params.append(flt.workflow_definition_id)
    if flt.agent_id:
        clauses.append("agent_id = ?")
        params.append(flt.agent_id)
    rows = conn.execute(
        f"SELECT seq, {SESSION_COLUMNS} FROM sessions "
        f"WHERE {' AND '.join(clauses)} ORDER BY seq DESC LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [(row[0], session_from_rows(conn, row[1:])) for row in rows]


def prune_sessions_chunk(conn: sqlite3.Connection, ended_before: datetime, chunk: int) -> int:
    """Deletes up to `chunk` finished sessions that ended before the cutoff, with their
    tasks and history; returns how many."""
    doomed = [
        r[0]
        for r in conn.execute(
            "SELECT session_id FROM sessions WHERE ended_at IS NOT NULL AND ended_at < ? LIMIT ?",
            (epoch_micros(ended_before), chunk),
        )
    ]
    for table in ("session_events", "tasks", "sessions"):
        conn.executemany(f"DELETE FROM {table} WHERE session_id = ?", [(s,) for s in doomed])
    return len(doomed)
