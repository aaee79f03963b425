"""The SQLite store checkpoints its WAL itself when commits run on the event loop
(SQLite's auto-checkpoint is off there): under continuous writes the WAL must still
restart from its beginning instead of growing without bound."""

from __future__ import annotations

import struct
import time
from pathlib import Path

from opscore.models import AgentState
from opscore.store import sqlite as sqlite_store
from opscore.store.sqlite import SqliteStore
from tests.store.test_store_contract import create, new_agent, set_state


def wal_frames(db: Path) -> int:
    """mxFrame, the last valid WAL frame, from the wal-index header in the -shm file
    (offset 16, native byte order: https://sqlite.org/walformat.html). Reading it
    takes no lock and so cannot itself checkpoint or restart anything."""
    with open(f"{db}-shm", "rb") as shm:
        header = shm.read(20)
    return int(struct.unpack("=I", header[16:20])[0])


async def test_wal_restarts_under_continuous_writes(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    store = SqliteStore(db)
    await store.open()
    try:
        await store.change_agent("a", create(new_agent("a")))
        size_at_start = db.stat().st_size
        commits = restarts = 0
        last = wal_frames(db)
        deadline = time.monotonic() + 3 * sqlite_store.CHECKPOINT_INTERVAL
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
