"""The SQLite file going bad, as an operator meets it: a corrupt page refuses start-up
with one line (or, with the quick check skipped, reads reaching it are DATA_LOSS),
and a full disk fails calls with UNAVAILABLE, logged once per burst, losing nothing
acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from opspawn.opscore.v1 import lifecycle_pb2 as pb
from opspawn.opscore.v1 import lifecycle_pb2_grpc

from opscore.protocol.errors import DataLossError
from opscore.sdk import OpsCoreClient

if TYPE_CHECKING:
    from conftest import Rpc, ServerProcess, SpawnServer, Stub

REPO_ROOT = Path(__file__).resolve().parents[2]
AGENTS = [f"agent-{i:02d}" for i in range(20)]
# ~15 KB per agent, within the metadata limits: the agents and their events span
# many pages.
METADATA = {f"key-{i:02d}": "v" * 1000 for i in range(15)}
TABLE_INTERIOR, TABLE_LEAF = 0x05, 0x0D  # b-tree page types (sqlite.org/fileformat.html)


def _env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("OPSCORE_")}, **extra}


async def _register_agents(stub: Stub) -> None:
    for agent_id in AGENTS:
        await stub.RegisterAgent(
            pb.RegisterAgentRequest(agent_id=agent_id, name=agent_id, metadata=METADATA)
        )


def _page_in_the_middle(db: Path, table: str) -> tuple[int, int]:
    """(page number, page size) of a leaf from the middle of `table`'s b-tree, whose
    root (an interior page: the table spans pages) lists the children."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        query = "SELECT rootpage FROM sqlite_master WHERE name = ?"
        root = int(conn.execute(query, (table,)).fetchone()[0])
    data = db.read_bytes()
    page = data[(root - 1) * page_size : root * page_size]
    assert page[0] == TABLE_INTERIOR, f"{table} fits in one page: write more rows"
    cells = int.from_bytes(page[3:5], "big")
    cell_offsets = [int.from_bytes(page[12 + 2 * i : 14 + 2 * i], "big") for i in range(cells)]
    children = [int.from_bytes(page[at : at + 4], "big") for at in cell_offsets]
    children.append(int.from_bytes(page[8:12], "big"))  # the right-most child
    middle = children[len(children) // 2]
    assert data[(middle - 1) * page_size] == TABLE_LEAF
    return middle, page_size


async def _corrupt_database(spawn_server: SpawnServer, db: Path) -> None:
    """Builds a database through the API, stops the server, then overwrites a page in
    the middle of the agent event log (which start-up never reads)."""
    process = await spawn_server(db)
    async with grpc.aio.insecure_channel(process.address) as channel:
        await _register_agents(lifecycle_pb2_grpc.LifecycleServiceStub(channel))
    process.terminate()
    assert await process.wait_exit(10) == 0, process.log_tail()
    _overwrite_page_in_the_middle(db, "agent_events")


def _overwrite_page_in_the_middle(db: Path, table: str) -> None:
    assert not Path(f"{db}-wal").exists(), "the WAL was not checkpointed at shutdown"
    number, page_size = _page_in_the_middle(db, table)
    with db.open("r+b") as file:
        file.seek((number - 1) * page_size)
        file.write(b"\xff" * page_size)


async def test_corrupt_page_refuses_start_with_one_line(
    spawn_server: SpawnServer, tmp_path: Path
) -> None:
    """A database with a corrupted page in the middle does not start: the server exits
    non-zero with one line naming the file and the setting that skips the check, no
    traceback, and the file is left as it was."""
    db = tmp_path / "corrupt.db"
    await _corrupt_database(spawn_server, db)
    before = db.read_bytes()

    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "opscore", "serve", "--port", "0", "--db", str(db)],
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    # JSON log lines aside (the warning that authentication is off), one line.
    lines = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1, done.stderr
    assert str(db) in lines[0] and "quick check" in lines[0]
    assert "OPSCORE_SQLITE_QUICK_CHECK=false" in lines[0]
    assert '"serving"' not in done.stderr
    assert db.read_bytes() == before


async def test_skipped_check_serves_and_reads_of_the_damage_are_data_loss(
    spawn_server: SpawnServer, tmp_path: Path, rpc: Rpc
) -> None:
    """With the quick check skipped the same file serves; a replay that reaches the
    corrupted page ends with DATA_LOSS (not INTERNAL), every time, while what the
    damage does not touch still works; the log says so in one line, counting the rest."""
    db = tmp_path / "corrupt.db"
    await _corrupt_database(spawn_server, db)
    process = await spawn_server(db, OPSCORE_SQLITE_QUICK_CHECK="false")

    async with grpc.aio.insecure_channel(process.address) as channel:
        stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        agent = await stub.GetAgent(pb.GetAgentRequest(agent_id=AGENTS[0]))
        assert dict(agent.metadata) == METADATA
        listed = await stub.ListAgents(pb.ListAgentsRequest(page_size=100))
        assert [a.agent_id for a in listed.agents] == AGENTS
        for _ in range(3):
            call = stub.WatchAgentStates(pb.WatchAgentStatesRequest(since_revision=0))
            failure, _events = await rpc.stream_fails(call, grpc.StatusCode.DATA_LOSS)
            assert failure.reason == "DATA_LOSS"
            assert "corrupt" in failure.message and "backup" in failure.message
            assert str(db) not in failure.message  # callers are not told server paths
        assert await stub.GetAgent(pb.GetAgentRequest(agent_id=AGENTS[-1])) == listed.agents[-1]

    # The SDK raises it instead of resuming the watch for ever (it is no outage).
    async with OpsCoreClient(process.address) as client:
        with pytest.raises(DataLossError):
            async with asyncio.timeout(30):  # a hang guard: resuming would never end
                async for _event in client.watch_agents(since_revision=0):
                    pass

    logged = [line for line in process.log_lines() if "corrupt" in line["msg"]]
    assert [(line["level"], line["db"]) for line in logged] == [("ERROR", str(db))]
    assert not [line for line in process.log_lines() if line["msg"] == "unexpected error"]
    process.terminate()
    assert await process.wait_exit(10) == 0, process.log_tail()
    summaries = [line for line in process.log_lines() if "corrupt" in line["msg"]][1:]
    assert [line.get("failures") for line in summaries] == [3]


def _limit_file_size(process: ServerProcess, limit: int) -> tuple[int, int]:
    """Makes every file of the server stop at `limit` bytes (RLIMIT_FSIZE: a write at or
    past it fails, as on a full disk); returns the limits before."""
    return resource.prlimit(
        process.proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY)
    )


async def test_full_disk_fails_calls_unavailable_logged_once_per_burst(
    spawn_server: SpawnServer, tmp_path: Path, rpc: Rpc
) -> None:
    """While the disk is full every state report either is acknowledged or fails with
    UNAVAILABLE (STORAGE_UNAVAILABLE), never INTERNAL; the log has one traceback per
    kind of failure and counts the rest; after space returns, writes work again and
    every acknowledged report survives a restart."""
    db = tmp_path / "full.db"
    process = await spawn_server(db)
    acked: dict[int, tuple[str, int]] = {}  # revision -> (agent, n)
    last_acked: dict[str, int] = {}
    failures: list[tuple[grpc.StatusCode, str | None]] = []

    async with grpc.aio.insecure_channel(process.address) as channel:
        stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        await _register_agents(stub)

        async def report(agent_id: str, n: int) -> bool:
            request = pb.UpdateAgentStateRequest(
                agent_id=agent_id,
                state=pb.AGENT_STATE_BUSY,
                details=rpc.struct(n=n, padding="p" * 4000),
            )
            try:
                reply = await stub.UpdateAgentState(request, timeout=30)
            except grpc.aio.AioRpcError as err:
                failures.append((err.code(), rpc.describe(err).reason))
                return False
            acked[reply.revision] = (agent_id, n)
            last_acked[agent_id] = n
            return True

        # The disk fills up: the log may still grow by 64 KB, the database cannot (it
        # is larger once the WAL is checkpointed into it).
        limit = process.log.stat().st_size + 64 * 1024
        n = 0

        async def checkpointed() -> bool:
            nonlocal n
            assert await report(AGENTS[n % len(AGENTS)], n)
            n += 1
            return db.stat().st_size > limit

        await rpc.eventually(checkpointed, within=10, message="the database outgrows the limit")
        before = _limit_file_size(process, limit)
        while await report(AGENTS[n % len(AGENTS)], n):  # until the first failure
            n += 1
            assert n < 1000, "writes never failed with the disk full"

        async def burst(agent_id: str) -> None:
            for i in range(10):  # sequential per agent, so the calls span many commits
                await report(agent_id, n + 1 + i)

        await asyncio.gather(*(burst(agent_id) for agent_id in AGENTS))
        assert len(failures) > 100
        assert set(failures) == {(grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE")}

        resource.prlimit(process.proc.pid, resource.RLIMIT_FSIZE, before)
        assert await report(AGENTS[0], n + 100), "writes still fail after the disk has room"

    process.terminate()
    assert await process.wait_exit(10) == 0, process.log_tail()
    lines = process.log_lines()
    writes = [line for line in lines if line["msg"].startswith("write failed")]
    assert [line["level"] for line in writes][:1] == ["ERROR"] and "exc" in writes[0]
    summaries = writes[1:]
    assert summaries and all(line["level"] == "WARNING" for line in summaries)
    assert all("exc" not in line and line["failures"] >= 1 for line in summaries)
    # One traceback per kind of failure (writes, WAL checkpoints), not one per call.
    with_traceback = [line["msg"] for line in lines if "exc" in line]
    assert len(with_traceback) == len(set(with_traceback)) <= 2, with_traceback

    restarted = await spawn_server(db)
    async with grpc.aio.insecure_channel(restarted.address) as channel:
        stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        for agent_id, last in last_acked.items():
            agent = await stub.GetAgent(pb.GetAgentRequest(agent_id=agent_id))
            assert agent.state_details["n"] >= last, agent_id
        events = await rpc.replay(stub, 0, max(acked))
        by_revision: dict[int, Any] = {e.revision: e for e in events}
        missing = sorted(set(acked) - set(by_revision))
        assert not missing, f"acknowledged revisions missing after restart: {missing[:10]}"
        for revision, (agent_id, n) in acked.items():
            assert by_revision[revision].agent.agent_id == agent_id
            assert by_revision[revision].agent.state_details["n"] == n
