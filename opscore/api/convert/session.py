"""SessionService: protobuf <-> domain, validating every request field."""

from __future__ import annotations

from collections.abc import Mapping

from opspawn.opscore.v1 import session_pb2

from opscore.api.convert.fields import RequestViolations, dict_to_struct, set_time
from opscore.domain.workflows.session import Session, SessionEvent, SessionFilter
from opscore.protocol.enums import SessionEventType, SessionStatus, TimeoutType, WaitingReason
from opscore.protocol.limits import MAX_REASON_LENGTH


def session_filter(req: session_pb2.ListSessionsRequest) -> SessionFilter:
    v = RequestViolations()
    for i, status in enumerate(req.statuses):
        v.enum(f"statuses[{i}]", status, set(SessionStatus) - {SessionStatus.UNSPECIFIED})
    v.identifier("workflow_definition_id", req.workflow_definition_id, required=False)
    v.identifier("agent_id", req.agent_id, required=False)
    v.raise_if_any()
    return SessionFilter(
        statuses=frozenset(SessionStatus(s) for s in req.statuses),
        workflow_definition_id=req.workflow_definition_id,
        agent_id=req.agent_id,
    )


def cancel_request(req: session_pb2.CancelSessionRequest) -> tuple[str, str]:
    """(session_id, reason) of a cancellation."""
    v = RequestViolations()
    v.identifier("session_id", req.session_id)
    v.text("reason", req.reason, max_len=MAX_REASON_LENGTH)
    v.raise_if_any()
    return req.session_id, req.reason or "cancelled"


def watch_request(req: session_pb2.WatchSessionRequest) -> tuple[str, int]:
    """(session_id, since_sequence) of a session watch."""
    v = RequestViolations()
    v.identifier("session_id", req.session_id)
    if req.since_sequence < 0:
        v.add("since_sequence", "must not be negative")
    v.raise_if_any()
    return req.session_id, req.since_sequence


def session_to_proto(
    session: Session, waiting: Mapping[str, tuple[WaitingReason, str]]
) -> session_pb2.Session:
    """`waiting`: why each task waits (`WorkflowEngine.waiting`)."""
    msg = session_pb2.Session(
        session_id=session.session_id,
        workflow_definition_id=session.definition.id,
        workflow_definition_version=session.definition.version,
        agent_id=session.agent_id,
        status=session.status.value,  # type: ignore[arg-type]
        error=session.error,
    )
    dict_to_struct(session.input, msg.input)
    if session.output is not None:
        dict_to_struct(session.output, msg.output)
    for task in session.tasks.values():
        t = msg.tasks.add(
            task_id=task.spec.task_id,
            name=task.spec.name,
            agent_capability=task.spec.agent_capability,
            status=task.status.value,
            attempt=task.attempt,
            agent_id=task.agent_id,
            error=task.error,
            max_attempts=task.spec.retry_policy.max_attempts,
        )
        reason, message = waiting.get(task.spec.task_id, (WaitingReason.UNSPECIFIED, ""))
        t.waiting_reason = reason.value  # type: ignore[assignment]
        t.waiting_message = message
        if task.output is not None:
            dict_to_struct(task.output, t.output)
        set_time(t.updated_at, task.updated_at)
        set_time(t.ready_at, task.ready_at)
    set_time(msg.created_at, session.created_at)
    set_time(msg.updated_at, session.updated_at)
    set_time(msg.ended_at, session.ended_at)
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
    timeout = str(event.detail.get("timeout_type", ""))
    if event.type is SessionEventType.TASK_TIMED_OUT and timeout in TimeoutType.__members__:
        msg.timeout_type = TimeoutType[timeout].value  # type: ignore[assignment]
    set_time(msg.occurred_at, event.occurred_at)
    return msg
