"""Resource limits: message size, Struct size and depth, list lengths, open streams,
watchers and the per-caller rate limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from opspawn.opscore.v1 import (
    lifecycle_pb2,
    lifecycle_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    workflow_pb2,
    workflow_pb2_grpc,
)
from security_support import Keys, bearer, error_reason, retry_info

from opscore.domain.access import Role
from opscore.domain.clock import FakeClock
from opscore.server.config import Settings

L, W, S = lifecycle_pb2, workflow_pb2, session_pb2
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
READ_TIMEOUT = 5.0


class Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        self.workflow = workflow_pb2_grpc.WorkflowServiceStub(channel)
        self.sessions = session_pb2_grpc.SessionServiceStub(channel)

    async def agent(self, agent_id: str = "agent-a", capability: str = "work") -> None:
        await self.lifecycle.RegisterAgent(
            L.RegisterAgentRequest(agent_id=agent_id, name=agent_id, capabilities=[capability])
        )


@pytest.fixture
async def ops(start_server: Any, settings: Settings, clock: FakeClock) -> AsyncIterator[Stubs]:
    server = await start_server(settings, clock)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stubs = Stubs(channel)
        await stubs.agent()
        yield stubs


async def fails(call: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    try:
        result = await call
    except grpc.aio.AioRpcError as err:
        assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"
        return err
    raise AssertionError(f"expected {code.name}, but the call succeeded: {result!r}")


def nested_struct(depth: int) -> struct_pb2.Struct:
    """{"k": {"k": ... {"leaf": 1}}}: `depth` Structs deep."""
    top = struct_pb2.Struct()
    current = top
    for _ in range(depth - 1):
        current = current.fields["k"].struct_value
    current.fields["leaf"].number_value = 1
    return top


def nested_lists(depth: int) -> struct_pb2.Struct:
    """{"k": [[[ ... [1] ... ]]]}: a Struct holding `depth - 1` nested lists."""
    top = struct_pb2.Struct()
    value = top.fields["k"]
    for _ in range(depth - 1):
        value = value.list_value.values.add()
    value.number_value = 1
    return top


def one_task_definition(definition_id: str = "wf", **task: Any) -> W.WorkflowDefinition:
    return W.WorkflowDefinition(
        id=definition_id,
        version="1",
        tasks=[W.TaskDefinition(task_id="t", name="t", agent_capability="work", **task)],
    )


# --------------------------------------------------------------------------- message size


async def test_request_above_max_message_bytes_is_resource_exhausted(
    start_server: Any, settings: Settings, clock: FakeClock
) -> None:
    """A request larger than max_message_bytes is refused with RESOURCE_EXHAUSTED."""
    server = await start_server(settings.model_copy(update={"max_message_bytes": 32 * 1024}), clock)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stubs = Stubs(channel)
        await stubs.agent()
        big = L.RegisterAgentRequest(agent_id="big", name="big", contact_endpoint="x" * 40_000)
        await fails(stubs.lifecycle.RegisterAgent(big), EXHAUSTED)
        # The server keeps serving, and a request under the limit works.
        await stubs.lifecycle.GetAgent(L.GetAgentRequest(agent_id="agent-a"))
        listed = await stubs.lifecycle.ListAgents(L.ListAgentsRequest())
        assert [a.agent_id for a in listed.agents] == ["agent-a"]


# --------------------------------------------------------------------------- Struct limits


async def test_state_details_over_16_kib_is_invalid(ops: Stubs) -> None:
    """State details above 16 KiB serialized are INVALID_ARGUMENT; 15 KiB is fine."""
    request = L.UpdateAgentStateRequest(agent_id="agent-a", state=L.AGENT_STATE_IDLE)
    request.details.update({"blob": "x" * 17_000})
    err = await fails(ops.lifecycle.UpdateAgentState(request), INVALID)
    assert "details" in (err.details() or "")
    request.details.update({"blob": "x" * 15_000})
    await ops.lifecycle.UpdateAgentState(request)


def _struct_carriers() -> dict[str, Any]:
    """Every request Struct a caller controls: a function placing one into a request
    (with CopyFrom: a constructor keyword would re-parse, and refuse, a deep Struct)."""

    def details(s: struct_pb2.Struct) -> Any:
        request = L.UpdateAgentStateRequest(agent_id="agent-a", state=L.AGENT_STATE_IDLE)
        request.details.CopyFrom(s)
        return "UpdateAgentState", request

    def start_input(s: struct_pb2.Struct) -> Any:
        request = W.StartWorkflowRequest(definition=one_task_definition())
        request.input.CopyFrom(s)
        return "StartWorkflow", request

    def parameters(s: struct_pb2.Struct) -> Any:
        request = W.CreateWorkflowDefinitionRequest(definition=one_task_definition())
        request.definition.tasks[0].parameters.CopyFrom(s)
        return "CreateWorkflowDefinition", request

    def inline_parameters(s: struct_pb2.Struct) -> Any:
        request = W.StartWorkflowRequest(definition=one_task_definition())
        request.definition.tasks[0].parameters.CopyFrom(s)
        return "StartWorkflow", request

    def output(s: struct_pb2.Struct) -> Any:
        request = W.CompleteTaskRequest(task_token="not.a-token")
        request.output.CopyFrom(s)
        return "CompleteTask", request

    return {
        "state-details": details,
        "start-input": start_input,
        "definition-parameters": parameters,
        "inline-parameters": inline_parameters,
        "task-output": output,
    }


CARRIERS = _struct_carriers()


async def _call(ops: Stubs, name: str, request: Any) -> Any:
    service = ops.lifecycle if name == "UpdateAgentState" else ops.workflow
    return await getattr(service, name)(request)


@pytest.mark.parametrize("depth", [33, 60, 200])
@pytest.mark.parametrize("shape", ["structs", "lists"])
@pytest.mark.parametrize("carrier", list(CARRIERS))
async def test_deeply_nested_struct_is_invalid(
    ops: Stubs, carrier: str, shape: str, depth: int
) -> None:
    """A Struct nested deeper than the limit is INVALID_ARGUMENT (never INTERNAL) in every
    request field that carries one, and nothing is stored."""
    value = nested_struct(depth) if shape == "structs" else nested_lists(depth)
    name, request = CARRIERS[carrier](value)
    err = await fails(_call(ops, name, request), INVALID)
    # Refused by the depth check, or (deeper in the request) already by the parser.
    message = err.details() or ""
    assert "deep" in message or "not a valid protobuf message" in message, message
    if depth == 33 and carrier in ("state-details", "start-input", "task-output"):
        assert "deep" in message, message
    agent = await ops.lifecycle.GetAgent(L.GetAgentRequest(agent_id="agent-a"))
    assert agent.state == L.AGENT_STATE_INITIALIZING
    assert not (await ops.sessions.ListSessions(S.ListSessionsRequest())).sessions
    assert not (
        await ops.workflow.ListWorkflowDefinitions(W.ListWorkflowDefinitionsRequest())
    ).definitions


async def test_struct_at_the_depth_limit_round_trips(ops: Stubs) -> None:
    """A Struct 32 levels deep is accepted and read back unchanged (no failure on read)."""
    request = L.UpdateAgentStateRequest(agent_id="agent-a", state=L.AGENT_STATE_IDLE)
    request.details.CopyFrom(nested_struct(32))
    await ops.lifecycle.UpdateAgentState(request)
    agent = await ops.lifecycle.GetAgent(L.GetAgentRequest(agent_id="agent-a"))
    assert agent.state_details == request.details
    watch = ops.lifecycle.WatchAgentStates(L.WatchAgentStatesRequest(send_initial_state=True))
    try:
        first = await asyncio.wait_for(watch.read(), READ_TIMEOUT)
        assert first.events[0].agent.state_details == request.details
    finally:
        watch.cancel()


# --------------------------------------------------------------------------- list limits


async def test_more_than_64_capabilities_is_invalid(ops: Stubs) -> None:
    """Registering 65 capabilities is INVALID_ARGUMENT; 64 is accepted."""
    caps = [f"cap-{i}" for i in range(65)]
    request = L.RegisterAgentRequest(agent_id="many", name="many", capabilities=caps)
    err = await fails(ops.lifecycle.RegisterAgent(request), INVALID)
    assert "capabilities" in (err.details() or "")
    await fails(
        ops.lifecycle.GetAgent(L.GetAgentRequest(agent_id="many")), grpc.StatusCode.NOT_FOUND
    )
    del request.capabilities[64:]
    await ops.lifecycle.RegisterAgent(request)


async def test_metadata_limits(ops: Stubs) -> None:
    """More than 64 metadata entries or an oversized value is INVALID_ARGUMENT."""
    many = L.RegisterAgentRequest(
        agent_id="m", name="m", metadata={f"k{i}": "v" for i in range(65)}
    )
    await fails(ops.lifecycle.RegisterAgent(many), INVALID)
    big = L.RegisterAgentRequest(agent_id="m", name="m", metadata={"k": "v" * 1025})
    await fails(ops.lifecycle.RegisterAgent(big), INVALID)


async def test_more_than_1000_tasks_is_invalid(ops: Stubs) -> None:
    """A definition of 1001 tasks is INVALID_ARGUMENT, stored or inline."""
    tasks = [W.TaskDefinition(task_id=f"t{i}", agent_capability="work") for i in range(1001)]
    definition = W.WorkflowDefinition(id="huge", version="1", tasks=tasks)
    err = await fails(
        ops.workflow.CreateWorkflowDefinition(
            W.CreateWorkflowDefinitionRequest(definition=definition)
        ),
        INVALID,
    )
    assert "tasks" in (err.details() or "")
    await fails(ops.workflow.StartWorkflow(W.StartWorkflowRequest(definition=definition)), INVALID)
    listed = await ops.workflow.ListWorkflowDefinitions(W.ListWorkflowDefinitionsRequest())
    assert not listed.definitions


async def test_watch_agent_ids_limit(ops: Stubs) -> None:
    """A watch naming more than 1000 agent ids is INVALID_ARGUMENT."""
    call = ops.lifecycle.WatchAgentStates(
        L.WatchAgentStatesRequest(agent_ids=[f"a{i}" for i in range(1001)])
    )
    await fails(call.read(), INVALID)


# --------------------------------------------------------------------------- streams


async def test_task_streams_per_agent_limit(
    start_server: Any, settings: Settings, clock: FakeClock
) -> None:
    """With max_task_streams_per_agent=2 a third StreamTasks is RESOURCE_EXHAUSTED
    (LIMIT_REACHED); other agents are unaffected; closing one frees a slot."""
    server = await start_server(
        settings.model_copy(update={"max_task_streams_per_agent": 2}), clock
    )
    async with grpc.aio.insecure_channel(server.address) as channel:
        stubs = Stubs(channel)
        await stubs.agent("agent-a")
        await stubs.agent("agent-b")
        open_calls = []
        try:
            for _ in range(2):
                call = stubs.workflow.StreamTasks(W.StreamTasksRequest(agent_id="agent-a"))
                open_calls.append(call)
            await _until_streams(server, "agent-a", 2)
            third = stubs.workflow.StreamTasks(W.StreamTasksRequest(agent_id="agent-a"))
            err = await fails(third.read(), EXHAUSTED)
            assert error_reason(err) == "LIMIT_REACHED"
            other = stubs.workflow.StreamTasks(W.StreamTasksRequest(agent_id="agent-b"))
            open_calls.append(other)
            await _until_streams(server, "agent-b", 1)
            open_calls.pop(0).cancel()
            await _until_streams(server, "agent-a", 1)
            again = stubs.workflow.StreamTasks(W.StreamTasksRequest(agent_id="agent-a"))
            open_calls.append(again)
            await _until_streams(server, "agent-a", 2)
        finally:
            for call in open_calls:
                call.cancel()


async def _until_streams(server: Any, agent_id: str, count: int) -> None:
    """Waits until the dispatcher holds `count` task streams of the agent."""
    streams = server._dispatcher._streams
    for _ in range(500):
        if len(streams.get(agent_id, ())) == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{agent_id}: {len(streams.get(agent_id, ()))} streams, not {count}")


async def test_watchers_limit(start_server: Any, settings: Settings, clock: FakeClock) -> None:
    """With max_watchers=3 a fourth agent watch is RESOURCE_EXHAUSTED (LIMIT_REACHED);
    session watches count separately; closing a watch frees its place."""
    server = await start_server(settings.model_copy(update={"max_watchers": 3}), clock)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stubs = Stubs(channel)
        request = L.WatchAgentStatesRequest(send_initial_state=True)
        watches = [stubs.lifecycle.WatchAgentStates(request) for _ in range(3)]
        try:
            for watch in watches:  # the SYNCED event: each is subscribed
                await asyncio.wait_for(watch.read(), READ_TIMEOUT)
            err = await fails(stubs.lifecycle.WatchAgentStates(request).read(), EXHAUSTED)
            assert error_reason(err) == "LIMIT_REACHED"
            session = await stubs.workflow.StartWorkflow(
                W.StartWorkflowRequest(definition=one_task_definition())
            )
            session_watch = stubs.sessions.WatchSession(
                S.WatchSessionRequest(session_id=session.session_id)
            )
            watches.append(session_watch)
            first = await asyncio.wait_for(session_watch.read(), READ_TIMEOUT)
            assert first.session_id == session.session_id
            watches.pop(0).cancel()
            for _ in range(200):
                retry = stubs.lifecycle.WatchAgentStates(request)
                try:
                    await asyncio.wait_for(retry.read(), READ_TIMEOUT)
                    watches.append(retry)
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == EXHAUSTED
                    await asyncio.sleep(0.01)
            else:
                raise AssertionError("a closed watch never freed its place")
        finally:
            for watch in watches:
                watch.cancel()


async def test_session_watchers_limit(
    start_server: Any, settings: Settings, clock: FakeClock
) -> None:
    """With max_watchers=2 a third WatchSession is RESOURCE_EXHAUSTED (LIMIT_REACHED)."""
    server = await start_server(settings.model_copy(update={"max_watchers": 2}), clock)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stubs = Stubs(channel)
        session = await stubs.workflow.StartWorkflow(
            W.StartWorkflowRequest(definition=one_task_definition())
        )
        request = S.WatchSessionRequest(session_id=session.session_id)
        watches = [stubs.sessions.WatchSession(request) for _ in range(2)]
        try:
            for watch in watches:
                await asyncio.wait_for(watch.read(), READ_TIMEOUT)
            err = await fails(stubs.sessions.WatchSession(request).read(), EXHAUSTED)
            assert error_reason(err) == "LIMIT_REACHED"
        finally:
            for watch in watches:
                watch.cancel()


# --------------------------------------------------------------------------- rate limit


async def _burst_until_limited(call: Any, limit: int) -> grpc.aio.AioRpcError:
    for _ in range(limit):
        await call()  # within the burst
    try:
        await call()
    except grpc.aio.AioRpcError as err:
        return err
    raise AssertionError(f"call {limit + 1} was not rate limited")


async def test_rate_limit_without_auth(
    start_server: Any, settings: Settings, clock: FakeClock
) -> None:
    """rate_limit=5, burst 5: the 6th quick call is RESOURCE_EXHAUSTED (RATE_LIMITED) with a
    positive RetryInfo delay; after waiting that delay a call works again."""
    server = await start_server(
        settings.model_copy(update={"rate_limit": 5, "rate_burst": 5}), clock
    )
    async with grpc.aio.insecure_channel(server.address) as channel:
        lc = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        err = await _burst_until_limited(lambda: lc.ListAgents(L.ListAgentsRequest()), 5)
        assert err.code() == EXHAUSTED
        assert error_reason(err) == "RATE_LIMITED"
        info = retry_info(err)
        assert info is not None, "RetryInfo detail missing"
        delay = info.retry_delay.ToTimedelta().total_seconds()
        assert 0 < delay <= 1.0
        # Streams and refused calls count as well.
        await fails(lc.GetAgent(L.GetAgentRequest(agent_id="x")), EXHAUSTED)
        await asyncio.sleep(delay + 0.05)
        await lc.ListAgents(L.ListAgentsRequest())


async def test_rate_limit_is_per_caller_with_auth(
    start_server: Any, settings: Settings, clock: FakeClock
) -> None:
    """With keys the limit is per key: a throttled admin does not slow the viewer, and
    unauthenticated callers are refused before they use anyone's budget."""
    keys = Keys.fresh()
    cfg = settings.model_copy(update={"rate_limit": 5, "rate_burst": 5, "api_keys": keys.api_keys})
    server = await start_server(cfg, clock)
    async with grpc.aio.insecure_channel(server.address) as channel:
        lc = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        admin, viewer = bearer(keys[Role.ADMIN]), bearer(keys[Role.VIEWER])
        err = await _burst_until_limited(
            lambda: lc.ListAgents(L.ListAgentsRequest(), metadata=admin), 5
        )
        assert error_reason(err) == "RATE_LIMITED"
        for _ in range(5):
            await lc.ListAgents(L.ListAgentsRequest(), metadata=viewer)
        await fails(lc.ListAgents(L.ListAgentsRequest()), grpc.StatusCode.UNAUTHENTICATED)


async def test_request_limits_are_configurable(
    start_server: Any, settings: Settings, clock: FakeClock
) -> None:
    """Capabilities, metadata, details, payload, nesting and tasks-per-definition limits
    follow the settings, each refused as INVALID_ARGUMENT on the field at fault."""
    tight = settings.model_copy(
        update={
            "max_capabilities": 2,
            "max_metadata_entries": 1,
            "max_details_bytes": 64,
            "max_payload_bytes": 64,
            "max_struct_depth": 2,
            "max_tasks_per_definition": 1,
        }
    )
    server = await start_server(tight, clock)
    async with grpc.aio.insecure_channel(server.address) as channel:
        ops = Stubs(channel)
        await ops.agent()
        err = await fails(
            ops.lifecycle.RegisterAgent(
                L.RegisterAgentRequest(
                    agent_id="b",
                    name="b",
                    capabilities=["x", "y", "z"],
                    metadata={"a": "1", "b": "2"},
                )
            ),
            INVALID,
        )
        assert "capabilities" in (err.details() or "") and "metadata" in (err.details() or "")
        details = struct_pb2.Struct()
        details.update({"text": "x" * 100})
        await fails(
            ops.lifecycle.UpdateAgentState(
                L.UpdateAgentStateRequest(
                    agent_id="agent-a", state=L.AGENT_STATE_IDLE, details=details
                )
            ),
            INVALID,
        )
        nested = struct_pb2.Struct()
        nested.update({"a": {"b": {"c": 1}}})
        await fails(
            ops.lifecycle.UpdateAgentState(
                L.UpdateAgentStateRequest(
                    agent_id="agent-a", state=L.AGENT_STATE_IDLE, details=nested
                )
            ),
            INVALID,
        )
        two_tasks = W.WorkflowDefinition(
            id="wf",
            tasks=[
                W.TaskDefinition(task_id="a", agent_capability="work"),
                W.TaskDefinition(task_id="b", agent_capability="work", depends_on=["a"]),
            ],
        )
        err = await fails(
            ops.workflow.CreateWorkflowDefinition(
                W.CreateWorkflowDefinitionRequest(definition=two_tasks)
            ),
            INVALID,
        )
        assert "definition.tasks" in (err.details() or "")
        one_task = W.WorkflowDefinition(
            id="wf", tasks=[W.TaskDefinition(task_id="a", agent_capability="work")]
        )
        big_input = struct_pb2.Struct()
        big_input.update({"text": "x" * 100})
        await fails(
            ops.workflow.StartWorkflow(
                W.StartWorkflowRequest(definition=one_task, input=big_input)
            ),
            INVALID,
        )


async def test_streams_per_connection_limit(
    start_server: Any, settings: Settings, clock: FakeClock
) -> None:
    """max_concurrent_streams caps the calls one HTTP/2 connection has open at once: with
    two watches open, a third call waits (the client queues it) until a watch ends."""
    server = await start_server(settings.model_copy(update={"max_concurrent_streams": 2}), clock)
    async with grpc.aio.insecure_channel(server.address) as channel:
        ops = Stubs(channel)
        await ops.agent()
        watches = [
            ops.lifecycle.WatchAgentStates(L.WatchAgentStatesRequest(send_initial_state=True))
            for _ in range(2)
        ]
        for watch in watches:
            await asyncio.wait_for(watch.read(), READ_TIMEOUT)  # open and answering
        third = asyncio.ensure_future(ops.lifecycle.GetAgent(L.GetAgentRequest(agent_id="agent-a")))
        done, _ = await asyncio.wait({third}, timeout=0.5)
        assert not done, "a third concurrent call was served past the limit"
        watches[0].cancel()
        agent = await asyncio.wait_for(third, READ_TIMEOUT)
        assert agent.agent_id == "agent-a"
        watches[1].cancel()
