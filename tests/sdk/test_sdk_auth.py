"""The SDK against a server with authentication on: operator keys, the agent token
issued at registration, and an Agent worker that uses it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from opscore.domain.access import Role, new_operator_key
from opscore.protocol import errors
from opscore.sdk import Agent, OpsCoreClient, SessionStatus, TaskContext
from opscore.server.config import Settings

if TYPE_CHECKING:
    from conftest import StartServer

    from tests.sdk.conftest import Restart, RunAgent

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample_workflow.json"


async def test_agent_worker_runs_with_its_own_token(
    start_server: StartServer, live_settings: Settings, run_agent: RunAgent
) -> None:
    """An operator registers the agent and hands it the token; the worker runs the
    sample workflow with that token alone; a client without a key is refused."""
    admin_key, admin = new_operator_key("ops", Role.ADMIN)
    server = await start_server(
        live_settings.model_copy(update={"api_keys": f"ops:admin:{admin.sha256}"})
    )
    async with OpsCoreClient(server.address, token=admin_key, timeout=5) as operator:
        registered = await operator.register_agent(
            "Worker",
            capabilities=["test_capability", "another_capability"],
            agent_id="worker-1",
        )
        assert registered.agent_token.startswith("oat_")
        # Named as the operator registered it: its token may not rename it.
        agent = Agent(
            server.address, agent_id="worker-1", name="Worker", token=registered.agent_token
        )

        @agent.handler("test_capability")
        async def step_1(ctx: TaskContext) -> dict[str, Any]:
            return {"seen": ctx.input["doc"]}

        @agent.handler("another_capability")
        async def step_2(ctx: TaskContext) -> dict[str, Any]:
            return {"upstream": ctx.upstream["step_1"]["seen"]}

        run_agent(agent)
        await operator.create_workflow(SAMPLE)
        session = await operator.start_workflow("sample_workflow_id", input={"doc": "x"})
        done = await operator.wait_session(session.session_id)
        assert done.status is SessionStatus.COMPLETED
        assert done.output == {"step_2": {"upstream": "x"}}

        rotated = await operator.rotate_agent_token("worker-1")
        assert rotated.agent_token.startswith("oat_")
        assert rotated.agent_token != registered.agent_token
        async with OpsCoreClient(server.address, token=registered.agent_token) as old:
            with pytest.raises(errors.UnauthenticatedError):
                await old.heartbeat("worker-1")
        async with OpsCoreClient(server.address, token=rotated.agent_token) as new:
            assert (await new.heartbeat("worker-1")).state is not None

    async with OpsCoreClient(server.address, timeout=5) as anonymous:
        with pytest.raises(errors.UnauthenticatedError):
            await anonymous.get_agent("worker-1")


async def test_agent_worker_registers_again_with_its_token_after_a_restart(
    start_server: StartServer, live_settings: Settings, run_agent: RunAgent, restart: Restart
) -> None:
    """The worker re-registers itself on every reconnect: within its grant that works
    with its own token, so after a server restart it takes work again."""
    admin_key, admin = new_operator_key("ops", Role.ADMIN)
    server = await start_server(
        live_settings.model_copy(update={"api_keys": f"ops:admin:{admin.sha256}"})
    )
    async with OpsCoreClient(server.address, token=admin_key, timeout=5) as operator:
        registered = await operator.register_agent(
            "Worker", capabilities=["test_capability", "another_capability"], agent_id="w-1"
        )
        agent = Agent(server.address, agent_id="w-1", name="Worker", token=registered.agent_token)

        @agent.handler("test_capability")
        async def step_1(ctx: TaskContext) -> dict[str, Any]:
            return {"seen": ctx.input["doc"]}

        @agent.handler("another_capability")
        async def step_2(ctx: TaskContext) -> dict[str, Any]:
            return {"upstream": ctx.upstream["step_1"]["seen"]}

        running = run_agent(agent)
        await operator.create_workflow(SAMPLE)
        for doc in ("before", "after"):
            session = await operator.start_workflow("sample_workflow_id", input={"doc": doc})
            done = await operator.wait_session(session.session_id)
            assert done.status is SessionStatus.COMPLETED
            assert done.output == {"step_2": {"upstream": doc}}
            if doc == "before":
                server = await restart(server)
                await operator.get_agent("w-1")  # retried until connected again
        assert not running.done(), "the worker still runs"


async def test_agent_worker_with_an_ungranted_handler_stops_at_once(
    start_server: StartServer, live_settings: Settings, run_agent: RunAgent
) -> None:
    """A worker whose handlers go beyond what the operator registered stops with
    PERMISSION_DENIED saying an operator must register it, and the agent stays as
    the operator registered it."""
    admin_key, admin = new_operator_key("ops", Role.ADMIN)
    server = await start_server(
        live_settings.model_copy(update={"api_keys": f"ops:admin:{admin.sha256}"})
    )
    async with OpsCoreClient(server.address, token=admin_key, timeout=5) as operator:
        registered = await operator.register_agent(
            "Worker", capabilities=["test_capability"], agent_id="w-2"
        )
        agent = Agent(server.address, agent_id="w-2", name="Worker", token=registered.agent_token)

        @agent.handler("test_capability")
        async def granted(ctx: TaskContext) -> None:
            return None

        @agent.handler("another_capability")
        async def not_granted(ctx: TaskContext) -> None:
            return None

        with pytest.raises(errors.PermissionDeniedError, match="an operator must register"):
            await run_agent(agent)
        assert (await operator.get_agent("w-2")).capabilities == ("test_capability",)
