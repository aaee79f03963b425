"""The embedded SQLite store.

Writes are group-committed: every queued change runs as synchronous code inside one
transaction (a SAVEPOINT per change, so a refused change rolls back alone), then one
COMMIT. Where the batch runs matters more than anything else for latency:

* With `synchronous=NORMAL` (the default) a WAL commit appends pages to the WAL file
  and never waits for the disk, so batches run on the event-loop thread (~0.1 ms per
  commit). Handing them to a thread instead costs a GIL handoff per statement, and
  under load each handoff waits up to the interpreter's switch interval (5 ms):
  that was most of the watch latency. Checkpoints, which do fsync, run on the writer
  thread every half second, then catch up briefly on the loop (see _write_loop).
* With `synchronous=FULL` every commit fsyncs, so batches run on the writer thread
  (SQLite's own auto-checkpoint included).

Why not aiosqlite: it hops to its thread once per statement, the cost described
above. Reads run on a small pool of reader threads with their own connections; WAL
gives them consistent snapshots while the writer works.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from opscore.definitions import WorkflowDefinition
from opscore.errors import (
    OpsCoreError,
    SessionNotFoundError,
    StorageError,
    WorkflowDefinitionError,
)
from opscore.models import Agent, AgentEvent, AgentEventType, AgentFilter, AgentState
from opscore.runs import Assignment, Claim, Offer, Run, RunFilter, SessionEvent, TaskKey
from opscore.store import sqlite_runs as runs_sql
from opscore.store.base import AgentDecision, Store
from opscore.store.codec import (
    AGENT_COLUMNS,
    AGENT_STATE_ASSIGNMENTS,
    agent_from_json,
    agent_from_row,
    agent_to_json,
    agent_to_row,
    definition_from_json,
    definition_to_json,
    from_micros,
    to_micros,
)
from opscore.store.sqlite_schema import MIGRATIONS

log = logging.getLogger(__name__)

CHECKPOINT_INTERVAL = 0.5  # seconds between WAL checkpoints when batches run inline
WAL_SIZE_LIMIT = 64 * 1024 * 1024  # the WAL file is truncated to this after a checkpoint
DELETE_CHUNK = 2000  # rows (events) deleted per write by housekeeping

R = TypeVar("R")
# A write job: runs inside the batch transaction (on the loop or the writer thread, see
# above), appending the events it creates to the list it is given.
WriteFn = Callable[[sqlite3.Connection, list[Any]], R]


@dataclass
class _Job:
    fn: WriteFn[Any]
    future: asyncio.Future[Any]
    events: list[Any] = field(default_factory=list)
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
        self._inline = synchronous == "NORMAL"  # see the module docstring
        self._max_batch = max_batch
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="sqlite-reader")
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._conn: sqlite3.Connection | None = None
        self._checkpoint_conn: sqlite3.Connection | None = None  # inline mode, writer thread
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._loop_task: asyncio.Task[None] | None = None
        self._revision = 0  # the batch runner's: the last revision handed out
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
            conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            if self._inline:
                conn.execute("PRAGMA wal_autocheckpoint=0")  # _checkpoint does it
            self._migrate(conn)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open database {self._path}: {exc}") from exc
        self._conn = conn
        self._revision = self._committed_revision = self._read_revision(conn)
        if self._inline:
            self._checkpoint_conn = sqlite3.connect(
                self._path, isolation_level=None, check_same_thread=False
            )

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
        for conn in (self._conn, self._checkpoint_conn):
            if conn is not None:
                await loop.run_in_executor(self._writer, conn.close)
        self._conn = self._checkpoint_conn = None
        self._writer.shutdown()
        # Reads still running (e.g. of a call cancelled by shutdown) must finish before
        # their connections close under them.
        await asyncio.to_thread(self._readers.shutdown, wait=True)
        for conn in self._reader_conns:
            conn.close()
        self._reader_conns.clear()

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
        next_checkpoint = loop.time() + CHECKPOINT_INTERVAL
        copying: asyncio.Future[None] | None = None
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
            if self._inline:
                self._run_batch(batch)
            else:
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
            if self._inline:
                # Copy the WAL into the database on the writer thread's own connection
                # (slow: every page written since the last time), then catch up here on
                # the few frames committed meanwhile, so the checkpoint completes and the
                # next commit restarts the WAL instead of growing it.
                if copying is None and loop.time() >= next_checkpoint:
                    copying = loop.run_in_executor(self._writer, self._checkpoint, True)
                elif copying is not None and copying.done():
                    copying = None
                    self._checkpoint(False)
                    next_checkpoint = loop.time() + CHECKPOINT_INTERVAL
        if copying is not None:
            await copying

    def _checkpoint(self, background: bool) -> None:
        conn = self._checkpoint_conn if background else self._conn
        assert conn is not None
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            log.exception("WAL checkpoint failed; retrying later")

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

        try:
            future = asyncio.get_running_loop().run_in_executor(self._readers, run)
        except RuntimeError:  # the reader pool is shut down
            raise StorageError("store is closed") from None
        return await future

    # -- agents ------------------------------------------------------------------

    async def change_agent(
        self, agent_id: str, decide: AgentDecision
    ) -> tuple[Agent, AgentEvent | None]:
        def job(conn: sqlite3.Connection, events: list[Any]) -> tuple[Agent, AgentEvent | None]:
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
                    f"INSERT INTO agents ({AGENT_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    agent_to_row(agent),
                )
            elif change.agent is not current:  # UPDATE: REPLACE would redo every index entry
                conn.execute(
                    f"UPDATE agents SET {AGENT_STATE_ASSIGNMENTS} WHERE agent_id = ?",
                    (*agent_to_row(agent)[1:], agent_id),
                )
            return agent, event

        return await self._write(job)

    async def agent_tokens(self) -> dict[str, str]:
        def read(conn: sqlite3.Connection) -> dict[str, str]:
            return dict(conn.execute("SELECT sha256, agent_id FROM agent_tokens").fetchall())

        return await self._read(read)

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

    async def list_agents(
        self, flt: AgentFilter, after_id: str, limit: int
    ) -> tuple[list[Agent], int]:
        where, params = self._filter_sql(flt)

        def read(conn: sqlite3.Connection) -> tuple[list[Agent], int]:
            rows = conn.execute(
                f"SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id > ? AND {where} "
                "ORDER BY agent_id LIMIT ?",
                (after_id, *params, limit),
            ).fetchall()
            return [agent_from_row(r) for r in rows], self._read_revision(conn)

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
        """Deletes in chunks, each its own write, so a large backlog (a first
        compaction, a long-idle server) never holds the writer or the loop for long."""

        def job(conn: sqlite3.Connection, _events: list[Any]) -> tuple[int, bool]:
            compacted = int(
                conn.execute("SELECT value FROM meta WHERE key = 'compacted_revision'").fetchone()[
                    0
                ]
            )
            cutoff = min(self._revision - keep, compacted + DELETE_CHUNK)
            if cutoff <= compacted:
                return compacted, True
            conn.execute("DELETE FROM agent_events WHERE revision <= ?", (cutoff,))
            conn.execute("UPDATE meta SET value = ? WHERE key = 'compacted_revision'", (cutoff,))
            return cutoff, False

        while True:
            compacted, done = await self._write(job)
            if done:
                return compacted

    async def current_revision(self) -> int:
        return self._committed_revision

    # -- workflow definitions ------------------------------------------------------

    async def create_definition(self, definition: WorkflowDefinition) -> WorkflowDefinition:
        def job(conn: sqlite3.Connection, _events: list[Any]) -> WorkflowDefinition:
            try:
                conn.execute(
                    "INSERT INTO workflow_definitions (id, version, seq, body) VALUES "
                    "(?, ?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM workflow_definitions), ?)",
                    (definition.id, definition.version, definition_to_json(definition)),
                )
            except sqlite3.IntegrityError:
                raise WorkflowDefinitionError(
                    f"workflow definition {definition.id!r} version {definition.version!r} "
                    "already exists; use a new version",
                    workflow_definition_id=definition.id,
                ) from None
            return definition

        return await self._write(job)

    async def get_definition(self, definition_id: str, version: str) -> WorkflowDefinition | None:
        def read(conn: sqlite3.Connection) -> WorkflowDefinition | None:
            if version:
                row = conn.execute(
                    "SELECT body FROM workflow_definitions WHERE id = ? AND version = ?",
                    (definition_id, version),
                ).fetchone()
            else:
                row = conn.execute(
                    "SELECT body FROM workflow_definitions WHERE id = ? ORDER BY seq DESC LIMIT 1",
                    (definition_id,),
                ).fetchone()
            return None if row is None else definition_from_json(row[0])

        return await self._read(read)

    async def list_definitions(
        self, after: tuple[str, str], limit: int
    ) -> list[WorkflowDefinition]:
        def read(conn: sqlite3.Connection) -> list[WorkflowDefinition]:
            rows = conn.execute(
                "SELECT body FROM workflow_definitions WHERE (id, version) > (?, ?) "
                "ORDER BY id, version LIMIT ?",
                (*after, limit),
            ).fetchall()
            return [definition_from_json(r[0]) for r in rows]

        return await self._read(read)

    async def delete_definition(self, definition_id: str, version: str) -> bool:
        def job(conn: sqlite3.Connection, _events: list[Any]) -> bool:
            cursor = conn.execute(
                "DELETE FROM workflow_definitions WHERE id = ? AND version = ?",
                (definition_id, version),
            )
            return cursor.rowcount > 0

        return await self._write(job)

    # -- runs ----------------------------------------------------------------------

    async def create_run(self, run: Run) -> tuple[Run, bool]:
        def job(conn: sqlite3.Connection, events: list[Any]) -> tuple[Run, bool]:
            if run.request_id:
                row = conn.execute(
                    f"SELECT {runs_sql.SESSION_COLUMNS} FROM sessions WHERE request_id = ?",
                    (run.request_id,),
                ).fetchone()
                if row is not None:
                    return runs_sql.run_from_rows(conn, row), False
            runs_sql.insert_run(conn, run)
            events.extend(run.new_events)
            return run, True

        return await self._write(job)

    async def change_run(self, session_id: str, change: Callable[[Run], R]) -> tuple[R, Run]:
        def job(conn: sqlite3.Connection, events: list[Any]) -> tuple[R, Run]:
            run = runs_sql.load_run(conn, session_id)
            if run is None:
                raise SessionNotFoundError(session_id)
            result = change(run)
            runs_sql.save_run(conn, run)
            events.extend(run.new_events)
            return result, run

        return await self._write(job)

    async def get_run(self, session_id: str) -> Run | None:
        return await self._read(lambda conn: runs_sql.load_run(conn, session_id))

    async def claim_tasks(
        self,
        offers: list[Offer],
        now: datetime,
        dispatch: Callable[[Run, str, str], Assignment],
    ) -> Claim:
        total = sum(o.slots for o in offers)
        limit = total * 4 + 16  # rows per look: enough for every slot, some left behind

        def job(conn: sqlite3.Connection, events: list[Any]) -> Claim:
            slots = [o.slots for o in offers]
            runs: dict[str, Run] = {}
            claimed: list[tuple[int, Assignment]] = []
            left_behind: set[str] = set()
            after = (-1, -1)  # (ready_at, rowid) of the last row looked at
            while True:
                # Only rows some offer with a free slot may take: a backlog pinned to
                # busy agents, or of capabilities whose agents are full, never fills
                # the window ahead of work an idle agent could take.
                open_offers = [o for o, free in zip(offers, slots, strict=True) if free > 0]
                wanted = sorted({c for o in open_offers for c in o.capabilities})
                agents = sorted({o.agent_id for o in open_offers})
                if not wanted:
                    return self._claimed(conn, events, claimed, runs, now, set())
                rows = conn.execute(
                    "SELECT ready_at, rowid, session_id, task_id, capability, pinned_agent "
                    "FROM tasks WHERE ready_at IS NOT NULL AND ready_at <= ? "
                    "AND (ready_at, rowid) > (?, ?) "
                    f"AND capability IN ({', '.join('?' * len(wanted))}) "
                    f"AND pinned_agent IN ('', {', '.join('?' * len(agents))}) "
                    "ORDER BY ready_at, rowid LIMIT ?",
                    (to_micros(now), *after, *wanted, *agents, limit),
                ).fetchall()
                for _ready_at, _rowid, session_id, task_id, capability, pinned in rows:
                    chosen = next(
                        (
                            i
                            for i, o in enumerate(offers)
                            if slots[i] > 0
                            and capability in o.capabilities
                            and pinned in ("", o.agent_id)
                        ),
                        None,
                    )
                    if chosen is None:
                        left_behind.add(capability)
                        continue
                    run = runs.get(session_id) or runs_sql.load_run(conn, session_id)
                    assert run is not None
                    runs[session_id] = run
                    claimed.append((chosen, dispatch(run, task_id, offers[chosen].agent_id)))
                    slots[chosen] -= 1
                if len(rows) < limit:  # every row the open offers may take was seen
                    maybe_exhausted = set(wanted) - left_behind if any(slots) else set()
                    return self._claimed(conn, events, claimed, runs, now, maybe_exhausted)
                after = (rows[-1][0], rows[-1][1])

        if total <= 0:
            return Claim([], [], frozenset())
        return await self._write(job)

    @staticmethod
    def _claimed(
        conn: sqlite3.Connection,
        events: list[Any],
        claimed: list[tuple[int, Assignment]],
        runs: dict[str, Run],
        now: datetime,
        maybe_exhausted: set[str],
    ) -> Claim:
        """Saves the claimed runs; a capability is exhausted only if no ready task needs
        it at all (tasks pinned to busy agents included: their agents' freed slots must
        still wake the dispatcher)."""
        for run in runs.values():
            runs_sql.save_run(conn, run)
            events.extend(run.new_events)
        if maybe_exhausted:
            maybe_exhausted -= {
                row[0]
                for row in conn.execute(
                    "SELECT DISTINCT capability FROM tasks "
                    "WHERE ready_at IS NOT NULL AND ready_at <= ? "
                    f"AND capability IN ({', '.join('?' * len(maybe_exhausted))})",
                    (to_micros(now), *sorted(maybe_exhausted)),
                )
            }
        return Claim(claimed, list(runs.values()), frozenset(maybe_exhausted))

    async def expired_leases(self, now: datetime) -> list[TaskKey]:
        def read(conn: sqlite3.Connection) -> list[TaskKey]:
            rows = conn.execute(
                "SELECT session_id, task_id, attempt FROM tasks "
                "WHERE lease_expires_at IS NOT NULL AND lease_expires_at <= ?",
                (to_micros(now),),
            ).fetchall()
            return [TaskKey(*r) for r in rows]

        return await self._read(read)

    async def leased_tasks(self, agent_id: str | None = None) -> list[TaskKey]:
        def read(conn: sqlite3.Connection) -> list[TaskKey]:
            sql = (
                "SELECT session_id, task_id, attempt FROM tasks WHERE lease_expires_at IS NOT NULL"
            )
            params: tuple[Any, ...] = ()
            if agent_id is not None:
                sql += " AND agent_id = ?"
                params = (agent_id,)
            return [TaskKey(*r) for r in conn.execute(sql, params).fetchall()]

        return await self._read(read)

    async def list_session_events(
        self, session_id: str, after_sequence: int, limit: int
    ) -> list[SessionEvent]:
        def read(conn: sqlite3.Connection) -> list[SessionEvent]:
            rows = conn.execute(
                f"SELECT {runs_sql.EVENT_COLUMNS} FROM session_events "
                "WHERE session_id = ? AND sequence > ? ORDER BY sequence LIMIT ?",
                (session_id, after_sequence, limit),
            ).fetchall()
            return [runs_sql.event_from_row(r) for r in rows]

        return await self._read(read)

    async def secret(self, name: str) -> bytes:
        def job(conn: sqlite3.Connection, _events: list[Any]) -> bytes:
            row = conn.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()
            if row is not None:
                return bytes(row[0])
            value = os.urandom(32)
            conn.execute("INSERT INTO secrets (name, value) VALUES (?, ?)", (name, value))
            return value

        return await self._write(job)

    async def list_runs(self, flt: RunFilter, before_seq: int, limit: int) -> list[tuple[int, Run]]:
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

        def read(conn: sqlite3.Connection) -> list[tuple[int, Run]]:
            rows = conn.execute(
                f"SELECT seq, {runs_sql.SESSION_COLUMNS} FROM sessions "
                f"WHERE {' AND '.join(clauses)} ORDER BY seq DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
            return [(row[0], runs_sql.run_from_rows(conn, row[1:])) for row in rows]

        return await self._read(read)

    async def prune_runs(self, ended_before: datetime) -> int:
        """Deletes in chunks, each its own write (see compact_agent_events)."""

        def job(conn: sqlite3.Connection, _events: list[Any]) -> int:
            doomed = [
                r[0]
                for r in conn.execute(
                    "SELECT session_id FROM sessions WHERE ended_at IS NOT NULL AND ended_at < ? "
                    "LIMIT ?",
                    (to_micros(ended_before), max(1, DELETE_CHUNK // 8)),  # ~8 rows each
                )
            ]
            for table in ("session_events", "tasks", "sessions"):
                conn.executemany(
                    f"DELETE FROM {table} WHERE session_id = ?", [(s,) for s in doomed]
                )
            return len(doomed)

        pruned = 0
        while count := await self._write(job):
            pruned += count
        return pruned
