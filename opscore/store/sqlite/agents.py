"""SQL of the agent registry on one SQLite connection: agents, their event log (with
store-wide revisions), and agent tokens. Write functions run inside the engine's batch
transaction; read functions inside one reader snapshot."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import datetime
from typing import Any

from opscore.domain.agents.model import Agent, AgentChange, AgentEvent, AgentFilter
from opscore.protocol.enums import AgentEventType, AgentState
from opscore.protocol.values import epoch_micros, from_epoch_micros
from opscore.store.sqlite.codec import (
    AGENT_COLUMNS,
    AGENT_PLACEHOLDERS,
    AGENT_STATE_ASSIGNMENTS,
    agent_from_json,
    agent_from_row,
    agent_to_json,
    agent_to_row,
)

DELETE_CHUNK = 2000  # events deleted per write by compaction


def read_revision(conn: sqlite3.Connection) -> int:
    """The newest revision: of the last event, or the compacted one if none is left."""
    row = conn.execute(
        "SELECT MAX(COALESCE((SELECT MAX(revision) FROM agent_events), 0), "
        "(SELECT value FROM meta WHERE key = 'compacted_revision'))"
    ).fetchone()
    return int(row[0])


def _compacted_revision(conn: sqlite3.Connection) -> int:
    return int(
        conn.execute("SELECT value FROM meta WHERE key = 'compacted_revision'").fetchone()[0]
    )


def change_agent(
    conn: sqlite3.Connection,
    events: list[Any],
    agent_id: str,
    decide: Callable[[Agent | None], AgentChange],
    next_revision: Callable[[], int],
) -> tuple[Agent, AgentEvent | None]:
    row = conn.execute(
        f"SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = ?", (agent_id,)
    ).fetchone()
    current = None if row is None else agent_from_row(row)
    change = decide(current)
    agent = change.agent if change.agent is not None else current
    assert agent is not None, "a change deletes an agent that exists"
    event = None
    if change.event is not None:
        agent = agent.evolve(revision=next_revision())
        event = AgentEvent(agent.revision, change.event, agent, change.occurred_at)
        conn.execute(
            "INSERT INTO agent_events (revision, type, agent_id, snapshot, occurred_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                event.revision,
                int(event.type),
                agent_id,
                agent_to_json(agent),
                epoch_micros(event.occurred_at),
            ),
        )
        events.append(event)
    if change.token_sha256 is not None:
        conn.execute(
            "INSERT OR REPLACE INTO agent_tokens (agent_id, sha256) VALUES (?, ?)",
            (agent_id, change.token_sha256),
        )
    if change.agent is None:
        conn.execute("DELETE FROM agents WHERE agent_id = ?", (agent_id,))
        conn.execute("DELETE FROM agent_tokens WHERE agent_id = ?", (agent_id,))
    elif current is None:
        conn.execute(
            f"INSERT INTO agents ({AGENT_COLUMNS}) VALUES ({AGENT_PLACEHOLDERS})",
            agent_to_row(agent),
        )
    elif change.agent is not current:  # UPDATE: REPLACE would redo every index entry
        conn.execute(
            f"UPDATE agents SET {AGENT_STATE_ASSIGNMENTS} WHERE agent_id = ?",
            (*agent_to_row(agent)[1:], agent_id),
        )
    return agent, event


def agent_tokens(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT sha256, agent_id FROM agent_tokens").fetchall())


def get_agent(conn: sqlite3.Connection, agent_id: str) -> Agent | None:
    row = conn.execute(
        f"SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = ?", (agent_id,)
    ).fetchone()
    return None if row is None else agent_from_row(row)


def _filter_sql(flt: AgentFilter) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if flt.agent_ids:
        clauses.append(f"agent_id IN ({', '.join('?' * len(flt.agent_ids))})")
        params.extend(sorted(flt.agent_ids))
    if flt.states:
        clauses.append(f"state IN ({', '.join('?' * len(flt.states))})")
        params.extend(int(s) for s in sorted(flt.states))
    if flt.capability:
        clauses.append("EXISTS (SELECT 1 FROM json_each(capabilities) WHERE value = ?)")
        params.append(flt.capability)
    return " AND ".join(clauses) or "1", params


def list_agents(
    conn: sqlite3.Connection, flt: AgentFilter, after_id: str, limit: int | None
) -> tuple[list[Agent], int]:
    """Matching agents after `after_id` in id order (all of them when `limit` is None),
    and the revision they are consistent with."""
    where, params = _filter_sql(flt)
    rows = conn.execute(
        f"SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id > ? AND {where} "
        "ORDER BY agent_id LIMIT ?",
        (after_id, *params, -1 if limit is None else limit),
    ).fetchall()
    return [agent_from_row(r) for r in rows], read_revision(conn)


def silent_agents(conn: sqlite3.Connection, heartbeat_before: datetime) -> list[str]:
    rows = conn.execute(
        "SELECT agent_id FROM agents WHERE last_heartbeat_at < ? AND state != ?",
        (epoch_micros(heartbeat_before), int(AgentState.OFFLINE)),
    ).fetchall()
    return [r[0] for r in rows]


def agent_events_after(
    conn: sqlite3.Connection, revision: int, limit: int
) -> tuple[list[AgentEvent], int]:
    compacted = _compacted_revision(conn)
    rows = conn.execute(
        "SELECT revision, type, snapshot, occurred_at FROM agent_events "
        "WHERE revision > ? ORDER BY revision LIMIT ?",
        (revision, limit),
    ).fetchall()
    events = [
        AgentEvent(r[0], AgentEventType(r[1]), agent_from_json(r[2]), from_epoch_micros(r[3]))
        for r in rows
    ]
    return events, compacted


def compact_agent_events_chunk(
    conn: sqlite3.Connection, newest_revision: int, keep: int
) -> tuple[int, bool]:
    """Deletes up to one chunk of events beyond the newest `keep`; returns the
    compacted revision and whether nothing is left to delete."""
    compacted = _compacted_revision(conn)
    cutoff = min(newest_revision - keep, compacted + DELETE_CHUNK)
    if cutoff <= compacted:
        return compacted, True
    conn.execute("DELETE FROM agent_events WHERE revision <= ?", (cutoff,))
    conn.execute("UPDATE meta SET value = ? WHERE key = 'compacted_revision'", (cutoff,))
    return cutoff, False
