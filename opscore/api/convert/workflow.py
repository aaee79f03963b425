"""WorkflowService: protobuf <-> domain, validating every request field that
protobuf lets through (the definition's graph is judged by the domain)."""

from __future__ import annotations

import dataclasses
import math

from google.protobuf import duration_pb2
from opspawn.opscore.v1 import workflow_pb2

from opscore.api.convert.fields import RequestViolations, dict_to_struct, set_time, struct_to_dict
from opscore.domain.workflows.definitions import (
    RetryPolicy,
    TaskDefinition,
    TaskTimeouts,
    WorkflowDefinition,
    resolve_timeouts,
)
from opscore.domain.workflows.engine import DefinitionSource
from opscore.domain.workflows.session import Assignment
from opscore.protocol.limits import (
    MAX_ERROR_MESSAGE_LENGTH,
    MAX_IN_FLIGHT,
    MAX_REQUEST_ID_LENGTH,
    MAX_TASK_TOKEN_LENGTH,
    MAX_VERSION_LENGTH,
    RequestLimits,
)
from opscore.protocol.validation import require_id
from opscore.protocol.values import JsonObject

DEFAULT_RETRY = RetryPolicy()
TIMEOUT_NAMES = ("start_to_close", "heartbeat", "schedule_to_start")


def _seconds(value: duration_pb2.Duration) -> float:
    return value.seconds + value.nanos / 1e9


def _duration(seconds: float, out: duration_pb2.Duration) -> None:
    out.seconds = int(seconds)
    out.nanos = round((seconds - int(seconds)) * 1e9)


def retry_from_proto(task: workflow_pb2.TaskDefinition) -> RetryPolicy:
    """Unset fields take the defaults; maximum_interval defaults to 100 x initial."""
    if not task.HasField("retry_policy"):
        return DEFAULT_RETRY
    p = task.retry_policy
    initial = (
        _seconds(p.initial_interval)
        if p.HasField("initial_interval")
        else DEFAULT_RETRY.initial_interval
    )
    return RetryPolicy(
        max_attempts=p.max_attempts or DEFAULT_RETRY.max_attempts,
        initial_interval=initial,
        backoff_coefficient=p.backoff_coefficient or DEFAULT_RETRY.backoff_coefficient,
        maximum_interval=(
            _seconds(p.maximum_interval) if p.HasField("maximum_interval") else 100 * initial
        ),
    )


def _timeouts(msg: workflow_pb2.TaskTimeouts) -> TaskTimeouts:
    def seconds(name: str) -> float | None:
        return _seconds(getattr(msg, name)) if msg.HasField(name) else None  # type: ignore[arg-type]

    return TaskTimeouts(
        start_to_close=seconds("start_to_close"),
        heartbeat=seconds("heartbeat"),
        schedule_to_start=seconds("schedule_to_start"),
    )


def _task_timeouts(t: workflow_pb2.TaskDefinition) -> TaskTimeouts:
    """A task's limits as written; the older `timeout` field is its heartbeat limit."""
    written = _timeouts(t.timeouts)
    if written.heartbeat is None and t.HasField("timeout"):
        return dataclasses.replace(written, heartbeat=_seconds(t.timeout))
    return written


def _set_timeouts(limits: TaskTimeouts, out: workflow_pb2.TaskTimeouts) -> None:
    for name, seconds in zip(TIMEOUT_NAMES, limits.items(), strict=True):
        if seconds is not None:
            _duration(seconds, getattr(out, name))


def _task_from_proto(t: workflow_pb2.TaskDefinition, defaults: TaskTimeouts) -> TaskDefinition:
    heartbeat, start_to_close, schedule_to_start = resolve_timeouts(_task_timeouts(t), defaults)
    return TaskDefinition(
        task_id=t.task_id,
        name=t.name,
        agent_capability=t.agent_capability,
        parameters=struct_to_dict(t.parameters),
        depends_on=tuple(t.depends_on),
        next_task_id=t.next_task_id,
        retry_policy=retry_from_proto(t),
        timeout=heartbeat,
        start_to_close=start_to_close,
        schedule_to_start=schedule_to_start,
    )


def definition_from_proto(msg: workflow_pb2.WorkflowDefinition) -> WorkflowDefinition:
    """Structural conversion only; `definitions.validate` judges the result."""
    defaults = _timeouts(msg.task_timeouts)
    return WorkflowDefinition(
        id=msg.id,
        name=msg.name,
        description=msg.description,
        version=msg.version,
        task_timeouts=defaults,
        tasks=tuple(_task_from_proto(t, defaults) for t in msg.tasks),
    )


def definition_to_proto(defn: WorkflowDefinition) -> workflow_pb2.WorkflowDefinition:
    msg = workflow_pb2.WorkflowDefinition(
        id=defn.id, name=defn.name, description=defn.description, version=defn.version
    )
    for t in defn.tasks:
        task = msg.tasks.add(
            task_id=t.task_id,
            name=t.name,
            agent_capability=t.agent_capability,
            next_task_id=t.next_task_id,
            depends_on=list(t.depends_on),
        )
        dict_to_struct(t.parameters, task.parameters)
        policy = task.retry_policy
        policy.max_attempts = t.retry_policy.max_attempts
        policy.backoff_coefficient = t.retry_policy.backoff_coefficient
        _duration(t.retry_policy.initial_interval, policy.initial_interval)
        _duration(t.retry_policy.maximum_interval, policy.maximum_interval)
        _duration(t.timeout, task.timeout)
        _set_timeouts(TaskTimeouts(t.start_to_close, t.timeout, t.schedule_to_start), task.timeouts)
    _set_timeouts(defn.task_timeouts, msg.task_timeouts)
    set_time(msg.created_at, defn.created_at)
    return msg


def assignment_to_proto(a: Assignment, token: str) -> workflow_pb2.TaskAssignment:
    msg = workflow_pb2.TaskAssignment(
        task_token=token,
        task_id=a.key.task_id,
        session_id=a.key.session_id,
        workflow_id=a.workflow_id,
        name=a.name,
        agent_capability=a.agent_capability,
        attempt=a.key.attempt,
    )
    dict_to_struct(a.payload, msg.payload)
    set_time(msg.deadline, a.deadline)
    _duration(a.lease, msg.lease)
    if a.attempt_deadline is not None and a.start_to_close is not None:
        set_time(msg.attempt_deadline, a.attempt_deadline)
        _duration(a.start_to_close, msg.start_to_close)
    msg.max_attempts = a.max_attempts
    return msg


# -- requests -----------------------------------------------------------------------


def _check_tasks(
    v: RequestViolations, definition: workflow_pb2.WorkflowDefinition, limits: RequestLimits
) -> None:
    """What protobuf lets through but a definition must not hold: oversized or
    non-finite parameters, malformed durations."""
    for name in TIMEOUT_NAMES:
        v.duration(f"definition.task_timeouts.{name}", getattr(definition.task_timeouts, name))
    for i, task in enumerate(definition.tasks):
        where = f"definition.tasks[{i}]"
        v.payload(f"{where}.parameters", task.parameters, limits)
        v.duration(f"{where}.timeout", task.timeout)
        for name in TIMEOUT_NAMES:
            v.duration(f"{where}.timeouts.{name}", getattr(task.timeouts, name))
        if (
            task.HasField("timeout")
            and task.timeouts.HasField("heartbeat")
            and task.timeout != task.timeouts.heartbeat
        ):
            v.add(f"{where}.timeout", "differs from timeouts.heartbeat; set one of them")
        v.duration(f"{where}.retry_policy.initial_interval", task.retry_policy.initial_interval)
        v.duration(f"{where}.retry_policy.maximum_interval", task.retry_policy.maximum_interval)
        if not math.isfinite(task.retry_policy.backoff_coefficient):
            v.add(f"{where}.retry_policy.backoff_coefficient", "must be a finite number")


def new_definition(
    req: workflow_pb2.CreateWorkflowDefinitionRequest, limits: RequestLimits
) -> WorkflowDefinition:
    v = RequestViolations()
    if not req.HasField("definition"):
        v.add("definition", "is required")
    _check_tasks(v, req.definition, limits)
    v.raise_if_any()
    return definition_from_proto(req.definition)


def definition_version(definition_id: str, version: str, *, required: bool) -> tuple[str, str]:
    """(id, version) naming a stored definition (Get: version optional; Delete: not)."""
    require_id("id", definition_id)
    v = RequestViolations()
    v.text("version", version, max_len=MAX_VERSION_LENGTH, required=required)
    v.raise_if_any()
    return definition_id, version


def start_request(
    req: workflow_pb2.StartWorkflowRequest, limits: RequestLimits
) -> tuple[DefinitionSource, JsonObject, str, str]:
    """(definition, input, agent_id, request_id) of a new session."""
    v = RequestViolations()
    source = req.WhichOneof("definition_source")
    if source is None:
        v.add("workflow_definition_id", "give workflow_definition_id or definition")
    elif source == "workflow_definition_id":
        v.identifier("workflow_definition_id", req.workflow_definition_id)
    v.text(
        "workflow_definition_version", req.workflow_definition_version, max_len=MAX_VERSION_LENGTH
    )
    v.identifier("agent_id", req.agent_id, required=False)
    v.text("request_id", req.request_id, max_len=MAX_REQUEST_ID_LENGTH)
    v.payload("input", req.input, limits)
    if source == "definition":
        _check_tasks(v, req.definition, limits)
    v.raise_if_any()
    definition: DefinitionSource = (
        definition_from_proto(req.definition)
        if source == "definition"
        else (req.workflow_definition_id, req.workflow_definition_version)
    )
    return definition, struct_to_dict(req.input), req.agent_id, req.request_id


def stream_request(req: workflow_pb2.StreamTasksRequest) -> tuple[str, int, tuple[str, ...]]:
    """(agent_id, max_in_flight, held_task_tokens) of a task stream."""
    v = RequestViolations()
    v.identifier("agent_id", req.agent_id)
    if not 0 <= req.max_in_flight <= MAX_IN_FLIGHT:
        v.add("max_in_flight", f"must be between 1 and {MAX_IN_FLIGHT} (0: 1)")
    if len(req.held_task_tokens) > MAX_IN_FLIGHT:
        v.add("held_task_tokens", f"at most {MAX_IN_FLIGHT} tokens")
    for i, token in enumerate(req.held_task_tokens[:MAX_IN_FLIGHT]):
        v.text(f"held_task_tokens[{i}]", token, max_len=MAX_TASK_TOKEN_LENGTH, required=True)
    v.raise_if_any()
    return req.agent_id, req.max_in_flight or 1, tuple(req.held_task_tokens)


def _token(v: RequestViolations, token: str) -> None:
    v.text("task_token", token, max_len=MAX_TASK_TOKEN_LENGTH, required=True)


def completion(
    req: workflow_pb2.CompleteTaskRequest, limits: RequestLimits
) -> tuple[str, JsonObject]:
    """(task_token, output) of a completed attempt."""
    v = RequestViolations()
    _token(v, req.task_token)
    v.payload("output", req.output, limits)
    v.raise_if_any()
    return req.task_token, struct_to_dict(req.output)


def failure(req: workflow_pb2.FailTaskRequest) -> tuple[str, str, bool]:
    """(task_token, error message, retryable) of a failed attempt."""
    v = RequestViolations()
    _token(v, req.task_token)
    v.text("error_message", req.error_message, max_len=MAX_ERROR_MESSAGE_LENGTH)
    v.raise_if_any()
    return req.task_token, req.error_message or "failed", req.retryable


def heartbeat_token(req: workflow_pb2.HeartbeatTaskRequest) -> str:
    v = RequestViolations()
    _token(v, req.task_token)
    v.raise_if_any()
    return req.task_token
