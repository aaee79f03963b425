"""Watches that resume across a server restart without gaps or repeats."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, TypeVar

import pytest

from opscore.protocol import errors
from opscore.sdk import Agent, AgentEventType, AgentState, OpsCoreClient, SessionEventType

if TYPE_CHECKING:
    from conftest import StartServer

    from opscore.server.app import OpsCoreServer
    from opscore.server.config import Settings
    from tests.sdk.conftest import Definition, Restart, RunAgent

T = TypeVar("T")


async def take(source: AsyncIterator[T], count: int) -> list[T]:
    return [await asyncio.wait_for(anext(source), 5) for _ in range(count)]


async def test_watch_agents_resumes_after_restart(
    live_server: OpsCoreServer, client: OpsCoreClient, restart: Restart
) -> None:
    await client.register_agent("A", agent_id="a-1")
    history = client.watch_agents(since_revision=0)
    snapshot = client.watch_agents(send_initial_state=True)
    first = await take(history, 1)
    assert [(e.type, e.agent and e.agent.agent_id) for e in first] == [
        (AgentEventType.REGISTERED, "a-1")
    ]
    initial = await take(snapshot, 2)
    assert [e.type for e in initial] == [AgentEventType.SNAPSHOT, AgentEventType.SYNCED]

    await restart(live_server)
    await client.register_agent("B", agent_id="b-1")
    await client.update_agent_state("a-1", AgentState.IDLE)

    after = await take(history, 2)
    live = await take(snapshot, 2)
    assert [(e.type, e.agent and e.agent.agent_id) for e in after] == [
        (AgentEventType.REGISTERED, "b-1"),
        (AgentEventType.STATE_CHANGED, "a-1"),
    ]
    assert live == after
    replay = await take(client.watch_agents(since_revision=0), 3)
    assert replay == first + after


async def test_watch_agents_raises_revision_compacted(
    start_server: StartServer, live_settings: Settings
) -> None:
    settings = live_settings.model_copy(
        update={"event_history_limit": 100, "compaction_interval": 0.05}
    )
    server = await start_server(settings)
    async with OpsCoreClient(server.address) as client:
        for i in range(110):
            await client.register_agent("A", agent_id=f"a-{i}")
        with pytest.raises(errors.RevisionCompactedError):
            for _ in range(40):
                await take(client.watch_agents(since_revision=1), 1)
                await asyncio.sleep(0.05)


async def test_watch_session_resumes_after_restart(
    live_server: OpsCoreServer,
    client: OpsCoreClient,
    restart: Restart,
    run_agent: RunAgent,
    definition: Definition,
) -> None:
    await client.create_workflow(definition("wf", ("a", "cap")))
    session = await client.start_workflow("wf")
    watch = client.watch_session(session.session_id)
    before = await take(watch, 2)
    assert [e.type for e in before] == [SessionEventType.CREATED, SessionEventType.TASK_QUEUED]

    await restart(live_server)
    agent = Agent(live_server.address, agent_id="w-1")
    agent.handler("cap")(lambda ctx: {"done": True})
    run_agent(agent)
    after = [e async for e in watch]
    assert [e.type for e in after] == [
        SessionEventType.TASK_DISPATCHED,
        SessionEventType.TASK_COMPLETED,
        SessionEventType.SESSION_COMPLETED,
    ]
    assert [e.sequence for e in before + after] == [1, 2, 3, 4, 5]
