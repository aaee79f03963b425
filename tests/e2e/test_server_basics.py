"""Server basics: health checking, reflection, and the not-yet-built services."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opspawn.opscore.v1 import (
    session_pb2,
    session_pb2_grpc,
    workflow_pb2,
    workflow_pb2_grpc,
)

OPSCORE_SERVICES = {
    "opspawn.opscore.v1.LifecycleService",
    "opspawn.opscore.v1.WorkflowService",
    "opspawn.opscore.v1.SessionService",
}


async def test_health_reports_serving(channel: grpc.aio.Channel) -> None:
    """The standard health check for the whole server ("") answers SERVING."""
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def reflect(
    channel: grpc.aio.Channel, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([request]))
    responses = [response async for response in call]
    assert len(responses) == 1
    return responses[0]


async def test_reflection_lists_and_describes_services(channel: grpc.aio.Channel) -> None:
    """Reflection lists the three Ops-Core services and serves the descriptor that defines
    LifecycleService with its RPCs, so tools like grpcurl work without proto files."""
    listed = await reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert names >= OPSCORE_SERVICES

    described = await reflect(
        channel,
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="opspawn.opscore.v1.LifecycleService"
        ),
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    lifecycle = next(
        service
        for f in files
        if f.package == "opspawn.opscore.v1"
        for service in f.service
        if service.name == "LifecycleService"
    )
    assert {m.name for m in lifecycle.method} == {
        "RegisterAgent",
        "DeregisterAgent",
        "GetAgent",
        "ListAgents",
        "UpdateAgentState",
        "Heartbeat",
        "WatchAgentStates",
        "RotateAgentToken",
    }


async def test_workflow_and_session_services_are_routed(channel: grpc.aio.Channel) -> None:
    """WorkflowService and SessionService are served: an unknown resource is NOT_FOUND."""
    workflows = workflow_pb2_grpc.WorkflowServiceStub(channel)
    sessions = session_pb2_grpc.SessionServiceStub(channel)
    calls = [
        workflows.GetWorkflowDefinition(workflow_pb2.GetWorkflowDefinitionRequest(id="wf")),
        sessions.GetSession(session_pb2.GetSessionRequest(session_id="s")),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
