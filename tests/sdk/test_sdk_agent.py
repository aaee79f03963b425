"""The Agent worker end to end: running workflows, retries, cancellation, drain,
and reconnecting across a server restart."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from opscore.protocol import errors
from opscore.sdk import (
    Agent,
    AgentState,
    NonRetryableError,
    OpsCoreClient,
    SessionEventType,
    SessionStatus,
    TaskContext,
    TaskStatus,
)

if TYPE_CHECKING:
    from opscore.server.app import OpsCoreServer
    from tests.sdk.conftest import Definition, Restart, RunAgent

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample_workflow.json"


async def eventually(check: Any, within: float = 2.0) -> None:
    """Polls an async predicate until it holds."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition did not hold in time"
        await asyncio.sleep(0.01)


async def wait(client: OpsCoreClient, session_id: str) -> Any:
    return await asyncio.wait_for(client.wait_session(session_id), 5)


async def test_agent_runs_the_sample_workflow(
    live_server: OpsCoreServer, client: OpsCoreClient, run_agent: RunAgent
) -> None:
    agent = Agent(live_server.address, agent_id="worker-1", name="Worker")
    seen: list[dict[str, Any]] = []

    @agent.handler("test_capability")
    async def step_1(ctx: TaskContext) -> dict[str, Any]:
        seen.append({"parameters": ctx.parameters, "input": ctx.input, "attempt": ctx.attempt})
        return {"summary": ctx.input["doc"].upper()}

    @agent.handler("another_capability")
    def step_2(ctx: TaskContext) -> int:
        assert threading.current_thread() is not threading.main_thread()
        return int(ctx.parameters["value"]) + len(ctx.upstream["step_1"]["summary"])

    assert agent.capabilities == ["test_capability", "another_capability"]
    run_agent(agent)
    await client.create_workflow(SAMPLE)
    session = await client.start_workflow("sample_workflow_id", input={"doc": "q3"})
    done = await wait(client, session.session_id)
    assert done.status is SessionStatus.COMPLETED
    assert done.output == {"step_2": {"result": 125}}
    assert seen == [
        {"parameters": {"message": "This is the first step."}, "input": {"doc": "q3"}, "attempt": 1}
    ]
    registered = await client.get_agent("worker-1")
    assert registered.state is AgentState.IDLE and registered.name == "Worker"


async def test_handler_exception_is_retried(
    client: OpsCoreClient, live_server: OpsCoreServer, run_agent: RunAgent, definition: Definition
) -> None:
    agent = Agent(live_server.address, agent_id="flaky-1")

    @agent.handler("cap")
    async def flaky(ctx: TaskContext) -> dict[str, Any]:
        if ctx.attempt == 1:
            raise RuntimeError("transient")
        return {"attempt": ctx.attempt}

    run_agent(agent)
    retry = {"max_attempts": 3, "initial_interval": "0.05s"}
    await client.create_workflow(definition("wf", ("a", "cap"), retry_policy=retry))
    done = await wait(client, (await client.start_workflow("wf")).session_id)
    assert done.status is SessionStatus.COMPLETED and done.output == {"a": {"attempt": 2}}
    types = [e.type async for e in client.list_session_events(done.session_id)]
    assert SessionEventType.TASK_RETRY_SCHEDULED in types
    failed = [e async for e in client.list_session_events(done.session_id)]
    assert any("RuntimeError: transient" in str(e.detail) for e in failed)


async def test_non_retryable_error_fails_the_session(
    client: OpsCoreClient, live_server: OpsCoreServer, run_agent: RunAgent, definition: Definition
) -> None:
    agent = Agent(live_server.address, agent_id="strict-1")

    @agent.handler("cap")
    def refuse(ctx: TaskContext) -> None:
        raise NonRetryableError("input is unusable")

    run_agent(agent)
    await client.create_workflow(definition("wf", ("a", "cap")))
    done = await wait(client, (await client.start_workflow("wf")).session_id)
    assert done.status is SessionStatus.FAILED and "input is unusable" in done.error
    assert done.task("a").attempt == 1


async def test_long_handler_sees_cancellation(
    client: OpsCoreClient, live_server: OpsCoreServer, run_agent: RunAgent, definition: Definition
) -> None:
    agent = Agent(live_server.address, agent_id="slow-1")
    started = asyncio.Event()
    outcome: list[bool] = []

    @agent.handler("cap")
    async def slow(ctx: TaskContext) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            outcome.append(ctx.cancel_requested)
            raise

    run_agent(agent)
    await client.create_workflow(definition("wf", ("a", "cap"), timeout="0.3s"))
    session = await client.start_workflow("wf")
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.sleep(0.4)  # longer than the lease: heartbeats keep it alive
    assert (await client.get_session(session.session_id)).task("a").status is TaskStatus.RUNNING
    await client.cancel_session(session.session_id)

    async def cancelled() -> bool:
        return outcome == [True]

    await eventually(cancelled)


async def test_stop_drains_in_flight_work_then_deregisters(
    client: OpsCoreClient, live_server: OpsCoreServer, run_agent: RunAgent, definition: Definition
) -> None:
    agent = Agent(live_server.address, agent_id="drain-1", deregister_on_stop=True)
    started = asyncio.Event()
    release = asyncio.Event()

    @agent.handler("cap")
    async def work(ctx: TaskContext) -> dict[str, str]:
        started.set()
        await release.wait()
        return {"finished": ctx.task_id}

    running = run_agent(agent)
    await client.create_workflow(definition("wf", ("a", "cap")))
    first = await client.start_workflow("wf")
    await asyncio.wait_for(started.wait(), 5)
    agent.stop()

    async def draining() -> bool:
        return (await client.get_agent("drain-1")).state is AgentState.DRAINING

    await eventually(draining)
    second = await client.start_workflow("wf")
    assert not running.done()
    release.set()
    await asyncio.wait_for(running, 5)

    done = await client.get_session(first.session_id)
    assert done.status is SessionStatus.COMPLETED and done.output == {"a": {"finished": "a"}}
    assert (await client.get_session(second.session_id)).task("a").status is TaskStatus.PENDING
    with pytest.raises(errors.AgentNotFoundError):
        await client.get_agent("drain-1")


async def test_agent_reconnects_after_server_restart(
    client: OpsCoreClient,
    live_server: OpsCoreServer,
    restart: Restart,
    run_agent: RunAgent,
    definition: Definition,
) -> None:
    agent = Agent(live_server.address, agent_id="steady-1", heartbeat_interval=0.1)
    agent.handler("cap")(lambda ctx: {"session": ctx.session_id})
    running = run_agent(agent)
    await client.create_workflow(definition("wf", ("a", "cap")))
    before = await wait(client, (await client.start_workflow("wf")).session_id)
    assert before.status is SessionStatus.COMPLETED

    server = await restart(live_server)
    await client.get_agent("steady-1")  # retried until the client is connected again
    # Deregistered behind its back: the agent registers again and carries on.
    await client.deregister_agent("steady-1")
    after = await wait(client, (await client.start_workflow("wf")).session_id)
    assert after.status is SessionStatus.COMPLETED and not running.done()
    assert (await client.get_agent("steady-1")).state is AgentState.IDLE
    assert server.port == live_server.port
