"""SQL for workflow runs on one SQLite connection (called on the writer or a reader
thread by SqliteStore): load a Run aggregate, write back what it changed."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from opscore.errors import StorageError
from opscore.runs import Run, SessionEvent, SessionEventType, SessionStatus, TaskRun, TaskStatus
from opscore.store.codec import (
    assignments,
    definition_from_json,
    definition_to_json,
    dumps,
    from_micros,
    optional_from_micros,
    optional_json,
    optional_loads,
    optional_micros,
    to_micros,
)

SESSION_COLUMNS = (
    "session_id, definition, agent_id, status, input, output, error, request_id, "
    "created_at, updated_at, ended_at, last_sequence"
)
# The columns of a task row that change as its run goes on (see _task_state).
TASK_STATE = (
    "status, attempt, failures, agent_id, output, error, ended_by, ready_at, "
    "lease_expires_at, updated_at"
)
TASK_COLUMNS = f"task_id, {TASK_STATE}"
TASK_STATE_ASSIGNMENTS = assignments(TASK_STATE)
EVENT_COLUMNS = "session_id, sequence, type, task_id, attempt, agent_id, detail, occurred_at"


def load_run(conn: sqlite3.Connection, session_id: str) -> Run | None:
    row = conn.execute(
        f"SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,)
    ).fetchone()
    if row is None:
        return None
    return run_from_rows(conn, row)


def run_from_rows(conn: sqlite3.Connection, row: Sequence[Any]) -> Run:
    definition = definition_from_json(row[1])
    run = Run(
        session_id=row[0],
        definition=definition,
        agent_id=row[2],
        status=SessionStatus(row[3]),
        input=json.loads(row[4]),
        output=optional_loads(row[5]),
        error=row[6],
        request_id=row[7] or "",
        created_at=from_micros(row[8]),
        updated_at=from_micros(row[9]),
        ended_at=optional_from_micros(row[10]),
        last_sequence=row[11],
    )
    specs = {t.task_id: t for t in definition.tasks}
    for t in conn.execute(
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE session_id = ? ORDER BY position", (row[0],)
    ):
        run.tasks[t[0]] = TaskRun(
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
        )
    return run


def insert_run(conn: sqlite3.Connection, run: Run) -> None:
    conn.execute(
        "INSERT INTO sessions (session_id, definition_id, definition_version, definition, "
        "agent_id, status, input, output, error, request_id, created_at, updated_at, ended_at, "
        "last_sequence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            run.session_id,
            run.definition.id,
            run.definition.version,
            definition_to_json(run.definition),
            run.agent_id,
            int(run.status),
            dumps(run.input),
            optional_json(run.output),
            run.error,
            run.request_id or None,
            to_micros(run.created_at),
            to_micros(run.updated_at or run.created_at),
            optional_micros(run.ended_at),
            run.last_sequence,
        ),
    )
    _write_changes(conn, run, new=True)


def save_run(conn: sqlite3.Connection, run: Run) -> None:
    conn.execute(
        "UPDATE sessions SET status = ?, output = ?, error = ?, updated_at = ?, ended_at = ?, "
        "last_sequence = ? WHERE session_id = ?",
        (
            int(run.status),
            optional_json(run.output),
            run.error,
            to_micros(run.updated_at or run.created_at),
            optional_micros(run.ended_at),
            run.last_sequence,
            run.session_id,
        ),
    )
    _write_changes(conn, run)


def _task_state(run: Run, task: TaskRun) -> tuple[Any, ...]:
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
        to_micros(task.updated_at or run.created_at),
    )


def _write_changes(conn: sqlite3.Connection, run: Run, new: bool = False) -> None:
    """Writes the tasks the run changed (a new run: all of them) and its new events.
    Existing task rows are UPDATEd, not replaced: REPLACE deletes and reinserts every
    index entry, about three times the cost."""
    changed = [run.tasks[task_id] for task_id in sorted(run.changed_tasks)]
    if new:
        positions = {t.task_id: i for i, t in enumerate(run.definition.tasks)}
        conn.executemany(
            "INSERT INTO tasks (session_id, task_id, position, capability, pinned_agent, "
            f"{TASK_STATE}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    run.session_id,
                    t.spec.task_id,
                    positions[t.spec.task_id],
                    t.spec.agent_capability,
                    run.agent_id,
                    *_task_state(run, t),
                )
                for t in changed
            ],
        )
    else:
        updated = conn.executemany(
            f"UPDATE tasks SET {TASK_STATE_ASSIGNMENTS} WHERE session_id = ? AND task_id = ?",
            [(*_task_state(run, t), run.session_id, t.spec.task_id) for t in changed],
        ).rowcount
        if updated != len(changed):  # every task row is written when its run starts
            raise StorageError(f"session {run.session_id}: {len(changed) - updated} task rows gone")
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
                to_micros(e.occurred_at),
            )
            for e in run.new_events
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
        occurred_at=from_micros(row[7]),
    )
