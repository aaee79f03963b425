"""execute_workflow (start and await in one call) with real Agent workers: the final
session for each way a run ends, a wait longer than the client's per-call timeout, an
explicit timeout that leaves the session running, a retry across a server restart
that starts no second session, and the sync client."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest

from opscore.sdk import (
    Agent,
    DeadlineExceededError,
    NonRetryableError,
    OpsCoreClient,
    SessionStatus,
    SyncOpsCoreClient,
    TaskContext,
)

if TYPE_CHECKING:
    from opscore.server.app import OpsCoreServer
    from tests.sdk.conftest import Definition, Restart, RunAgent

GUARD = 10.0  # a hang guard, not a performance bound


async def test_execute_workflow_returns_each_kind_of_end(
    live_server: OpsCoreServer, client: OpsCoreClient, run_agent: RunAgent, definition: Definition
) -> None:
    """COMPLETED with the final task's output, FAILED with the handler's error, and
    CANCELLED when another call cancels the session while execute_workflow waits."""
    agent = Agent(live_server.address, agent_id="worker", max_in_flight=3, heartbeat_interval=0.05)
    started: asyncio.Queue[str] = asyncio.Queue()

    @agent.handler("double")
    async def double(ctx: TaskContext) -> dict[str, Any]:
        return {"value": ctx.input["n"] * 2}

    @agent.handler("break")
    async def broken(ctx: TaskContext) -> None:
        raise NonRetryableError("cannot do that")

    @agent.handler("hang")
    async def hang(ctx: TaskContext) -> None:
        started.put_nowait(ctx.session_id)
        await asyncio.Event().wait()  # until cancelled with the session

    run_agent(agent)
    for workflow_id, capability in (("ok", "double"), ("bad", "break"), ("stuck", "hang")):
        # A short lease: the worker hears of the cancellation at its next heartbeat.
        await client.create_workflow(definition(workflow_id, ("only", capability), timeout="1s"))

    done = await asyncio.wait_for(client.execute_workflow("ok", input={"n": 21}), GUARD)
    assert done.status is SessionStatus.COMPLETED
    assert done.output == {"only": {"value": 42}}

    failed = await asyncio.wait_for(client.execute_workflow("bad"), GUARD)
    assert failed.status is SessionStatus.FAILED
    assert "cannot do that" in failed.error

    waiting = asyncio.create_task(client.execute_workflow("stuck"))
    session_id = await asyncio.wait_for(started.get(), GUARD)
    await client.cancel_session(session_id, "changed my mind")
    cancelled = await asyncio.wait_for(waiting, GUARD)
    assert (cancelled.session_id, cancelled.status) == (session_id, SessionStatus.CANCELLED)
    assert "changed my mind" in cancelled.error


async def test_wait_outlasts_the_client_timeout_unless_one_is_given(
    live_server: OpsCoreServer, run_agent: RunAgent, definition: Definition
) -> None:
    """The client's per-call timeout (here 0.2s) does not cut a longer run short; an
    explicit max_wait ends the call with DeadlineExceededError, and the session goes
    on: waiting again with the same request_id returns its end."""
    agent = Agent(live_server.address, agent_id="slow-worker")

    @agent.handler("slow")
    async def slow(ctx: TaskContext) -> str:
        await asyncio.sleep(0.6)
        return "finally"

    run_agent(agent)
    async with OpsCoreClient(live_server.address, timeout=0.2) as client:
        await client.create_workflow(definition("slow", ("only", "slow")))
        done = await asyncio.wait_for(client.execute_workflow("slow"), GUARD)
        assert (done.status, done.output) == (
            SessionStatus.COMPLETED,
            {"only": {"result": "finally"}},
        )

        with pytest.raises(DeadlineExceededError):
            await client.execute_workflow("slow", request_id="req-7", max_wait=0.2)
        again = await asyncio.wait_for(client.execute_workflow("slow", request_id="req-7"), GUARD)
        assert (again.status, again.output) == (
            SessionStatus.COMPLETED,
            {"only": {"result": "finally"}},
        )
        assert len([s async for s in client.list_sessions()]) == 2


async def test_execute_workflow_survives_a_server_restart(
    live_server: OpsCoreServer, run_agent: RunAgent, definition: Definition, restart: Restart
) -> None:
    """The server stops while the call waits: the client retries with the same
    request_id, finds the one session and returns its end."""
    agent = Agent(live_server.address, agent_id="steady")
    release = asyncio.Event()
    started = asyncio.Event()

    @agent.handler("work")
    async def work(ctx: TaskContext) -> str:
        started.set()
        await release.wait()
        return "done"

    run_agent(agent)
    async with OpsCoreClient(live_server.address, retries=20) as client:
        await client.create_workflow(definition("steady", ("only", "work")))
        waiting = asyncio.create_task(client.execute_workflow("steady"))
        await asyncio.wait_for(started.wait(), GUARD)
        await restart(live_server)
        release.set()
        done = await asyncio.wait_for(waiting, GUARD)
        assert (done.status, done.output) == (SessionStatus.COMPLETED, {"only": {"result": "done"}})
        assert [s.session_id async for s in client.list_sessions()] == [done.session_id]


async def test_sync_client_executes_a_workflow(
    live_server: OpsCoreServer, run_agent: RunAgent, definition: Definition
) -> None:
    agent = Agent(live_server.address, agent_id="sync-worker")

    @agent.handler("echo")
    def echo(ctx: TaskContext) -> Any:
        return ctx.input

    run_agent(agent)

    def use_sync() -> Any:
        with SyncOpsCoreClient(live_server.address) as sync:
            sync.create_workflow(definition("echo", ("only", "echo")))
            return sync.execute_workflow("echo", input={"hello": "world"})

    done = await asyncio.to_thread(use_sync)
    assert (done.status, done.output) == (SessionStatus.COMPLETED, {"only": {"hello": "world"}})
