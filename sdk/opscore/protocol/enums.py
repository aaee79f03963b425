"""Python enums that mirror the protobuf enums number for number (tested), and the
sets of values that rules refer to."""

from __future__ import annotations

import enum


class AgentState(enum.IntEnum):
    """Mirrors `opspawn.opscore.v1.AgentState`."""

    UNSPECIFIED = 0
    INITIALIZING = 1
    IDLE = 2
    BUSY = 3
    ERROR = 4
    DRAINING = 5
    OFFLINE = 6


# States an agent may report about itself; OFFLINE is decided by the server.
REPORTABLE_STATES = frozenset(AgentState) - {AgentState.UNSPECIFIED, AgentState.OFFLINE}


class AgentEventType(enum.IntEnum):
    """Mirrors `opspawn.opscore.v1.AgentEventType`."""

    UNSPECIFIED = 0
    REGISTERED = 1
    STATE_CHANGED = 2
    DEREGISTERED = 3
    OFFLINE = 4
    SNAPSHOT = 5
    SYNCED = 6


class SessionStatus(enum.IntEnum):
    """Mirrors `opspawn.opscore.v1.SessionStatus`."""

    UNSPECIFIED = 0
    PENDING = 1
    RUNNING = 2
    COMPLETED = 3
    FAILED = 4
    CANCELLED = 5


FINISHED = frozenset({SessionStatus.COMPLETED, SessionStatus.FAILED, SessionStatus.CANCELLED})


class TaskStatus(enum.IntEnum):
    """Mirrors `opspawn.opscore.v1.TaskStatus`."""

    UNSPECIFIED = 0
    PENDING = 1
    DISPATCHED = 2
    RUNNING = 3
    COMPLETED = 4
    FAILED = 5
    RETRY_WAIT = 6
    CANCELLED = 7


# A task holds a lease (an agent is working on it) in these states.
LEASED = frozenset({TaskStatus.DISPATCHED, TaskStatus.RUNNING})


class SessionEventType(enum.IntEnum):
    """Mirrors `opspawn.opscore.v1.SessionEventType`."""

    UNSPECIFIED = 0
    CREATED = 1
    TASK_QUEUED = 2
    TASK_DISPATCHED = 3
    TASK_HEARTBEAT = 4
    TASK_COMPLETED = 5
    TASK_FAILED = 6
    TASK_RETRY_SCHEDULED = 7
    TASK_LEASE_EXPIRED = 8
    TASK_CANCELLED = 9
    SESSION_CANCELLED = 10
    SESSION_COMPLETED = 11
    SESSION_FAILED = 12
    TASK_TIMED_OUT = 13
    TASK_ANSWER_REFUSED = 14


class TimeoutType(enum.IntEnum):
    """Mirrors `opspawn.opscore.v1.TimeoutType`."""

    UNSPECIFIED = 0
    START_TO_CLOSE = 1
    HEARTBEAT = 2
    SCHEDULE_TO_START = 3


class WaitingReason(enum.IntEnum):
    """Mirrors `opspawn.opscore.v1.WaitingReason`."""

    UNSPECIFIED = 0
    DEPENDENCIES = 1
    NO_CAPABLE_AGENT = 2
    AGENTS_BUSY = 3
    BACKOFF = 4
    DISPATCHING = 5


# The last event of every session: a watch ends after it.
TERMINAL_EVENTS = frozenset(
    {
        SessionEventType.SESSION_COMPLETED,
        SessionEventType.SESSION_FAILED,
        SessionEventType.SESSION_CANCELLED,
    }
)
