"""Fixtures of the SDK tests: a server on the real clock (retries, leases and
backoff then pass in real milliseconds), an SDK client, restarts on the same port,
Agent workers stopped at teardown, and workflow definition builders."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest

from opscore.sdk import Agent, OpsCoreClient
from opscore.server.config import Settings

if TYPE_CHECKING:
    from conftest import StartServer

    from opscore.server.app import OpsCoreServer

Restart = Callable[["OpsCoreServer"], Awaitable["OpsCoreServer"]]
RunAgent = Callable[[Agent], "asyncio.Task[None]"]
Definition = Callable[..., dict[str, Any]]


@pytest.fixture
def live_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"scheduler_interval": 0.05, "shutdown_grace": 0})


@pytest.fixture
async def live_server(start_server: StartServer, live_settings: Settings) -> OpsCoreServer:
    return await start_server(live_settings)


@pytest.fixture
async def client(live_server: OpsCoreServer) -> AsyncIterator[OpsCoreClient]:
    async with OpsCoreClient(live_server.address, timeout=5) as sdk:
        yield sdk


@pytest.fixture
def restart(start_server: StartServer) -> Restart:
    """Stops a server and starts a new one on the same port and database."""

    async def again(server: OpsCoreServer) -> OpsCoreServer:
        await server.stop(grace=0)
        return await start_server(server.settings.model_copy(update={"port": server.port}))

    return again


@pytest.fixture
async def run_agent() -> AsyncIterator[RunAgent]:
    """Runs Agent workers as tasks; stops and awaits them at teardown."""
    running: list[tuple[Agent, asyncio.Task[None]]] = []

    def start(agent: Agent) -> asyncio.Task[None]:
        task = asyncio.create_task(agent.run())
        running.append((agent, task))
        return task

    yield start
    for agent, _ in running:
        agent.stop()
    for _, task in running:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)


@pytest.fixture
def definition() -> Definition:
    """A workflow definition dict: `definition("wf", ("a", "cap"), ("b", "cap2"))` chains
    tasks a -> b; keyword arguments are added to every task (e.g. timeout="1s")."""

    def build(workflow_id: str, *steps: tuple[str, str], **task_fields: Any) -> dict[str, Any]:
        tasks = [
            {"task_id": task_id, "name": task_id, "agent_capability": cap, **task_fields}
            for task_id, cap in steps
        ]
        for task, following in itertools.pairwise(tasks):
            task["next_task_id"] = following["task_id"]
        return {"id": workflow_id, "name": workflow_id, "version": "1", "tasks": tasks}

    return build
