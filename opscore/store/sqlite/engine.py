"""The SQLite engine: connections, migrations at open, group commit and the reader
pool, with no knowledge of tables beyond the revision counter.

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

A damaged file is refused at open (SQLite's quick check, unless configured off) and,
found while serving, is a DataLossError: retrying cannot help. Other SQLite failures
(a full disk) are StorageErrors. Both are logged once per burst (`failures.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from opscore.protocol.errors import DataLossError, OpsCoreError, StorageError
from opscore.store.failures import FailureBurst
from opscore.store.sqlite import agents as agents_sql
from opscore.store.sqlite.migrations import migrate

log = logging.getLogger(__name__)

CHECKPOINT_INTERVAL = 0.5  # seconds between WAL checkpoints when batches run inline
WAL_SIZE_LIMIT = 64 * 1024 * 1024  # the WAL file is truncated to this after a checkpoint

# SQLite result codes (primary) saying the file itself is damaged.
DAMAGED = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})

R = TypeVar("R")
# A write job: runs inside the batch transaction (on the loop or the writer thread, see
# above), appending the events it creates to the list it is given.
WriteFn = Callable[[sqlite3.Connection, list[Any]], R]
# Hears the events of every committed batch, in commit order.
Announce = Callable[[list[Any]], None]


@dataclass
class _Job:
    fn: WriteFn[Any]
    future: asyncio.Future[Any]
    events: list[Any] = field(default_factory=list)
    outcome: tuple[bool, Any] = (False, None)


@dataclass(frozen=True)
class SqliteConfig:
    path: Path
    # NORMAL survives a killed process (WAL); FULL also survives power loss.
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    readers: int = 2
    max_batch: int = 256
    # SQLite's quick check at open reads every page (seconds per GB): off for huge files.
    quick_check: bool = True


def _damaged(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF in DAMAGED


class SqliteEngine:
    def __init__(self, config: SqliteConfig, announce: Announce) -> None:
        self._path = config.path
        self._synchronous = config.synchronous
        self._inline = config.synchronous == "NORMAL"  # see the module docstring
        self._max_batch = config.max_batch
        self._quick_check = config.quick_check
        self._announce = announce
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._readers = ThreadPoolExecutor(config.readers, thread_name_prefix="sqlite-reader")
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._conn: sqlite3.Connection | None = None
        self._checkpoint_conn: sqlite3.Connection | None = None  # inline mode, writer thread
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._loop_task: asyncio.Task[None] | None = None
        self._revision = 0  # the batch runner's: the last revision handed out
        self.committed_revision = 0
        self._closing = False  # no new writes once close() has begun
        self._commit_failures = FailureBurst(log, "write failed")
        self._checkpoint_failures = FailureBurst(log, "WAL checkpoint failed; retrying later")
        self._read_failures = FailureBurst(log, "read failed")
        self._corruption = FailureBurst(log, "database file is corrupt; restore it from a backup")

    async def open(self) -> None:
        self._closing = False
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._open_writer)
        self._loop_task = asyncio.create_task(self._write_loop(), name="sqlite-group-commit")

    def _open_writer(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        doing = f"cannot open database {self._path}"
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._error(exc, doing) from exc
        try:
            if self._quick_check:
                self._check(conn)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            if self._inline:
                conn.execute("PRAGMA wal_autocheckpoint=0")  # _checkpoint does it
            migrate(conn)
            revision = agents_sql.read_revision(conn)
            if self._inline:
                self._checkpoint_conn = sqlite3.connect(
                    self._path, isolation_level=None, check_same_thread=False
                )
        except Exception as exc:
            conn.close()  # a refused start leaves no connection behind
            if isinstance(exc, sqlite3.Error):
                raise self._error(exc, doing) from exc
            raise
        self._conn = conn
        self._revision = self.committed_revision = revision

    def _check(self, conn: sqlite3.Connection) -> None:
        """Refuses a damaged file before serving from it (or migrating it): without
        this, a bad page in the middle surfaced only when a read reached it."""
        problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check(2)")]
        if problems != ["ok"]:
            first = " ".join(problems[0].split())  # SQLite's report spans lines
            more = ", and more" if len(problems) > 1 else ""
            raise DataLossError(
                f"database {self._path} failed SQLite's quick check ({first}{more}); "
                "restore it from a backup, or set OPSCORE_SQLITE_QUICK_CHECK=false to "
                "start without the check"
            )

    def _error(self, exc: sqlite3.Error, doing: str) -> OpsCoreError:
        """The error for a failed SQLite call: a damaged file is data loss, not retried."""
        if _damaged(exc):
            return DataLossError(
                f"{doing}: the database is corrupt ({exc}); restore it from a backup"
            )
        return StorageError(f"{doing}: {exc}")

    def _failed(self, exc: sqlite3.Error, burst: FailureBurst) -> None:
        """Logs a failed SQLite call once per burst; a damaged file has its own."""
        (self._corruption if _damaged(exc) else burst).failed(exc, db=str(self._path))

    async def close(self) -> None:
        self._closing = True
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
        for burst in (
            self._commit_failures,
            self._checkpoint_failures,
            self._read_failures,
            self._corruption,
        ):
            burst.flush()

    # -- group commit ------------------------------------------------------------

    async def write(self, fn: WriteFn[R]) -> R:
        if self._loop_task is None or self._closing:
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
            self.committed_revision = self._revision
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
        except sqlite3.Error as exc:
            self._failed(exc, self._checkpoint_failures)
        else:
            self._checkpoint_failures.flush()

    def _run_batch(self, batch: Sequence[_Job]) -> None:
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                self._run_job(conn, job)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._failed(exc, self._commit_failures)
            with contextlib.suppress(sqlite3.Error):  # a failed write may have ended it
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            self._revision = self.committed_revision
            failure = self._error(exc, "write failed, nothing committed")
            for job in batch:
                job.outcome, job.events = (False, failure), []
        else:
            self._commit_failures.flush()

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
                self._failed(exc, self._commit_failures)
                exc = self._error(exc, "write failed")
            elif not isinstance(exc, OpsCoreError):
                log.exception("write job failed")
            job.outcome = (False, exc)

    @property
    def revision(self) -> int:
        """Inside a write job: the last revision handed out so far."""
        return self._revision

    def next_revision(self) -> int:
        """The revision of the next agent event (called inside a write job)."""
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

    async def read(self, fn: Callable[[sqlite3.Connection], R]) -> R:
        """Runs `fn` on a reader thread inside one read transaction (one snapshot)."""

        def run() -> R:
            try:
                conn = self._reader()
                conn.execute("BEGIN")
                try:
                    result = fn(conn)
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._failed(exc, self._read_failures)
                raise self._error(exc, "read failed") from exc
            self._read_failures.flush()
            return result

        try:
            future = asyncio.get_running_loop().run_in_executor(self._readers, run)
        except RuntimeError:  # the reader pool is shut down
            raise StorageError("store is closed") from None
        return await future
