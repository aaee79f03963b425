"""WorkflowService servicer: definitions, starting runs, and the dispatch channel."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import struct_pb2
from opspawn.opscore.v1 import session_pb2, workflow_pb2, workflow_pb2_grpc

from opscore.api import workflow_convert as convert
from opscore.api.access import current_principal
from opscore.api.fields import Violations, require_id, set_time, struct_to_dict
from opscore.config import Limits
from opscore.workflow import WorkflowEngine

Context = grpc.aio.ServicerContext[Any, Any]

MAX_IN_FLIGHT = 1000
MAX_ERROR_MESSAGE = 8192


class WorkflowServicer(workflow_pb2_grpc.WorkflowServiceServicer):
    def __init__(self, engine: WorkflowEngine, limits: Limits) -> None:
        self._engine = engine
        self._limits = limits

    async def CreateWorkflowDefinition(
        self, request: workflow_pb2.CreateWorkflowDefinitionRequest, context: Context
    ) -> workflow_pb2.WorkflowDefinition:
        v = Violations()
        if not request.HasField("definition"):
            v.add("definition", "is required")
        self._check_tasks(v, request.definition)
        v.raise_if_any()
        created = await self._engine.create_definition(
            convert.definition_from_proto(request.definition)
        )
        return convert.definition_to_proto(created)

    async def GetWorkflowDefinition(
        self, request: workflow_pb2.GetWorkflowDefinitionRequest, context: Context
    ) -> workflow_pb2.WorkflowDefinition:
        require_id("id", request.id)
        _check_version(request.version, required=False)
        found = await self._engine.get_definition(request.id, request.version)
        return convert.definition_to_proto(found)

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
        require_id("id", request.id)
        _check_version(request.version, required=True)
        await self._engine.delete_definition(request.id, request.version)
        return workflow_pb2.DeleteWorkflowDefinitionResponse()

    async def StartWorkflow(
        self, request: workflow_pb2.StartWorkflowRequest, context: Context
    ) -> session_pb2.Session:
        v = Violations()
        source = request.WhichOneof("definition_source")
        if source is None:
            v.add("workflow_definition_id", "give workflow_definition_id or definition")
        elif source == "workflow_definition_id":
            v.identifier("workflow_definition_id", request.workflow_definition_id)
        v.text("workflow_definition_version", request.workflow_definition_version, max_len=64)
        v.identifier("agent_id", request.agent_id, required=False)
        v.text("request_id", request.request_id, max_len=256)
        self._payload(v, "input", request.input)
        if source == "definition":
            self._check_tasks(v, request.definition)
        v.raise_if_any()
        definition = (
            convert.definition_from_proto(request.definition)
            if source == "definition"
            else (request.workflow_definition_id, request.workflow_definition_version)
        )
        run = await self._engine.start_workflow(
            definition, struct_to_dict(request.input), request.agent_id, request.request_id
        )
        return convert.session_to_proto(run)

    async def StreamTasks(
        self, request: workflow_pb2.StreamTasksRequest, context: Context
    ) -> AsyncIterator[workflow_pb2.TaskAssignment]:
        v = Violations()
        v.identifier("agent_id", request.agent_id)
        if not 0 <= request.max_in_flight <= MAX_IN_FLIGHT:
            v.add("max_in_flight", f"must be between 1 and {MAX_IN_FLIGHT} (0: 1)")
        v.raise_if_any()
        dispatcher = self._engine.dispatcher
        stream = await dispatcher.connect(request.agent_id, request.max_in_flight or 1)
        try:
            while True:
                assignment = await stream.next()
                yield convert.assignment_to_proto(
                    assignment, self._engine.issue_token(assignment.key)
                )
        finally:
            dispatcher.disconnect(stream)

    async def CompleteTask(
        self, request: workflow_pb2.CompleteTaskRequest, context: Context
    ) -> workflow_pb2.CompleteTaskResponse:
        v = Violations()
        v.text("task_token", request.task_token, max_len=1024, required=True)
        self._payload(v, "output", request.output)
        v.raise_if_any()
        await self._engine.complete_task(
            request.task_token, struct_to_dict(request.output), _caller()
        )
        return workflow_pb2.CompleteTaskResponse()

    async def FailTask(
        self, request: workflow_pb2.FailTaskRequest, context: Context
    ) -> workflow_pb2.FailTaskResponse:
        v = Violations()
        v.text("task_token", request.task_token, max_len=1024, required=True)
        v.text("error_message", request.error_message, max_len=MAX_ERROR_MESSAGE)
        v.raise_if_any()
        await self._engine.fail_task(
            request.task_token, request.error_message or "failed", request.retryable, _caller()
        )
        return workflow_pb2.FailTaskResponse()

    async def HeartbeatTask(
        self, request: workflow_pb2.HeartbeatTaskRequest, context: Context
    ) -> workflow_pb2.HeartbeatTaskResponse:
        v = Violations()
        v.text("task_token", request.task_token, max_len=1024, required=True)
        v.raise_if_any()
        cancel, deadline = await self._engine.heartbeat_task(request.task_token, _caller())
        response = workflow_pb2.HeartbeatTaskResponse(cancel_requested=cancel)
        set_time(response.deadline, deadline)
        return response

    def _payload(self, v: Violations, field: str, value: struct_pb2.Struct) -> None:
        v.struct(field, value, self._limits.max_payload_bytes, self._limits.max_struct_depth)

    def _check_tasks(self, v: Violations, definition: workflow_pb2.WorkflowDefinition) -> None:
        """What protobuf lets through but a definition must not hold: oversized or
        non-finite parameters, malformed durations. (The graph is judged by the domain.)"""
        for i, task in enumerate(definition.tasks):
            where = f"definition.tasks[{i}]"
            self._payload(v, f"{where}.parameters", task.parameters)
            v.duration(f"{where}.timeout", task.timeout)
            v.duration(f"{where}.retry_policy.initial_interval", task.retry_policy.initial_interval)
            v.duration(f"{where}.retry_policy.maximum_interval", task.retry_policy.maximum_interval)
            if not math.isfinite(task.retry_policy.backoff_coefficient):
                v.add(f"{where}.retry_policy.backoff_coefficient", "must be a finite number")


def _caller() -> str:
    """The agent making this call ("" when the caller is not an agent)."""
    return current_principal.get().agent_id


def _check_version(version: str, *, required: bool) -> None:
    v = Violations()
    v.text("version", version, max_len=64, required=required)
    v.raise_if_any()
