"""Watches that resume across a server restart without gaps or repeats."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, TypeVar

import pytest

from opscore.protocol import errors
from opscore.sdk import Agent, AgentEventType, AgentState, OpsCoreClient, SessionEventType
from opscore.sdk import client as client_module

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


async def test_watches_resuming_ahead_of_the_server_raise_at_once(
    client: OpsCoreClient, definition: Definition
) -> None:
    """A resume point the server has not reached (another server, a restored database)
    is raised as RevisionAheadError / SequenceAheadError, carrying the server's current
    position, instead of a watch that waits or retries for ever."""
    agent = await client.register_agent("A", agent_id="a-1")
    with pytest.raises(errors.RevisionAheadError) as ahead:
        await take(client.watch_agents(since_revision=agent.revision + 10), 1)
    assert ahead.value.metadata["current_revision"] == str(agent.revision)

    await client.create_workflow(definition("wf", ("a", "cap")))
    session = await client.start_workflow("wf")
    last = [e.sequence async for e in client.list_session_events(session.session_id)][-1]
    with pytest.raises(errors.SequenceAheadError) as behind:
        await take(client.watch_session(session.session_id, since_sequence=last + 1), 1)
    assert behind.value.metadata["last_sequence"] == str(last)


async def test_watch_response_the_client_cannot_receive_is_raised_not_retried(
    live_server: OpsCoreServer, client: OpsCoreClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gRPC's own RESOURCE_EXHAUSTED (here: a client that accepts only 8 KiB messages)
    would recur on every resume, so the watch raises it instead of looping; being
    dropped as too slow (WATCHER_TOO_SLOW) is what a watch resumes after."""
    metadata = {f"k{i}": "x" * 1000 for i in range(12)}
    await client.register_agent("A", agent_id="big", metadata=metadata)
    options = [*client_module.CHANNEL_OPTIONS, ("grpc.max_receive_message_length", 8192)]
    monkeypatch.setattr(client_module, "CHANNEL_OPTIONS", options)
    async with OpsCoreClient(live_server.address) as small:
        with pytest.raises(errors.OpsCoreError) as raised:
            await take(small.watch_agents(since_revision=0), 1)
    assert not isinstance(raised.value, errors.WatcherTooSlowError)
    assert "larger than max" in raised.value.message
