"""What the SDK returns: small frozen dataclasses with plain Python values.

Timestamps are aware UTC datetimes, Struct fields are dicts, and enums are the
domain's own (`AgentState`, `SessionStatus`, ...), which mirror the proto numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from opscore.protocol.enums import (
    FINISHED,
    TERMINAL_EVENTS,
    AgentEventType,
    AgentState,
    SessionEventType,
    SessionStatus,
    TaskStatus,
    TimeoutType,
    WaitingReason,
)
from opscore.protocol.values import JsonObject


@dataclass(frozen=True)
class Agent:
    """An agent as the registry knows it."""

    agent_id: str
    name: str
    version: str
    capabilities: tuple[str, ...]
    contact_endpoint: str
    metadata: dict[str, str]
    state: AgentState
    state_details: JsonObject
    registered_at: datetime
    state_updated_at: datetime
    last_heartbeat_at: datetime
    state_observed_at: datetime | None
    revision: int
    # What the server sees now: an open task stream, its free slots, and the server
    # time of the agent's last contact (a call, or its stream while that is open).
    connected: bool = False
    free_slots: int = 0
    last_contact_at: datetime | None = None
    # Set only by the call that issued it (first registration, token rotation) when
    # the server has authentication on; keep it, it is never shown again.
    agent_token: str = field(default="", repr=False)


@dataclass(frozen=True)
class AgentEvent:
    """One change seen by `watch_agents`; `agent` is None only for SYNCED."""

    revision: int
    type: AgentEventType
    agent: Agent | None
    occurred_at: datetime


@dataclass(frozen=True)
class AgentHeartbeat:
    """The answer to an agent heartbeat: send the next one within `liveness_timeout`."""

    state: AgentState
    liveness_timeout: float
    server_time: datetime


@dataclass(frozen=True)
class WorkflowTask:
    """One step of a stored workflow definition."""

    task_id: str
    name: str
    agent_capability: str
    parameters: JsonObject
    depends_on: tuple[str, ...]
    next_task_id: str
    timeout: float


@dataclass(frozen=True)
class WorkflowDefinition:
    """A stored workflow definition (retry policies are left in the proto)."""

    id: str
    name: str
    description: str
    version: str
    tasks: tuple[WorkflowTask, ...]
    created_at: datetime | None


@dataclass(frozen=True)
class SessionTask:
    """One task of a session."""

    task_id: str
    name: str
    agent_capability: str
    status: TaskStatus
    attempt: int
    agent_id: str
    output: JsonObject | None
    error: str
    updated_at: datetime | None
    # Why a PENDING or RETRY_WAIT task waits (UNSPECIFIED otherwise), and when it
    # became (or, after a retry backoff, becomes) ready.
    waiting_reason: WaitingReason = WaitingReason.UNSPECIFIED
    waiting_message: str = ""
    ready_at: datetime | None = None
    max_attempts: int = 0


@dataclass(frozen=True)
class Session:
    """A session: one run of a workflow."""

    session_id: str
    workflow_definition_id: str
    workflow_definition_version: str
    agent_id: str
    status: SessionStatus
    input: JsonObject
    output: JsonObject | None
    error: str
    tasks: tuple[SessionTask, ...]
    created_at: datetime | None
    updated_at: datetime | None
    ended_at: datetime | None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def task(self, task_id: str) -> SessionTask:
        """The task named `task_id`; KeyError if the session has none."""
        for task in self.tasks:
            if task.task_id == task_id:
                return task
        raise KeyError(task_id)


@dataclass(frozen=True)
class SessionEvent:
    """One entry of a run's history."""

    session_id: str
    sequence: int
    type: SessionEventType
    task_id: str
    attempt: int
    agent_id: str
    detail: JsonObject
    occurred_at: datetime
    # For TASK_TIMED_OUT: which time limit ran out.
    timeout_type: TimeoutType = TimeoutType.UNSPECIFIED

    @property
    def terminal(self) -> bool:
        """True for the last event of a run (completed, failed or cancelled)."""
        return self.type in TERMINAL_EVENTS


@dataclass(frozen=True)
class TaskAssignment:
    """One task attempt pushed to an agent by `stream_tasks`."""

    task_token: str
    task_id: str
    session_id: str
    workflow_id: str
    name: str
    agent_capability: str
    payload: JsonObject
    attempt: int
    deadline: datetime
    # Seconds each heartbeat extends the lease by (0 from servers that don't say).
    lease: float = 0.0
    # The start_to_close limit: its end (server time) and its length in seconds;
    # None when the task has none.
    attempt_deadline: datetime | None = None
    start_to_close: float | None = None
    # Attempts the retry policy allows in all (0 from servers that don't say).
    max_attempts: int = 0

    @property
    def parameters(self) -> JsonObject:
        return dict(self.payload.get("parameters") or {})

    @property
    def input(self) -> JsonObject:
        return dict(self.payload.get("input") or {})

    @property
    def upstream(self) -> JsonObject:
        """Outputs of the tasks this one depends on, by task_id."""
        return dict(self.payload.get("upstream") or {})


@dataclass(frozen=True)
class TaskHeartbeat:
    """The answer to a task heartbeat: stop when `cancel_requested`."""

    cancel_requested: bool
    deadline: datetime | None
