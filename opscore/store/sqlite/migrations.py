"""SQLite schema, as numbered migrations applied in order (tracked in PRAGMA user_version)."""

from __future__ import annotations

import logging
import sqlite3

from opscore.protocol.errors import StorageError

log = logging.getLogger(__name__)

MIGRATIONS: list[str] = [
    # 1: agents, their event log, and store-wide counters.
    """
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    INSERT INTO meta (key, value) VALUES ('compacted_revision', 0);

    CREATE TABLE agents (
        agent_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        capabilities TEXT NOT NULL,
        contact_endpoint TEXT NOT NULL,
        metadata TEXT NOT NULL,
        state INTEGER NOT NULL,
        state_details TEXT NOT NULL,
        registered_at INTEGER NOT NULL,
        state_updated_at INTEGER NOT NULL,
        last_heartbeat_at INTEGER NOT NULL,
        state_observed_at INTEGER,
        revision INTEGER NOT NULL
    );
    CREATE INDEX agents_by_heartbeat ON agents (last_heartbeat_at);

    CREATE TABLE agent_events (
        revision INTEGER PRIMARY KEY,
        type INTEGER NOT NULL,
        agent_id TEXT NOT NULL,
        snapshot TEXT NOT NULL,
        occurred_at INTEGER NOT NULL
    );
    """,
    # 2: workflow definitions, runs (sessions), their tasks and history.
    """
    CREATE TABLE secrets (
        name TEXT PRIMARY KEY,
        value BLOB NOT NULL
    );

    CREATE TABLE workflow_definitions (
        id TEXT NOT NULL,
        version TEXT NOT NULL,
        seq INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (id, version)
    );

    CREATE TABLE sessions (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id TEXT NOT NULL UNIQUE,
        definition_id TEXT NOT NULL,
        definition_version TEXT NOT NULL,
        definition TEXT NOT NULL,
        agent_id TEXT NOT NULL,
        status INTEGER NOT NULL,
        input TEXT NOT NULL,
        output TEXT,
        error TEXT NOT NULL,
        request_id TEXT UNIQUE,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        ended_at INTEGER,
        last_sequence INTEGER NOT NULL
    );
    CREATE INDEX sessions_by_end ON sessions (ended_at) WHERE ended_at IS NOT NULL;

    CREATE TABLE tasks (
        session_id TEXT NOT NULL,
        task_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        capability TEXT NOT NULL,
        pinned_agent TEXT NOT NULL,
        status INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        failures INTEGER NOT NULL,
        agent_id TEXT NOT NULL,
        output TEXT,
        error TEXT NOT NULL,
        ended_by TEXT NOT NULL,
        ready_at INTEGER,
        lease_expires_at INTEGER,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (session_id, task_id)
    );
    CREATE INDEX tasks_ready ON tasks (ready_at) WHERE ready_at IS NOT NULL;
    CREATE INDEX tasks_leased ON tasks (lease_expires_at) WHERE lease_expires_at IS NOT NULL;

    CREATE TABLE session_events (
        session_id TEXT NOT NULL,
        sequence INTEGER NOT NULL,
        type INTEGER NOT NULL,
        task_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        agent_id TEXT NOT NULL,
        detail TEXT NOT NULL,
        occurred_at INTEGER NOT NULL,
        PRIMARY KEY (session_id, sequence)
    );
    """,
    # 3: per-agent bearer tokens (hashed), deleted with their agent.
    """
    CREATE TABLE agent_tokens (
        agent_id TEXT PRIMARY KEY,
        sha256 TEXT NOT NULL UNIQUE
    );
    """,
    # 4: task time limits: the end of an attempt's start_to_close timeout, and how
    # long a ready task may wait for an agent (schedule_to_start).
    """
    ALTER TABLE tasks ADD COLUMN attempt_deadline INTEGER;
    ALTER TABLE tasks ADD COLUMN wait_deadline INTEGER;
    CREATE INDEX tasks_waiting ON tasks (wait_deadline) WHERE wait_deadline IS NOT NULL;
    """,
    # 5: each agent's grant, what an operator registered it as (name, version,
    # capabilities): the most its own token may re-register it as. Agents registered
    # before grants existed are granted what they are registered as now.
    """
    ALTER TABLE agents ADD COLUMN granted TEXT;
    UPDATE agents SET granted = json_object(
        'name', name, 'version', version, 'capabilities', json(capabilities)
    );
    """,
]


def migrate(conn: sqlite3.Connection) -> None:
    """Applies the migrations this database lacks, each in its own transaction; a
    database newer than this server is refused."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StorageError(
            f"database schema version {version} is newer than this server "
            f"({len(MIGRATIONS)}); upgrade Ops-Core"
        )
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("applied schema migration", extra={"schema_version": number})
