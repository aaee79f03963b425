"""Workflow durability against a real `python -m opscore serve` process: kill -9 with
tasks queued and in flight, and a graceful restart."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
from opspawn.opscore.v1 import session_pb2 as S
from opspawn.opscore.v1 import workflow_pb2 as W
from workflow_support import Harness, definition, of_type, task, task_of, to_dict

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Rpc, SpawnServer

PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
ONE_ATTEMPT = {"max_attempts": 1}
CHAIN = definition(
    "durable",
    task("a", "work", next_task_id="b", retry=ONE_ATTEMPT),
    task("b", "work", retry=ONE_ATTEMPT),
)


async def test_kill_9_with_tasks_queued_and_in_flight(
    spawn_server: SpawnServer, tmp_path: Path, rpc: Rpc
) -> None:
    """After kill -9 and a restart on the same file, every acknowledged completion is
    kept and idempotent starts still find their session. Nothing is re-queued at the
    restart: the reconnecting agent says it still runs one attempt (the stream adopts
    it, and its answer with the old token is accepted); the other one it held never
    reached it, so it is dispatched again under the same attempt number
    (max_attempts=1 still holds), and every session finishes."""
    db = tmp_path / "durable.db"
    first = await spawn_server(db)
    async with grpc.aio.insecure_channel(first.address) as channel:
        ops = Harness(channel, None)
        await ops.define(CHAIN)
        agent = await ops.agent("worker", ["work"], max_in_flight=2)
        sids = [
            (await ops.start("durable", {"i": i}, request_id=f"req-{i}")).session_id
            for i in range(4)
        ]
        a0, a1 = await agent.take(2)
        assert [(a.session_id, a.task_id) for a in (a0, a1)] == [(sids[0], "a"), (sids[1], "a")]
        await agent.complete(a0, {"n": 0})
        a2 = await agent.next()
        assert (a2.session_id, a2.task_id) == (sids[2], "a")
        await agent.expect_none(0.2)

        first.kill()
        assert await first.wait_exit(10) is not None
        await ops.close()

    second = await spawn_server(db)
    async with grpc.aio.insecure_channel(second.address) as channel:
        ops = Harness(channel, None)
        s0 = await ops.session(sids[0])
        assert task_of(s0, "a").status == S.TASK_STATUS_COMPLETED
        assert to_dict(task_of(s0, "a").output) == {"n": 0.0}
        for sid in sids[1:3]:  # still leased: nothing was re-queued at start
            current = await ops.session(sid)
            assert (task_of(current, "a").status, task_of(current, "a").attempt) == (
                S.TASK_STATUS_DISPATCHED,
                1,
            )
        again = await ops.start("durable", {"i": 99}, request_id="req-0")
        assert again.session_id == sids[0]

        agent = await ops.agent("worker", ["work"], max_in_flight=10, connect=False)
        await agent.connect(held=[a1])
        delivered = await agent.take(3)
        got = {(a.session_id, a.task_id): a for a in delivered}
        assert set(got) == {(sids[0], "b"), (sids[2], "a"), (sids[3], "a")}
        assert {a.attempt for a in delivered} == {1}
        await agent.expect_none(0.2)
        await agent.complete(a1, {"by": "a"})  # the adopted attempt's old token

        for assignment in delivered:
            await agent.complete(assignment, {"by": assignment.task_id})
        for assignment in await agent.take(3):
            assert (assignment.task_id, assignment.attempt) == ("b", 1)
            await agent.complete(assignment, {"by": "b"})
        for sid in sids:
            done = await ops.wait_status(sid, S.SESSION_STATUS_COMPLETED)
            assert to_dict(done.output) == {"b": {"by": "b"}}
            assert {t.attempt for t in done.tasks} == {1}
            history = await ops.events(sid)
            assert [e.sequence for e in history] == list(range(1, len(history) + 1))
            assert not of_type(history, "TASK_FAILED") and not of_type(history, "TASK_TIMED_OUT")
        taken_back = of_type(await ops.events(sids[2]), "TASK_QUEUED")[1]
        assert to_dict(taken_back.detail)["reason"] == "agent reconnected without it"
        adopted = of_type(await ops.events(sids[1]), "TASK_DISPATCHED")
        assert [e.task_id for e in adopted] == ["a", "b"]  # a was dispatched once
        await ops.close()


async def test_graceful_restart_keeps_definitions_sessions_and_history(
    spawn_server: SpawnServer, tmp_path: Path
) -> None:
    """SIGTERM ends open task streams (UNAVAILABLE) and the server exits 0; after a
    restart definitions, sessions and their histories read back unchanged, and the
    interrupted run continues."""
    db = tmp_path / "graceful.db"
    first = await spawn_server(db, OPSCORE_SHUTDOWN_GRACE="1")
    async with grpc.aio.insecure_channel(first.address) as channel:
        ops = Harness(channel, None)
        stored = await ops.define(CHAIN)
        agent = await ops.agent("worker", ["work"])
        session = await ops.start("durable")
        await agent.complete(await agent.next(), {"step": "a"})
        await agent.next()
        before = await ops.session(session.session_id)
        history = await ops.events(session.session_id)

        first.terminate()
        assert await first.wait_exit(10) == 0
        for _ in range(100):
            if not agent.streaming:
                break
            await asyncio.sleep(0.02)
        assert agent.error is not None
        assert agent.error.code() == grpc.StatusCode.UNAVAILABLE
        await ops.close()

    second = await spawn_server(db)
    async with grpc.aio.insecure_channel(second.address) as channel:
        ops = Harness(channel, None)
        got = await ops.workflow.GetWorkflowDefinition(W.GetWorkflowDefinitionRequest(id="durable"))
        assert got == stored
        after = await ops.session(session.session_id)
        assert after.created_at == before.created_at
        assert to_dict(task_of(after, "a").output) == {"step": "a"}
        assert (await ops.events(session.session_id))[: len(history)] == history

        # The agent lost b with its connection and says so (it holds nothing): b goes
        # back to the queue under the same attempt number.
        agent = await ops.agent("worker", ["work"])
        b = await agent.next()
        assert (b.session_id, b.task_id, b.attempt) == (session.session_id, "b", 1)
        await agent.complete(b)
        await ops.wait_status(session.session_id, S.SESSION_STATUS_COMPLETED)
        await ops.close()
