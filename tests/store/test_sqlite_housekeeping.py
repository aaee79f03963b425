"""SQLite housekeeping that must not stall the server: the WAL checkpoints the store
runs itself when commits run on the event loop (SQLite's auto-checkpoint is off
there), and compaction in bounded chunks."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from opscore.protocol.enums import AgentState
from opscore.store.sqlite import agents as agents_sql
from opscore.store.sqlite import engine as sqlite_engine
from opscore.store.sqlite.engine import SqliteConfig
from opscore.store.sqlite.store import SqliteStore
from tests.store.test_store_contract import create, new_agent, set_state


async def test_compaction_deletes_in_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog bigger than one chunk is compacted by several writes, to the same end."""
    monkeypatch.setattr(agents_sql, "DELETE_CHUNK", 3)
    store = SqliteStore(SqliteConfig(tmp_path / "store.db"))
    await store.open()
    try:
        await store.change_agent("a", create(new_agent("a")))
        for i in range(20):
            await store.change_agent("a", set_state((AgentState.IDLE, AgentState.BUSY)[i % 2]))
        assert await store.compact_agent_events(keep=5) == 16
        events, compacted = await store.agent_events_after(0, 100)
        assert compacted == 16 and [e.revision for e in events] == [17, 18, 19, 20, 21]
    finally:
        await store.close()


def wal_frames(db: Path) -> int:
    """mxFrame, the last valid WAL frame, from the wal-index header in the -shm file
    (offset 16, native byte order: https://sqlite.org/walformat.html). Reading it
    takes no lock and so cannot itself checkpoint or restart anything."""
    with open(f"{db}-shm", "rb") as shm:
        header = shm.read(20)
    return int(struct.unpack("=I", header[16:20])[0])


async def test_wal_restarts_under_continuous_writes(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    store = SqliteStore(SqliteConfig(db))
    await store.open()
    try:
        await store.change_agent("a", create(new_agent("a")))
        size_at_start = db.stat().st_size
        commits = restarts = 0
        last = wal_frames(db)
        deadline = time.monotonic() + 3 * sqlite_engine.CHECKPOINT_INTERVAL
        while time.monotonic() < deadline:  # one commit per change: never a quiet spell
            state = (AgentState.IDLE, AgentState.BUSY)[commits % 2]
            await store.change_agent("a", set_state(state))
            commits += 1
            frames = wal_frames(db)
            restarts += frames < last
            last = frames
    finally:
        await store.close()
    assert commits > 500
    assert db.stat().st_size > size_at_start  # pages were copied while writes went on
    assert restarts >= 2
