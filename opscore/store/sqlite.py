"""The embedded SQLite store.

Why not aiosqlite: it hops to its thread once per statement. Group commit wants the
opposite: one hop per *batch*, running every queued change as synchronous code on a
single writer thread inside one transaction (a SAVEPOINT per change, so a refused
change rolls back alone), then one COMMIT. Reads run on a small pool of reader
threads with their own connections; WAL gives them consistent snapshots while the
writer works.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from opscore.errors import OpsCoreError, StorageError
from opscore.models import Agent, AgentEvent, AgentEventType, AgentFilter, AgentState
from opscore.store.base import AgentDecision, Store
from opscore.store.codec import (
    AGENT_COLUMNS,
    agent_from_json,
    agent_from_row,
    agent_to_json,
    agent_to_row,
    from_micros,
    to_micros,
)
from opscore.store.sqlite_schema import MIGRATIONS

log = logging.getLogger(__name__)

R = TypeVar("R")
# A write job: runs on the writer thread inside the batch transaction, appending the
# events it creates to the list it is given.
WriteFn = Callable[[sqlite3.Connection, list[AgentEvent]], R]


@dataclass
class _Job:
    fn: WriteFn[Any]
    future: asyncio.Future[Any]
    events: list[AgentEvent] = field(default_factory=list)
    outcome: tuple[bool, Any] = (False, None)


class SqliteStore(Store):
    def __init__(
        self,
        path: Path,
        *,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        readers: int = 2,
        max_batch: int = 256,
    ) -> None:
        super().__init__()
        self._path = path
        self._synchronous = synchronous
        self._max_batch = max_batch
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="sqlite-reader")
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._conn: sqlite3.Connection | None = None
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._loop_task: asyncio.Task[None] | None = None
        self._revision = 0  # writer thread only: the last revision handed out
        self._committed_revision = 0

    # -- lifecycle ---------------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._open_writer)
        self._loop_task = asyncio.create_task(self._write_loop(), name="sqlite-group-commit")

    def _open_writer(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA busy_timeout=5000")
            self._migrate(conn)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open database {self._path}: {exc}") from exc
        self._conn = conn
        self._revision = self._committed_revision = self._read_revision(conn)

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
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

    @staticmethod
    def _read_revision(conn: sqlite3.Connection) -> int:
        row = conn.execute(
            "SELECT MAX(COALESCE((SELECT MAX(revision) FROM agent_events), 0), "
            "(SELECT value FROM meta WHERE key = 'compacted_revision'))"
        ).fetchone()
        return int(row[0])

    async def close(self) -> None:
        if self._loop_task is not None:
            await self._queue.put(None)
            await self._loop_task
            self._loop_task = None
        loop = asyncio.get_running_loop()
        if self._conn is not None:
            await loop.run_in_executor(self._writer, self._conn.close)
            self._conn = None
        for conn in self._reader_conns:
            conn.close()
        self._writer.shutdown()
        self._readers.shutdown()

    # -- group commit ------------------------------------------------------------

    async def _write(self, fn: WriteFn[R]) -> R:
        if self._loop_task is None:
            raise StorageError("store is closed")
        job = _Job(fn, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        result: R = await job.future  # a cancelled caller does not stop the job
        return result

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self._max_batch and not self._queue.empty():
                job = self._queue.get_nowait()
                if job is None:
                    stopping = True
                    break
                batch.append(job)
            await loop.run_in_executor(self._writer, self._run_batch, batch)
            self._committed_revision = self._revision
            self._announce([event for job in batch if job.outcome[0] for event in job.events])
            for job in batch:
                ok, value = job.outcome
                if job.future.done():
                    continue
                if ok:
                    job.future.set_result(value)
                else:
                    job.future.set_exception(value)

    def _run_batch(self, batch: Sequence[_Job]) -> None:
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                self._run_job(conn, job)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.exception("commit failed")
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._revision = self._committed_revision
            failure = StorageError(f"write failed, nothing committed: {exc}")
            for job in batch:
                job.outcome, job.events = (False, failure), []

    def _run_job(self, conn: sqlite3.Connection, job: _Job) -> None:
        revision_before = self._revision
        conn.execute("SAVEPOINT job")
        try:
            job.outcome = (True, job.fn(conn, job.events))
            conn.execute("RELEASE job")
        except Exception as exc:  # refused or broken: undo this job only
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            self._revision = revision_before
            job.events = []
            if isinstance(exc, sqlite3.Error):
                exc = StorageError(f"write failed: {exc}")
            elif not isinstance(exc, OpsCoreError):
                log.exception("write job failed")
            job.outcome = (False, exc)

    def _next_revision(self) -> int:
        self._revision += 1
        return self._revision

    # -- reads -------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            self._reader_conns.append(conn)
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], R]) -> R:
        """Runs `fn` on a reader thread inside one read transaction (one snapshot)."""

        def run() -> R:
            conn = self._reader()
            conn.execute("BEGIN")
            try:
                return fn(conn)
            except sqlite3.Error as exc:
                raise StorageError(f"read failed: {exc}") from exc
            finally:
                conn.execute("COMMIT")

        return await asyncio.get_running_loop().run_in_executor(self._readers, run)

    # -- agents ------------------------------------------------------------------

    async def change_agent(
        self, agent_id: str, decide: AgentDecision
    ) -> tuple[Agent, AgentEvent | None]:
        def job(
            conn: sqlite3.Connection, events: list[AgentEvent]
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
                agent = agent.evolve(revision=self._next_revision())
                event = AgentEvent(agent.revision, change.event, agent, change.occurred_at)
                conn.execute(
                    "INSERT INTO agent_events (revision, type, agent_id, snapshot, occurred_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (
                        event.revision,
                        int(event.type),
                        agent_id,
                        agent_to_json(agent),
                        to_micros(event.occurred_at),
                    ),
                )
                events.append(event)
            if change.agent is None:
                conn.execute("DELETE FROM agents WHERE agent_id = ?", (agent_id,))
            elif change.agent is not current:
                conn.execute(
                    f"INSERT OR REPLACE INTO agents ({AGENT_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    agent_to_row(agent),
                )
            return agent, event

        return await self._write(job)

    async def get_agent(self, agent_id: str) -> Agent | None:
        def read(conn: sqlite3.Connection) -> Agent | None:
            row = conn.execute(
                f"SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = ?", (agent_id,)
            ).fetchone()
            return None if row is None else agent_from_row(row)

        return await self._read(read)

    @staticmethod
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

    async def list_agents(self, flt: AgentFilter, after_id: str, limit: int) -> list[Agent]:
        where, params = self._filter_sql(flt)

        def read(conn: sqlite3.Connection) -> list[Agent]:
            rows = conn.execute(
                f"SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id > ? AND {where} "
                "ORDER BY agent_id LIMIT ?",
                (after_id, *params, limit),
            ).fetchall()
            return [agent_from_row(r) for r in rows]

        return await self._read(read)

    async def snapshot_agents(self, flt: AgentFilter) -> tuple[list[Agent], int]:
        where, params = self._filter_sql(flt)

        def read(conn: sqlite3.Connection) -> tuple[list[Agent], int]:
            rows = conn.execute(
                f"SELECT {AGENT_COLUMNS} FROM agents WHERE {where} ORDER BY agent_id", params
            ).fetchall()
            return [agent_from_row(r) for r in rows], self._read_revision(conn)

        return await self._read(read)

    async def silent_agents(self, heartbeat_before: datetime) -> list[str]:
        def read(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT agent_id FROM agents WHERE last_heartbeat_at < ? AND state != ?",
                (to_micros(heartbeat_before), int(AgentState.OFFLINE)),
            ).fetchall()
            return [r[0] for r in rows]

        return await self._read(read)

    async def agent_events_after(self, revision: int, limit: int) -> tuple[list[AgentEvent], int]:
        def read(conn: sqlite3.Connection) -> tuple[list[AgentEvent], int]:
            compacted = conn.execute(
                "SELECT value FROM meta WHERE key = 'compacted_revision'"
            ).fetchone()[0]
            rows = conn.execute(
                "SELECT revision, type, snapshot, occurred_at FROM agent_events "
                "WHERE revision > ? ORDER BY revision LIMIT ?",
                (revision, limit),
            ).fetchall()
            events = [
                AgentEvent(r[0], AgentEventType(r[1]), agent_from_json(r[2]), from_micros(r[3]))
                for r in rows
            ]
            return events, int(compacted)

        return await self._read(read)

    async def compact_agent_events(self, keep: int) -> int:
        def job(conn: sqlite3.Connection, _events: list[AgentEvent]) -> int:
            compacted = int(
                conn.execute("SELECT value FROM meta WHERE key = 'compacted_revision'").fetchone()[
                    0
                ]
            )
            cutoff = self._revision - keep
            if cutoff > compacted:
                conn.execute("DELETE FROM agent_events WHERE revision <= ?", (cutoff,))
                conn.execute(
                    "UPDATE meta SET value = ? WHERE key = 'compacted_revision'", (cutoff,)
                )
                compacted = cutoff
            return compacted

        return await self._write(job)

    async def current_revision(self) -> int:
        return self._committed_revision
