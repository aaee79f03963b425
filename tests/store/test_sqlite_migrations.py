"""SQLite schema migrations that carry data forward: what a database written by an
older server holds after this one opens it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from opscore.domain.agents.model import AgentGrant
from opscore.store.sqlite.engine import SqliteConfig
from opscore.store.sqlite.migrations import MIGRATIONS
from opscore.store.sqlite.store import SqliteStore

# The first migration that stores agents' grants.
GRANTS = next(i for i, script in enumerate(MIGRATIONS) if "granted" in script)


def database_before_grants(path: Path) -> None:
    """A database at the schema before grants, with agent "a" and its REGISTERED event
    (a snapshot of the 13 columns of that time)."""
    row = ("a", "A", "1", '["x","y"]', "", "{}", 1, "{}", 0, 0, 0, None, 1)
    with sqlite3.connect(path, isolation_level=None) as conn:
        for script in MIGRATIONS[:GRANTS]:
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
        conn.execute(f"PRAGMA user_version={GRANTS}")
        conn.execute(f"INSERT INTO agents VALUES ({', '.join('?' * len(row))})", row)
        conn.execute("INSERT INTO agent_events VALUES (1, 1, 'a', ?, 0)", (json.dumps(row),))
    conn.close()


async def test_agents_stored_before_grants_are_granted_what_they_are(tmp_path: Path) -> None:
    """An agent registered before grants existed is granted its name, version and
    capabilities; its old event snapshot still reads."""
    path = tmp_path / "old.db"
    database_before_grants(path)
    store = SqliteStore(SqliteConfig(path))
    await store.open()
    try:
        agent = await store.get_agent("a")
        assert agent is not None and agent.capabilities == ("x", "y")
        assert agent.grant == AgentGrant("A", "1", frozenset({"x", "y"}))
        events, _ = await store.agent_events_after(0, 10)
        assert [e.agent.agent_id for e in events if e.agent] == ["a"]
    finally:
        await store.close()
