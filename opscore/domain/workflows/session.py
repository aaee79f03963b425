"""A session (one run of a workflow) as one aggregate: its tasks and the rules that
move them. Pure code, no I/O: the store loads a Session inside a write transaction,
a method changes it and records the events, the store writes it back."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from opscore.domain.workflows.definitions import TaskDefinition, WorkflowDefinition
from opscore.protocol.enums import (
    FINISHED,
    LEASED,
    SessionEventType,
    SessionStatus,
    TaskStatus,
    TimeoutType,
    WaitingReason,
)
from opscore.protocol.errors import (
    AttemptEndedError,
    InvalidStateError,
    PermissionDeniedError,
    TaskDispatchError,
)
from opscore.protocol.values import JsonObject


class TaskKey(NamedTuple):
    """One attempt of one task: what a task token stands for."""

    session_id: str
    task_id: str
    attempt: int


# A task waits for an agent in these states (once its ready_at has come).
WAITING = frozenset({TaskStatus.PENDING, TaskStatus.RETRY_WAIT})
# Why a ready task waits: (capability, pinned agent) -> reason and message.
Explain = Callable[[str, str], tuple[WaitingReason, str]]


@dataclass(frozen=True)
class SessionEvent:
    session_id: str
    sequence: int
    type: SessionEventType
    task_id: str
    attempt: int
    agent_id: str
    detail: JsonObject
    occurred_at: datetime


@dataclass
class SessionTask:
    spec: TaskDefinition
    status: TaskStatus = TaskStatus.PENDING
    attempt: int = 0
    failures: int = 0
    agent_id: str = ""
    output: JsonObject | None = None
    error: str = ""
    # How the current attempt ended ("completed", "failed", ...); "" while it runs.
    ended_by: str = ""
    ready_at: datetime | None = None
    lease_expires_at: datetime | None = None
    updated_at: datetime | None = None
    # The end of the current attempt's start_to_close limit, and of a ready task's
    # schedule_to_start limit.
    attempt_deadline: datetime | None = None
    wait_deadline: datetime | None = None

    def waiting_at(self, now: datetime) -> tuple[WaitingReason, str] | None:
        """Why the task waits, when the task alone can tell: UNSPECIFIED when it does
        not wait; None when it is ready, so only the live agents can say."""
        if self.status not in WAITING:
            return WaitingReason.UNSPECIFIED, ""
        if self.ready_at is None:
            return WaitingReason.DEPENDENCIES, "waiting for the tasks it depends on"
        if self.ready_at > now:
            return WaitingReason.BACKOFF, f"retry backoff until {self.ready_at.isoformat()}"
        return None


@dataclass(frozen=True)
class Assignment:
    """A task attempt handed to an agent."""

    key: TaskKey
    agent_id: str
    workflow_id: str
    name: str
    agent_capability: str
    payload: JsonObject
    deadline: datetime
    # Seconds each HeartbeatTask extends the lease by (the task's timeout).
    lease: float
    # The start_to_close limit's end and length (None: no limit).
    attempt_deadline: datetime | None
    start_to_close: float | None
    max_attempts: int


@dataclass(frozen=True)
class SessionFilter:
    """Which sessions a list covers; empty fields match everything."""

    statuses: frozenset[SessionStatus] = frozenset()
    workflow_definition_id: str = ""
    agent_id: str = ""


@dataclass
class Session:
    """One run of a workflow definition, with its tasks."""

    session_id: str
    definition: WorkflowDefinition
    agent_id: str
    input: JsonObject
    request_id: str
    created_at: datetime
    status: SessionStatus = SessionStatus.PENDING
    output: JsonObject | None = None
    error: str = ""
    updated_at: datetime | None = None
    ended_at: datetime | None = None
    last_sequence: int = 0
    tasks: dict[str, SessionTask] = field(default_factory=dict)
    # What the current transaction changed (not stored).
    new_events: list[SessionEvent] = field(default_factory=list)
    changed_tasks: set[str] = field(default_factory=set)
    released: list[TaskKey] = field(default_factory=list)
    became_ready: bool = False
    # An answer this transaction refused; raised once the transaction (which may
    # record a timeout and the refusal) has committed.
    refusal: AttemptEndedError | None = None

    # -- creation ----------------------------------------------------------------

    @classmethod
    def start(
        cls,
        session_id: str,
        definition: WorkflowDefinition,
        input: JsonObject,
        agent_id: str,
        request_id: str,
        now: datetime,
    ) -> Session:
        session = cls(session_id, definition, agent_id, input, request_id, now, updated_at=now)
        session.tasks = {t.task_id: SessionTask(spec=t, updated_at=now) for t in definition.tasks}
        session.changed_tasks = set(session.tasks)
        session._record(SessionEventType.CREATED, now, workflow_definition_id=definition.id)
        deps = definition.dependencies()
        for task_id, task in session.tasks.items():
            if not deps[task_id]:
                session._queue(task, now)
        return session

    def ready_by_capability(self) -> dict[str, str]:
        """One ready task per capability (the first in definition order)."""
        ready: dict[str, str] = {}
        for task_id, task in self.tasks.items():
            if task.status is TaskStatus.PENDING and task.ready_at is not None:
                ready.setdefault(task.spec.agent_capability, task_id)
        return ready

    # -- what agents report ------------------------------------------------------

    def dispatch(self, task_id: str, agent_id: str, now: datetime) -> Assignment:
        task = self.tasks[task_id]
        if task.status not in (TaskStatus.PENDING, TaskStatus.RETRY_WAIT) or task.ready_at is None:
            raise InvalidStateError(f"task {task_id} is not ready")
        task.attempt += 1
        task.status = TaskStatus.DISPATCHED
        task.agent_id = agent_id
        task.ended_by = ""
        task.ready_at = None
        task.wait_deadline = None
        limit = task.spec.start_to_close
        task.attempt_deadline = None if limit is None else now + timedelta(seconds=limit)
        task.lease_expires_at = task.spec.lease_end(now, task.attempt_deadline)
        self._touch(task, now)
        if self.status is SessionStatus.PENDING:
            self.status = SessionStatus.RUNNING
        self._record(SessionEventType.TASK_DISPATCHED, now, task)
        deps = self.definition.dependencies()[task_id]
        payload: JsonObject = {
            "parameters": task.spec.parameters,
            "input": self.input,
            "upstream": {d: self.tasks[d].output or {} for d in sorted(deps)},
        }
        return Assignment(
            key=TaskKey(self.session_id, task_id, task.attempt),
            agent_id=agent_id,
            workflow_id=self.definition.id,
            name=task.spec.name,
            agent_capability=task.spec.agent_capability,
            payload=payload,
            deadline=task.lease_expires_at,
            lease=task.spec.timeout,
            attempt_deadline=task.attempt_deadline,
            start_to_close=limit,
            max_attempts=task.spec.retry_policy.max_attempts,
        )

    def complete(
        self, key: TaskKey, output: JsonObject, now: datetime, rng: random.Random | None = None
    ) -> None:
        """Records success; a repeated completion of the same attempt is a no-op, and an
        answer after the attempt's time ran out is refused (see `refusal`)."""
        task = self._answered_task(key, "completed", now, rng)
        if task is None:
            return
        task.status = TaskStatus.COMPLETED
        task.output = output
        task.error = ""
        self._end_attempt(task, "completed", now)
        self._record(SessionEventType.TASK_COMPLETED, now, task)
        deps = self.definition.dependencies()
        for other_id, other in self.tasks.items():
            if (
                other.status is TaskStatus.PENDING
                and other.ready_at is None
                and task.spec.task_id in deps[other_id]
                and all(self.tasks[d].status is TaskStatus.COMPLETED for d in deps[other_id])
            ):
                self._queue(other, now)
        if all(t.status is TaskStatus.COMPLETED for t in self.tasks.values()):
            self.output = {t: self.tasks[t].output or {} for t in self.definition.final_tasks()}
            self._finish(SessionStatus.COMPLETED, now)
            self._record(SessionEventType.SESSION_COMPLETED, now)

    def fail(
        self,
        key: TaskKey,
        message: str,
        retryable: bool,
        now: datetime,
        rng: random.Random | None = None,
    ) -> None:
        """Records a failure: retried per the retry policy unless not retryable or out
        of attempts, which fails the session. Repeating the same failure is a no-op."""
        task = self._answered_task(key, "failed", now, rng)
        if task is None:
            return
        self._end_attempt(task, "failed", now)
        self._record(SessionEventType.TASK_FAILED, now, task, error=message, retryable=retryable)
        self._after_failure(task, message, retryable, now, rng)

    def heartbeat(
        self, key: TaskKey, now: datetime, rng: random.Random | None = None
    ) -> tuple[bool, datetime | None]:
        """Extends the lease (never past the start_to_close deadline); returns
        (cancel_requested, new deadline). A heartbeat after the lease ran out is
        refused (see `refusal`), not recorded."""
        task = self._task_of(key)
        if task.attempt == key.attempt and task.status is TaskStatus.CANCELLED:
            return True, None
        if task.attempt == key.attempt:
            self._time_out_if_due(task, now, rng)
        if task.attempt != key.attempt or task.status not in LEASED:
            self.refusal = self._stale(task, key)
            return False, None
        task.status = TaskStatus.RUNNING
        task.lease_expires_at = task.spec.lease_end(now, task.attempt_deadline)
        self._touch(task, now)
        self._record(
            SessionEventType.TASK_HEARTBEAT, now, task, deadline=task.lease_expires_at.isoformat()
        )
        return False, task.lease_expires_at

    # -- what the server decides -------------------------------------------------

    def time_out(self, task_id: str, now: datetime, rng: random.Random | None = None) -> None:
        """The scheduler's check: ends the task's attempt, or its wait for one, when a
        time limit has run out (a no-op otherwise)."""
        self._time_out_if_due(self.tasks[task_id], now, rng)

    def requeue(self, task_id: str, attempt: int, reason: str, now: datetime) -> None:
        """Puts a leased attempt back in the queue at once because its agent was lost;
        that counts as a failed attempt."""
        task = self.tasks[task_id]
        if task.attempt != attempt or task.status not in LEASED:
            return
        self._end_attempt(task, "requeued", now)
        task.failures += 1
        task.error = reason
        if task.failures >= task.spec.retry_policy.max_attempts:
            self._fail_session(task, f"{reason}; no attempts left", now)
            return
        self._queue(task, now, reason=reason)

    def undeliver(
        self,
        task_id: str,
        attempt: int,
        reason: str,
        now: datetime,
        rng: random.Random | None = None,
    ) -> None:
        """Takes back an attempt that never reached its agent (the stream closed first,
        or the reconnecting agent does not hold it): the task is ready again under the
        same attempt number, so attempts count only what agents received. An attempt
        whose lease has already run out times out instead."""
        task = self.tasks[task_id]
        if task.attempt != attempt:
            return
        self._time_out_if_due(task, now, rng)
        if task.status not in LEASED:
            return
        self._end_attempt(task, "", now)
        task.attempt -= 1
        self._queue(task, now, reason=reason)

    def cancel(self, reason: str, now: datetime) -> None:
        if self.status in FINISHED:
            raise InvalidStateError(
                f"session {self.session_id} already ended ({self.status.name}); nothing to cancel"
            )
        self._cancel_open_tasks(now)
        self.error = reason
        self._finish(SessionStatus.CANCELLED, now)
        self._record(SessionEventType.SESSION_CANCELLED, now, reason=reason)

    # -- helpers -----------------------------------------------------------------

    def _time_out_if_due(self, task: SessionTask, now: datetime, rng: random.Random | None) -> None:
        if task.status in LEASED and task.lease_expires_at and task.lease_expires_at <= now:
            if task.attempt_deadline is not None and task.lease_expires_at >= task.attempt_deadline:
                kind, limit = TimeoutType.START_TO_CLOSE, task.spec.start_to_close
            else:
                kind, limit = TimeoutType.HEARTBEAT, task.spec.timeout
            self._end_attempt(task, f"timed out ({kind.name})", now)
        elif task.status in WAITING and task.wait_deadline and task.wait_deadline <= now:
            kind, limit = TimeoutType.SCHEDULE_TO_START, task.spec.schedule_to_start
            task.wait_deadline = None
            task.ready_at = None
        else:
            return
        message = f"{kind.name.lower()} timeout of {limit:g}s reached"
        self._record(
            SessionEventType.TASK_TIMED_OUT, now, task, timeout_type=kind.name, error=message
        )
        self._after_failure(task, message, True, now, rng)

    def _after_failure(
        self,
        task: SessionTask,
        message: str,
        retryable: bool,
        now: datetime,
        rng: random.Random | None,
    ) -> None:
        task.failures += 1
        task.error = message
        policy = task.spec.retry_policy
        if retryable and task.failures < policy.max_attempts:
            delay = policy.delay(task.failures, rng)
            task.status = TaskStatus.RETRY_WAIT
            task.ready_at = now + timedelta(seconds=delay)
            task.wait_deadline = self._wait_deadline(task, task.ready_at)
            self._touch(task, now)
            self._record(
                SessionEventType.TASK_RETRY_SCHEDULED,
                now,
                task,
                delay_seconds=round(delay, 6),
                next_attempt=task.attempt + 1,
            )
        else:
            self._fail_session(task, message, now)

    def _fail_session(self, task: SessionTask, message: str, now: datetime) -> None:
        task.status = TaskStatus.FAILED
        task.ready_at = None
        task.wait_deadline = None
        self._touch(task, now)
        self._cancel_open_tasks(now)
        self.error = f"task {task.spec.task_id} failed: {message}"
        self._finish(SessionStatus.FAILED, now)
        self._record(SessionEventType.SESSION_FAILED, now, task, error=self.error)

    def _cancel_open_tasks(self, now: datetime) -> None:
        for task in self.tasks.values():
            if task.status in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED):
                continue
            if task.status in LEASED:
                self.released.append(TaskKey(self.session_id, task.spec.task_id, task.attempt))
            task.status = TaskStatus.CANCELLED
            task.ready_at = None
            task.lease_expires_at = None
            task.wait_deadline = None
            task.ended_by = "cancelled"
            self._touch(task, now)
            self._record(SessionEventType.TASK_CANCELLED, now, task)

    def _finish(self, status: SessionStatus, now: datetime) -> None:
        self.status = status
        self.ended_at = now
        self.updated_at = now

    def note_waiting(self, explain: Explain) -> None:
        """Adds to each TASK_QUEUED event of this transaction why the task may wait,
        as the live agents show it at commit (the watch shows it; GetSession says it
        again from the live view when asked)."""
        for event in self.new_events:
            task = self.tasks.get(event.task_id)
            if event.type is SessionEventType.TASK_QUEUED and task and task.status in WAITING:
                reason, message = explain(task.spec.agent_capability, self.agent_id)
                event.detail.update(waiting_reason=reason.name, waiting_message=message)

    def _queue(self, task: SessionTask, now: datetime, **detail: Any) -> None:
        task.status = TaskStatus.PENDING
        task.ready_at = now
        task.wait_deadline = self._wait_deadline(task, now)
        self._touch(task, now)
        self.became_ready = True
        self._record(SessionEventType.TASK_QUEUED, now, task, **detail)

    @staticmethod
    def _wait_deadline(task: SessionTask, ready_at: datetime) -> datetime | None:
        limit = task.spec.schedule_to_start
        return None if limit is None else ready_at + timedelta(seconds=limit)

    def _end_attempt(self, task: SessionTask, how: str, now: datetime) -> None:
        self.released.append(TaskKey(self.session_id, task.spec.task_id, task.attempt))
        task.ended_by = how
        task.lease_expires_at = None
        task.attempt_deadline = None
        self._touch(task, now)

    def check_owner(self, key: TaskKey, caller: str) -> None:
        """An agent (when named) may answer only attempts dispatched to it."""
        task = self._task_of(key)
        if caller and task.agent_id != caller:
            raise PermissionDeniedError(
                f"task {key.task_id} of session {key.session_id} was not given to {caller}",
                session_id=key.session_id,
            )

    def _task_of(self, key: TaskKey) -> SessionTask:
        task = self.tasks.get(key.task_id)
        if task is None:
            raise TaskDispatchError(f"session {self.session_id} has no task {key.task_id!r}")
        return task

    def _answered_task(
        self, key: TaskKey, answer: str, now: datetime, rng: random.Random | None
    ) -> SessionTask | None:
        """The task if this attempt is live. None if it already ended the same way (a
        repeated answer), or if the answer is refused: the attempt was superseded,
        ended otherwise, or its time ran out just now; the refusal is kept in `refusal`
        and recorded in the history unless the session has ended."""
        task = self._task_of(key)
        if task.attempt == key.attempt:
            self._time_out_if_due(task, now, rng)
            if task.status in LEASED:
                return task
            if task.ended_by == answer:
                return None
        self.refusal = self._stale(task, key)
        if self.status in FINISHED:
            return None  # the terminal event stays the last one
        self._record(
            SessionEventType.TASK_ANSWER_REFUSED,
            now,
            task,
            attempt=key.attempt,
            answer=answer,
            error=str(self.refusal),
        )
        return None

    @staticmethod
    def _stale(task: SessionTask, key: TaskKey) -> AttemptEndedError:
        if task.attempt != key.attempt:
            why = f"attempt {key.attempt} was superseded by attempt {task.attempt}"
        else:
            why = f"attempt {key.attempt} already ended ({task.ended_by or task.status.name})"
        return AttemptEndedError(
            f"task {key.task_id} of session {key.session_id}: {why}",
            session_id=key.session_id,
            task_id=key.task_id,
        )

    def _touch(self, task: SessionTask, now: datetime) -> None:
        task.updated_at = now
        self.updated_at = now
        self.changed_tasks.add(task.spec.task_id)

    def _record(
        self,
        type: SessionEventType,
        now: datetime,
        task: SessionTask | None = None,
        attempt: int | None = None,
        **detail: Any,
    ) -> None:
        self.last_sequence += 1
        self.new_events.append(
            SessionEvent(
                session_id=self.session_id,
                sequence=self.last_sequence,
                type=type,
                task_id=task.spec.task_id if task else "",
                attempt=attempt if attempt is not None else task.attempt if task else 0,
                agent_id=task.agent_id if task else "",
                detail=detail,
                occurred_at=now,
            )
        )
