"""Fixtures of the CLI tests: a `python -m opscore serve` child process (from the shared
`spawn_server` fixture), the `opscore` command pointed at it, and SDK Agent workers
that complete tasks, so runs started from the CLI finish.

`spawn_server` is function-scoped, so each test gets its own server; tests are few and
each covers a whole command group to keep the run short.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import pytest
from cli_support import Cli

from opscore.sdk import Agent, NonRetryableError, TaskContext

if TYPE_CHECKING:
    from conftest import ServerProcess, SpawnServer

# Capabilities of examples/sample_workflow.json and examples/fan_out_fan_in.yaml.
CAPABILITIES = (
    "test_capability",
    "another_capability",
    "fetch",
    "summarize",
    "translate",
    "publish",
)


@pytest.fixture
async def cli_server(spawn_server: SpawnServer) -> ServerProcess:
    return await spawn_server(OPSCORE_SCHEDULER_INTERVAL="0.05")


@pytest.fixture
def cli(cli_server: ServerProcess) -> Cli:
    return Cli(cli_server.address)


@pytest.fixture
def offline_cli() -> Cli:
    """The CLI pointed at a port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return Cli(f"127.0.0.1:{port}")


StartWorker = Callable[[], Agent]


@pytest.fixture
async def start_worker(cli_server: ServerProcess) -> AsyncIterator[StartWorker]:
    """Starts agent `worker-1` serving CAPABILITIES (output: what it saw) and `explode`
    (fails the task without retries); it is stopped at teardown."""
    running: list[tuple[Agent, asyncio.Task[None]]] = []

    async def echo(ctx: TaskContext) -> dict[str, Any]:
        return {"task": ctx.task_id, "input": ctx.input, "upstream": sorted(ctx.upstream)}

    async def explode(ctx: TaskContext) -> None:
        raise NonRetryableError(f"{ctx.task_id} exploded")

    def start() -> Agent:
        agent = Agent(cli_server.address, agent_id="worker-1", name="Worker", timeout=5)
        for capability in CAPABILITIES:
            agent.handler(capability)(echo)
        agent.handler("explode")(explode)
        running.append((agent, asyncio.create_task(agent.run())))
        return agent

    yield start
    for agent, task in running:
        agent.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)
