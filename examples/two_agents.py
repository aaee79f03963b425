"""Two agents run the sample workflow (step_1 -> step_2) end to end.

    python examples/two_agents.py --address 127.0.0.1:50051
    python examples/two_agents.py          # starts its own server on a temp database

One agent has `test_capability` (step_1), the other `another_capability` (step_2).
The script stores examples/sample_workflow.json (an existing copy is fine), starts a
run, prints every session event as it happens, then the final output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from opscore.protocol.errors import WorkflowDefinitionError
from opscore.sdk import Agent, OpsCoreClient, SessionStatus, TaskContext
from opscore.server.app import OpsCoreServer
from opscore.server.config import Settings

SAMPLE = Path(__file__).resolve().parent / "sample_workflow.json"


@contextlib.asynccontextmanager
async def local_server() -> AsyncIterator[str]:
    """An in-process server on a throwaway database, for trying the SDK alone."""
    with tempfile.TemporaryDirectory() as tmp:
        server = OpsCoreServer(Settings(db=Path(tmp) / "opscore.db", port=0))
        await server.start()
        try:
            yield server.address
        finally:
            await server.stop(grace=1)


def make_agents(address: str) -> list[Agent]:
    first = Agent(address, agent_id="example-first", name="First step worker")
    second = Agent(address, agent_id="example-second", name="Second step worker")

    @first.handler("test_capability")
    async def step_1(ctx: TaskContext) -> dict[str, Any]:
        return {"echo": ctx.parameters["message"], "doc": ctx.input.get("doc")}

    @second.handler("another_capability")
    def step_2(ctx: TaskContext) -> dict[str, Any]:  # a plain function runs in a thread
        return {"value_doubled": ctx.parameters["value"] * 2, "after": ctx.upstream["step_1"]}

    return [first, second]


async def run_example(address: str) -> bool:
    agents = make_agents(address)
    workers = [asyncio.create_task(agent.run()) for agent in agents]
    try:
        async with OpsCoreClient(address) as client:
            with contextlib.suppress(WorkflowDefinitionError):
                await client.create_workflow(SAMPLE)
            session = await client.start_workflow("sample_workflow_id", input={"doc": "q3"})
            print(f"started session {session.session_id}")
            async for event in client.watch_session(session.session_id):
                task = f" {event.task_id}" if event.task_id else ""
                task += f" (attempt {event.attempt})" if event.attempt else ""
                print(f"  #{event.sequence} {event.type.name}{task}")
            final = await client.get_session(session.session_id)
            print(f"session {final.status.name}: {final.output}")
            return final.status is SessionStatus.COMPLETED
    finally:
        for agent in agents:
            agent.stop()
        await asyncio.gather(*workers)


async def main(address: str | None) -> bool:
    if address is not None:
        return await run_example(address)
    async with local_server() as own_address:
        return await run_example(own_address)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", help="host:port of a running server (default: start one)")
    args = parser.parse_args()
    sys.exit(0 if asyncio.run(main(args.address)) else 1)
