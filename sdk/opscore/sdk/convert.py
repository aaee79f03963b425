"""Every conversion between protobuf messages and the SDK's Python values."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from opspawn.opscore.v1 import lifecycle_pb2, session_pb2, workflow_pb2

from opscore.protocol.definition_files import load_definition, parse_definition
from opscore.protocol.enums import (
    AgentEventType,
    AgentState,
    SessionEventType,
    SessionStatus,
    TaskStatus,
    TimeoutType,
    WaitingReason,
)
from opscore.protocol.errors import InvalidArgumentError
from opscore.sdk import types

E = TypeVar("E", bound=enum.IntEnum)

DefinitionSource = dict[str, Any] | str | Path | workflow_pb2.WorkflowDefinition


# --------------------------------------------------------------------------- Python -> proto


def to_struct(value: dict[str, Any] | None) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    if value:
        out.update(value)
    return out


def to_timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    """Naive datetimes are refused: guessing their zone would misdate state reports."""
    if moment.tzinfo is None:
        raise ValueError("observed_at must be timezone-aware (e.g. datetime.now(UTC))")
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(moment)
    return out


def to_enum(kind: type[E], value: E | int | str, prefix: str) -> E:
    """Accepts the enum, its number, or a name in any case with or without the proto
    prefix: `AgentState.IDLE`, 2, "idle", "AGENT_STATE_IDLE"."""
    if isinstance(value, str):
        name = value.strip().upper().removeprefix(prefix)
        try:
            return kind[name]
        except KeyError:
            choices = ", ".join(m.name for m in kind if m.value)
            raise ValueError(f"unknown {kind.__name__} {value!r} (one of {choices})") from None
    return kind(value)


def to_state(value: AgentState | int | str) -> AgentState:
    return to_enum(AgentState, value, "AGENT_STATE_")


def to_session_status(value: SessionStatus | int | str) -> SessionStatus:
    return to_enum(SessionStatus, value, "SESSION_STATUS_")


def to_definition(source: DefinitionSource) -> workflow_pb2.WorkflowDefinition:
    """A definition from a dict (the JSON/YAML file shape), a .json/.yaml path, or the
    proto itself; malformed input is an InvalidArgumentError before any call."""
    if isinstance(source, workflow_pb2.WorkflowDefinition):
        return source
    if isinstance(source, dict):
        return parse_definition(source)
    path = Path(source)
    if not path.is_file():
        raise InvalidArgumentError.single("definition", f"no such file: {path}")
    return load_definition(path)


# --------------------------------------------------------------------------- proto -> Python


def _plain(value: Any) -> Any:
    """Struct numbers are doubles; integral ones become int so {"n": 3} round-trips."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def from_struct(value: struct_pb2.Struct) -> dict[str, Any]:
    result: dict[str, Any] = _plain(json_format.MessageToDict(value))
    return result


def _time(message: Message, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, field)
    return stamp.ToDatetime(tzinfo=UTC)


def _required_time(message: Message, field: str) -> datetime:
    stamp: timestamp_pb2.Timestamp = getattr(message, field)
    return stamp.ToDatetime(tzinfo=UTC)


def agent(msg: lifecycle_pb2.Agent) -> types.Agent:
    return types.Agent(
        agent_id=msg.agent_id,
        name=msg.name,
        version=msg.version,
        capabilities=tuple(msg.capabilities),
        contact_endpoint=msg.contact_endpoint,
        metadata=dict(msg.metadata),
        state=AgentState(msg.state),
        state_details=from_struct(msg.state_details),
        registered_at=_required_time(msg, "registered_at"),
        state_updated_at=_required_time(msg, "state_updated_at"),
        last_heartbeat_at=_required_time(msg, "last_heartbeat_at"),
        state_observed_at=_time(msg, "state_observed_at"),
        revision=msg.revision,
        connected=msg.connected,
        free_slots=msg.free_slots,
        last_contact_at=_time(msg, "last_contact_at"),
        agent_token=msg.agent_token,
    )


def agent_event(msg: lifecycle_pb2.AgentEvent) -> types.AgentEvent:
    return types.AgentEvent(
        revision=msg.revision,
        type=AgentEventType(msg.type),
        agent=agent(msg.agent) if msg.HasField("agent") else None,
        occurred_at=_required_time(msg, "occurred_at"),
    )


def agent_heartbeat(msg: lifecycle_pb2.HeartbeatResponse) -> types.AgentHeartbeat:
    return types.AgentHeartbeat(
        state=AgentState(msg.state),
        liveness_timeout=(
            msg.liveness_timeout.ToTimedelta().total_seconds()
            if msg.HasField("liveness_timeout")
            else float(msg.liveness_timeout_seconds)
        ),
        server_time=_required_time(msg, "server_time"),
    )


def workflow_definition(msg: workflow_pb2.WorkflowDefinition) -> types.WorkflowDefinition:
    return types.WorkflowDefinition(
        id=msg.id,
        name=msg.name,
        description=msg.description,
        version=msg.version,
        tasks=tuple(
            types.WorkflowTask(
                task_id=t.task_id,
                name=t.name,
                agent_capability=t.agent_capability,
                parameters=from_struct(t.parameters),
                depends_on=tuple(t.depends_on),
                next_task_id=t.next_task_id,
                timeout=t.timeout.ToTimedelta().total_seconds(),
            )
            for t in msg.tasks
        ),
        created_at=_time(msg, "created_at"),
    )


def session(msg: session_pb2.Session) -> types.Session:
    return types.Session(
        session_id=msg.session_id,
        workflow_definition_id=msg.workflow_definition_id,
        workflow_definition_version=msg.workflow_definition_version,
        agent_id=msg.agent_id,
        status=SessionStatus(msg.status),
        input=from_struct(msg.input),
        output=from_struct(msg.output) if msg.HasField("output") else None,
        error=msg.error,
        tasks=tuple(
            types.SessionTask(
                task_id=t.task_id,
                name=t.name,
                agent_capability=t.agent_capability,
                status=TaskStatus(t.status),
                attempt=t.attempt,
                agent_id=t.agent_id,
                output=from_struct(t.output) if t.HasField("output") else None,
                error=t.error,
                updated_at=_time(t, "updated_at"),
                waiting_reason=WaitingReason(t.waiting_reason),
                waiting_message=t.waiting_message,
                ready_at=_time(t, "ready_at"),
                max_attempts=t.max_attempts,
            )
            for t in msg.tasks
        ),
        created_at=_time(msg, "created_at"),
        updated_at=_time(msg, "updated_at"),
        ended_at=_time(msg, "ended_at"),
    )


def session_event(msg: session_pb2.SessionEvent) -> types.SessionEvent:
    return types.SessionEvent(
        session_id=msg.session_id,
        sequence=msg.sequence,
        type=SessionEventType(msg.type),
        task_id=msg.task_id,
        attempt=msg.attempt,
        agent_id=msg.agent_id,
        detail=from_struct(msg.detail),
        occurred_at=_required_time(msg, "occurred_at"),
        timeout_type=TimeoutType(msg.timeout_type),
    )


def task_assignment(msg: workflow_pb2.TaskAssignment) -> types.TaskAssignment:
    return types.TaskAssignment(
        task_token=msg.task_token,
        task_id=msg.task_id,
        session_id=msg.session_id,
        workflow_id=msg.workflow_id,
        name=msg.name,
        agent_capability=msg.agent_capability,
        payload=from_struct(msg.payload),
        attempt=msg.attempt,
        deadline=_required_time(msg, "deadline"),
        lease=msg.lease.ToTimedelta().total_seconds(),
        attempt_deadline=_time(msg, "attempt_deadline"),
        start_to_close=(
            msg.start_to_close.ToTimedelta().total_seconds()
            if msg.HasField("start_to_close")
            else None
        ),
        max_attempts=msg.max_attempts,
    )


def task_heartbeat(msg: workflow_pb2.HeartbeatTaskResponse) -> types.TaskHeartbeat:
    return types.TaskHeartbeat(
        cancel_requested=msg.cancel_requested, deadline=_time(msg, "deadline")
    )
