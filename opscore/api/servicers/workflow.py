"""WorkflowService: definitions, starting sessions, and the dispatch channel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from opspawn.opscore.v1 import session_pb2, workflow_pb2, workflow_pb2_grpc

from opscore.api.convert import session as session_convert
from opscore.api.convert import workflow as convert
from opscore.api.convert.fields import set_time
from opscore.api.interceptors.auth import current_principal
from opscore.domain.sessions.history import SessionHistory
from opscore.domain.workflows.engine import WorkflowEngine
from opscore.protocol.limits import RequestLimits

Context = grpc.aio.ServicerContext[Any, Any]


def _caller() -> str:
    """The agent making this call ("" when the caller is not an agent): an agent may
    only answer attempts given to it."""
    return current_principal.get().agent_id


class WorkflowServicer(workflow_pb2_grpc.WorkflowServiceServicer):
    def __init__(
        self, engine: WorkflowEngine, limits: RequestLimits, sessions: SessionHistory
    ) -> None:
        self._engine = engine
        self._limits = limits
        self._sessions = sessions

    async def CreateWorkflowDefinition(
        self, request: workflow_pb2.CreateWorkflowDefinitionRequest, context: Context
    ) -> workflow_pb2.WorkflowDefinition:
        definition = convert.new_definition(request, self._limits)
        return convert.definition_to_proto(await self._engine.create_definition(definition))

    async def GetWorkflowDefinition(
        self, request: workflow_pb2.GetWorkflowDefinitionRequest, context: Context
    ) -> workflow_pb2.WorkflowDefinition:
        ref = convert.definition_version(request.id, request.version, required=False)
        return convert.definition_to_proto(await self._engine.get_definition(*ref))

    async def ListWorkflowDefinitions(
        self, request: workflow_pb2.ListWorkflowDefinitionsRequest, context: Context
    ) -> workflow_pb2.ListWorkflowDefinitionsResponse:
        page = await self._engine.list_definitions(request.page_size, request.page_token)
        return workflow_pb2.ListWorkflowDefinitionsResponse(
            definitions=[convert.definition_to_proto(d) for d in page.items],
            next_page_token=page.next_page_token,
        )

    async def DeleteWorkflowDefinition(
        self, request: workflow_pb2.DeleteWorkflowDefinitionRequest, context: Context
    ) -> workflow_pb2.DeleteWorkflowDefinitionResponse:
        ref = convert.definition_version(request.id, request.version, required=True)
        await self._engine.delete_definition(*ref)
        return workflow_pb2.DeleteWorkflowDefinitionResponse()

    async def StartWorkflow(
        self, request: workflow_pb2.StartWorkflowRequest, context: Context
    ) -> session_pb2.Session:
        start = convert.start_request(request, self._limits)
        if request.wait:
            with self._sessions.awaiting() as ended:
                session = await ended(await self._engine.start_session(*start))
        else:
            session = await self._engine.start_session(*start)
        return session_convert.session_to_proto(session, self._engine.waiting(session))

    async def StreamTasks(
        self, request: workflow_pb2.StreamTasksRequest, context: Context
    ) -> AsyncIterator[workflow_pb2.TaskAssignment]:
        async for assignment, token in self._engine.serve_tasks(*convert.stream_request(request)):
            yield convert.assignment_to_proto(assignment, token)

    async def CompleteTask(
        self, request: workflow_pb2.CompleteTaskRequest, context: Context
    ) -> workflow_pb2.CompleteTaskResponse:
        await self._engine.complete_task(*convert.completion(request, self._limits), _caller())
        return workflow_pb2.CompleteTaskResponse()

    async def FailTask(
        self, request: workflow_pb2.FailTaskRequest, context: Context
    ) -> workflow_pb2.FailTaskResponse:
        await self._engine.fail_task(*convert.failure(request), _caller())
        return workflow_pb2.FailTaskResponse()

    async def HeartbeatTask(
        self, request: workflow_pb2.HeartbeatTaskRequest, context: Context
    ) -> workflow_pb2.HeartbeatTaskResponse:
        token = convert.heartbeat_token(request)
        cancel, deadline = await self._engine.heartbeat_task(token, _caller())
        response = workflow_pb2.HeartbeatTaskResponse(cancel_requested=cancel)
        set_time(response.deadline, deadline)
        return response
