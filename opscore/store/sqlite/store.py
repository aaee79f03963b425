"""The embedded SQLite store: the `Store` interface over the engine (group commit and
readers, `engine.py`) and the SQL of each repository (`agents.py`, `definitions.py`,
`sessions.py`). Every write runs as one job of a group-commit batch."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from opscore.domain.agents.model import Agent, AgentEvent, AgentFilter
from opscore.domain.dispatch.matching import Claim, Offer
from opscore.domain.workflows.definitions import WorkflowDefinition
from opscore.domain.workflows.session import (
    Assignment,
    Session,
    SessionEvent,
    SessionFilter,
    TaskKey,
)
from opscore.protocol.errors import SessionNotFoundError
from opscore.store.base import AgentDecision, Store
from opscore.store.sqlite import agents as agents_sql
from opscore.store.sqlite import definitions as definitions_sql
from opscore.store.sqlite import sessions as sessions_sql
from opscore.store.sqlite.engine import SqliteConfig, SqliteEngine

R = TypeVar("R")

PRUNE_CHUNK = 250  # sessions deleted per write (~8 rows each)


def _secret(conn: sqlite3.Connection, name: str) -> bytes:
    row = conn.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()
    if row is not None:
        return bytes(row[0])
    value = os.urandom(32)
    conn.execute("INSERT INTO secrets (name, value) VALUES (?, ?)", (name, value))
    return value


class SqliteStore(Store):
    def __init__(self, config: SqliteConfig) -> None:
        super().__init__()
        self._db = SqliteEngine(config, self._announce)

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    # -- agents ------------------------------------------------------------------

    async def change_agent(
        self, agent_id: str, decide: AgentDecision
    ) -> tuple[Agent, AgentEvent | None]:
        return await self._db.write(
            lambda conn, events: agents_sql.change_agent(
                conn, events, agent_id, decide, self._db.next_revision
            )
        )

    async def agent_tokens(self) -> dict[str, str]:
        return await self._db.read(agents_sql.agent_tokens)

    async def get_agent(self, agent_id: str) -> Agent | None:
        return await self._db.read(lambda conn: agents_sql.get_agent(conn, agent_id))

    async def list_agents(
        self, flt: AgentFilter, after_id: str, limit: int
    ) -> tuple[list[Agent], int]:
        return await self._db.read(lambda conn: agents_sql.list_agents(conn, flt, after_id, limit))

    async def snapshot_agents(self, flt: AgentFilter) -> tuple[list[Agent], int]:
        return await self._db.read(lambda conn: agents_sql.list_agents(conn, flt, "", None))

    async def silent_agents(self, heartbeat_before: datetime) -> list[str]:
        return await self._db.read(lambda conn: agents_sql.silent_agents(conn, heartbeat_before))

    async def agent_events_after(self, revision: int, limit: int) -> tuple[list[AgentEvent], int]:
        return await self._db.read(
            lambda conn: agents_sql.agent_events_after(conn, revision, limit)
        )

    async def compact_agent_events(self, keep: int) -> int:
        """Deletes in chunks, each its own write, so a large backlog (a first
        compaction, a long-idle server) never holds the writer or the loop for long."""
        while True:
            compacted, done = await self._db.write(
                lambda conn, _events: agents_sql.compact_agent_events_chunk(
                    conn, self._db.revision, keep
                )
            )
            if done:
                return compacted

    async def current_revision(self) -> int:
        return self._db.committed_revision

    # -- workflow definitions ------------------------------------------------------

    async def create_definition(self, definition: WorkflowDefinition) -> WorkflowDefinition:
        await self._db.write(
            lambda conn, _events: definitions_sql.create_definition(conn, definition)
        )
        return definition

    async def get_definition(self, definition_id: str, version: str) -> WorkflowDefinition | None:
        return await self._db.read(
            lambda conn: definitions_sql.get_definition(conn, definition_id, version)
        )

    async def list_definitions(
        self, after: tuple[str, str], limit: int
    ) -> list[WorkflowDefinition]:
        return await self._db.read(
            lambda conn: definitions_sql.list_definitions(conn, after, limit)
        )

    async def delete_definition(self, definition_id: str, version: str) -> bool:
        return await self._db.write(
            lambda conn, _events: definitions_sql.delete_definition(conn, definition_id, version)
        )

    # -- sessions ------------------------------------------------------------------

    async def create_session(self, session: Session) -> tuple[Session, bool]:
        return await self._db.write(
            lambda conn, events: sessions_sql.create_session(conn, events, session)
        )

    async def change_session(
        self, session_id: str, change: Callable[[Session], R]
    ) -> tuple[R, Session]:
        def job(conn: sqlite3.Connection, events: list[Any]) -> tuple[R, Session]:
            session = sessions_sql.load_session(conn, session_id)
            if session is None:
                raise SessionNotFoundError(session_id)
            result = change(session)
            sessions_sql.save_session(conn, session)
            events.extend(session.new_events)
            return result, session

        return await self._db.write(job)

    async def get_session(self, session_id: str) -> Session | None:
        return await self._db.read(lambda conn: sessions_sql.load_session(conn, session_id))

    async def claim_tasks(
        self,
        offers: list[Offer],
        now: datetime,
        dispatch: Callable[[Session, str, str], Assignment],
    ) -> Claim:
        if sum(o.slots for o in offers) <= 0:
            return Claim([], [], frozenset())
        return await self._db.write(
            lambda conn, events: sessions_sql.claim_tasks(conn, events, offers, now, dispatch)
        )

    async def timed_out_tasks(self, now: datetime) -> list[TaskKey]:
        return await self._db.read(lambda conn: sessions_sql.timed_out_tasks(conn, now))

    async def leased_tasks(self, agent_id: str | None = None) -> list[TaskKey]:
        return await self._db.read(lambda conn: sessions_sql.leased_tasks(conn, agent_id))

    async def list_session_events(
        self, session_id: str, after_sequence: int, limit: int
    ) -> list[SessionEvent]:
        return await self._db.read(
            lambda conn: sessions_sql.list_session_events(conn, session_id, after_sequence, limit)
        )

    async def list_sessions(
        self, flt: SessionFilter, before_seq: int, limit: int
    ) -> list[tuple[int, Session]]:
        return await self._db.read(
            lambda conn: sessions_sql.list_sessions(conn, flt, before_seq, limit)
        )

    async def prune_sessions(self, ended_before: datetime) -> int:
        """Deletes in chunks, each its own write (see compact_agent_events)."""
        pruned = 0
        while count := await self._db.write(
            lambda conn, _events: sessions_sql.prune_sessions_chunk(conn, ended_before, PRUNE_CHUNK)
        ):
            pruned += count
        return pruned

    async def secret(self, name: str) -> bytes:
        return await self._db.write(lambda conn, _events: _secret(conn, name))
