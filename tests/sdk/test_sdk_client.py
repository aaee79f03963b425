"""OpsCoreClient against a real server: every method, errors as OpsCoreError
subclasses, deadlines, retries on UNAVAILABLE, and the sync wrapper."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from opspawn.opscore.v1 import lifecycle_pb2, lifecycle_pb2_grpc

from opscore.protocol import errors
from opscore.sdk import (
    AgentState,
    DeadlineExceededError,
    OpsCoreClient,
    SessionEventType,
    SessionStatus,
    SyncOpsCoreClient,
    TaskStatus,
    UnavailableError,
)
from opscore.sdk.types import TaskAssignment

if TYPE_CHECKING:
    from conftest import StartServer

    from opscore.server.app import OpsCoreServer
    from opscore.server.config import Settings
    from tests.sdk.conftest import Definition

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@contextlib.asynccontextmanager
async def task_inbox(
    client: OpsCoreClient, agent_id: str
) -> AsyncIterator[asyncio.Queue[TaskAssignment]]:
    """The agent's task stream, pumped into a queue: a read with a timeout must not
    cancel the call (closing the stream re-queues what it holds)."""
    inbox: asyncio.Queue[TaskAssignment] = asyncio.Queue()

    async def pump() -> None:
        async for assignment in client.stream_tasks(agent_id):
            inbox.put_nowait(assignment)

    pumping = asyncio.create_task(pump())
    try:
        yield inbox
    finally:
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumping


async def next_task(inbox: asyncio.Queue[TaskAssignment]) -> TaskAssignment:
    return await asyncio.wait_for(inbox.get(), 5)


async def test_lifecycle_methods(client: OpsCoreClient) -> None:
    agent = await client.register_agent(
        "Summarizer",
        capabilities=["summarize", "translate"],
        agent_id="sum-1",
        version="1.2",
        contact_endpoint="http://sum-1",
        metadata={"zone": "eu"},
    )
    assert (agent.agent_id, agent.state, agent.capabilities) == (
        "sum-1",
        AgentState.INITIALIZING,
        ("summarize", "translate"),
    )
    assert agent.metadata == {"zone": "eu"} and agent.registered_at.tzinfo is UTC
    generated = await client.register_agent("Anonymous")
    assert generated.agent_id
    await client.register_agent("Other", capabilities=["other"], agent_id="other-1")

    observed = datetime.now(UTC) - timedelta(seconds=1)
    busy = await client.update_agent_state("sum-1", "busy", {"task": "r-42", "n": 3}, observed)
    assert busy.state is AgentState.BUSY and busy.state_details == {"task": "r-42", "n": 3}
    assert busy.state_observed_at == observed
    beat = await client.heartbeat("sum-1")
    assert beat.state is AgentState.BUSY and beat.liveness_timeout == 30
    assert (await client.get_agent("sum-1")).state is AgentState.BUSY

    listed = [a.agent_id async for a in client.list_agents(page_size=1)]
    assert listed == sorted(["sum-1", "other-1", generated.agent_id])
    by_cap = [a.agent_id async for a in client.list_agents(capability="summarize")]
    assert by_cap == ["sum-1"]
    by_state = [a.agent_id async for a in client.list_agents(states=[AgentState.BUSY, "IDLE"])]
    assert by_state == ["sum-1"]

    gone = await client.deregister_agent("sum-1")
    assert gone.agent_id == "sum-1"
    with pytest.raises(errors.AgentNotFoundError) as caught:
        await client.get_agent("sum-1")
    assert caught.value.metadata == {"agent_id": "sum-1"}


async def test_workflow_and_session_methods(client: OpsCoreClient, definition: Definition) -> None:
    created = await client.create_workflow(definition("wf", ("a", "cap"), timeout="30s"))
    assert [t.task_id for t in created.tasks] == ["a"] and created.tasks[0].timeout == 30
    from_json = await client.create_workflow(EXAMPLES / "sample_workflow.json")
    assert from_json.tasks[1].parameters == {"value": 123}
    from_yaml = await client.create_workflow(str(EXAMPLES / "fan_out_fan_in.yaml"))
    assert from_yaml.tasks[3].depends_on == ("summarize", "translate")
    assert (await client.get_workflow_definition("wf")).version == "1"
    listed = [d.id async for d in client.list_workflow_definitions(page_size=2)]
    assert listed == ["research_digest", "sample_workflow_id", "wf"]

    await client.register_agent("Worker", ["cap"], agent_id="w-1")
    async with task_inbox(client, "w-1") as inbox:
        await run_three_sessions(client, definition, inbox)


async def run_three_sessions(
    client: OpsCoreClient, definition: Definition, inbox: asyncio.Queue[TaskAssignment]
) -> None:
    session = await client.start_workflow("wf", input={"doc": "q3"}, request_id="run-1")
    assert session.status is SessionStatus.PENDING and session.input == {"doc": "q3"}
    again = await client.start_workflow("wf", input={"doc": "q3"}, request_id="run-1")
    assert again.session_id == session.session_id

    assignment = await next_task(inbox)
    assert (assignment.task_id, assignment.input, assignment.attempt) == ("a", {"doc": "q3"}, 1)
    beat = await client.heartbeat_task(assignment.task_token)
    assert not beat.cancel_requested and beat.deadline is not None
    await client.complete_task(assignment.task_token, {"summary": "ok"})
    await client.complete_task(assignment.task_token, {"summary": "ok"})  # harmless repeat
    done = await client.get_session(session.session_id)
    assert done.status is SessionStatus.COMPLETED and done.output == {"a": {"summary": "ok"}}
    assert done.task("a").status is TaskStatus.COMPLETED and done.finished

    inline = await client.start_workflow(definition=definition("inline", ("x", "cap")))
    failing = await next_task(inbox)
    await client.fail_task(failing.task_token, "boom", retryable=False)
    failed = await client.get_session(inline.session_id)
    assert failed.status is SessionStatus.FAILED and "boom" in failed.error

    doomed = await client.start_workflow("wf")
    cancelled = await client.cancel_session(doomed.session_id, reason="not needed")
    assert cancelled.status is SessionStatus.CANCELLED

    statuses = [s.status async for s in client.list_sessions(page_size=1)]
    assert statuses == [SessionStatus.CANCELLED, SessionStatus.FAILED, SessionStatus.COMPLETED]
    only_failed = [s.session_id async for s in client.list_sessions(statuses=["failed"])]
    assert only_failed == [inline.session_id]
    history = [e async for e in client.list_session_events(session.session_id, page_size=2)]
    assert [e.sequence for e in history] == list(range(1, len(history) + 1))
    assert history[-1].type is SessionEventType.SESSION_COMPLETED and history[-1].terminal
    watched = [e async for e in client.watch_session(session.session_id, since_sequence=2)]
    assert watched == history[2:]
    assert (await client.wait_session(session.session_id)) == done

    await client.delete_workflow_definition("wf", "1")
    with pytest.raises(errors.WorkflowDefinitionNotFoundError):
        await client.get_workflow_definition("wf")


async def test_errors_are_opscore_errors(client: OpsCoreClient, definition: Definition) -> None:
    with pytest.raises(errors.InvalidArgumentError) as bad:
        await client.register_agent("", agent_id="bad id!")
    assert [v.field for v in bad.value.violations] == ["agent_id", "name"]
    assert type(bad.value) is errors.InvalidArgumentError

    broken = definition("wf", ("a", "cap"))
    broken["tasks"][0]["next_task_id"] = "missing"
    with pytest.raises(errors.InvalidArgumentError) as invalid:
        await client.create_workflow(broken)
    assert [v.field for v in invalid.value.violations] == ["definition.tasks[0].next_task_id"]
    with pytest.raises(errors.InvalidArgumentError):  # refused before any call
        await client.create_workflow({"id": "x", "tasks": "not a list"})

    await client.create_workflow(definition("wf", ("a", "cap")))
    with pytest.raises(errors.WorkflowDefinitionError):
        await client.create_workflow(definition("wf", ("a", "cap")))

    await client.register_agent("A", agent_id="a-1")
    now = datetime.now(UTC)
    await client.update_agent_state("a-1", AgentState.IDLE, observed_at=now)
    with pytest.raises(errors.StaleStateReportError):
        await client.update_agent_state("a-1", "busy", observed_at=now - timedelta(seconds=5))
    with pytest.raises(ValueError, match="unknown AgentState"):
        await client.update_agent_state("a-1", "sleepy")

    session = await client.start_workflow("wf")
    await client.cancel_session(session.session_id)
    with pytest.raises(errors.InvalidStateError):
        await client.cancel_session(session.session_id)
    with pytest.raises(errors.SessionNotFoundError) as missing:
        await client.get_session("nope")
    assert missing.value.metadata == {"session_id": "nope"}
    with pytest.raises(errors.InvalidArgumentError):
        await client.complete_task("forged-token")


class SlowLifecycle(lifecycle_pb2_grpc.LifecycleServiceServicer):
    async def GetAgent(self, request: Any, context: Any) -> lifecycle_pb2.Agent:
        await asyncio.sleep(2)
        return lifecycle_pb2.Agent()


async def test_deadline_exceeded() -> None:
    slow = grpc.aio.server()
    lifecycle_pb2_grpc.add_LifecycleServiceServicer_to_server(SlowLifecycle(), slow)
    port = slow.add_insecure_port("127.0.0.1:0")
    await slow.start()
    try:
        async with OpsCoreClient(f"127.0.0.1:{port}", timeout=0.2) as client:
            with pytest.raises(DeadlineExceededError):
                await client.get_agent("a-1")
    finally:
        await slow.stop(grace=0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_unavailable_after_retries() -> None:
    async with OpsCoreClient(f"127.0.0.1:{free_port()}", retries=1) as client:
        with pytest.raises(UnavailableError):
            await client.get_agent("a-1")


async def test_idempotent_call_retries_until_the_server_is_up(
    start_server: StartServer, live_settings: Settings
) -> None:
    port = free_port()
    async with OpsCoreClient(f"127.0.0.1:{port}", retries=20) as client:
        register = asyncio.create_task(client.register_agent("Early", agent_id="early-1"))
        await asyncio.sleep(0.3)
        assert not register.done()
        await start_server(live_settings.model_copy(update={"port": port}))
        agent = await asyncio.wait_for(register, 5)
        assert agent.agent_id == "early-1"
        # Without an agent_id a retry could register twice: no retry, the error surfaces.
        down = OpsCoreClient(f"127.0.0.1:{free_port()}", retries=20)
        with pytest.raises(UnavailableError):
            await asyncio.wait_for(down.register_agent("Twice"), 1)
        await down.close()


async def test_sync_client(live_server: OpsCoreServer, definition: Definition) -> None:
    def use_sync() -> list[SessionEventType]:
        with SyncOpsCoreClient(live_server.address, timeout=5) as sync:
            sync.register_agent("Sync", ["cap"], agent_id="sync-1")
            assert [a.agent_id for a in sync.list_agents()] == ["sync-1"]
            sync.create_workflow(definition("wf", ("a", "cap")))
            session = sync.start_workflow("wf")
            tasks = sync.stream_tasks("sync-1")
            assignment = next(tasks)
            sync.complete_task(assignment.task_token, {"ok": True})
            tasks.close()
            return [e.type for e in sync.watch_session(session.session_id)]

    types = await asyncio.to_thread(use_sync)
    assert types[-1] is SessionEventType.SESSION_COMPLETED
