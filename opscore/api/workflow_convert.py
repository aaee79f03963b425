"""WorkflowService and SessionService: protobuf <-> domain."""

from __future__ import annotations

from google.protobuf import duration_pb2
from opspawn.opscore.v1 import session_pb2, workflow_pb2

from opscore.api.fields import dict_to_struct, set_time, struct_to_dict
from opscore.definitions import (
    DEFAULT_TIMEOUT_SECONDS,
    RetryPolicy,
    TaskDefinition,
    WorkflowDefinition,
)
from opscore.runs import Assignment, Run, SessionEvent

DEFAULT_RETRY = RetryPolicy()


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


def definition_from_proto(msg: workflow_pb2.WorkflowDefinition) -> WorkflowDefinition:
    """Structural conversion only; `definitions.validate` judges the result."""
    return WorkflowDefinition(
        id=msg.id,
        name=msg.name,
        description=msg.description,
        version=msg.version,
        tasks=tuple(
            TaskDefinition(
                task_id=t.task_id,
                name=t.name,
                agent_capability=t.agent_capability,
                parameters=struct_to_dict(t.parameters),
                depends_on=tuple(t.depends_on),
                next_task_id=t.next_task_id,
                retry_policy=retry_from_proto(t),
                timeout=_seconds(t.timeout) if t.HasField("timeout") else DEFAULT_TIMEOUT_SECONDS,
            )
            for t in msg.tasks
        ),
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
    return msg


def session_to_proto(run: Run) -> session_pb2.Session:
    msg = session_pb2.Session(
        session_id=run.session_id,
        workflow_definition_id=run.definition.id,
        workflow_definition_version=run.definition.version,
        agent_id=run.agent_id,
        status=run.status.value,  # type: ignore[arg-type]
        error=run.error,
    )
    dict_to_struct(run.input, msg.input)
    if run.output is not None:
        dict_to_struct(run.output, msg.output)
    for task in run.tasks.values():
        t = msg.tasks.add(
            task_id=task.spec.task_id,
            name=task.spec.name,
            agent_capability=task.spec.agent_capability,
            status=task.status.value,
            attempt=task.attempt,
            agent_id=task.agent_id,
            error=task.error,
        )
        if task.output is not None:
            dict_to_struct(task.output, t.output)
        set_time(t.updated_at, task.updated_at)
    set_time(msg.created_at, run.created_at)
    set_time(msg.updated_at, run.updated_at)
    set_time(msg.ended_at, run.ended_at)
    return msg


def session_event_to_proto(event: SessionEvent) -> session_pb2.SessionEvent:
    msg = session_pb2.SessionEvent(
        session_id=event.session_id,
        sequence=event.sequence,
        type=event.type.value,  # type: ignore[arg-type]
        task_id=event.task_id,
        attempt=event.attempt,
        agent_id=event.agent_id,
    )
    dict_to_struct(event.detail, msg.detail)
    set_time(msg.occurred_at, event.occurred_at)
    return msg
