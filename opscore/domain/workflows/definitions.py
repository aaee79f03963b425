"""Workflow definitions: the task graph, its validation, and retry timing.

Validation reports every problem at once, each with the path of the field at fault
(`definition.tasks[2].next_task_id`), so an operator fixes a file in one round.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from opscore.protocol.limits import (
    DEFAULT_TASK_TIMEOUT_SECONDS,
    MAX_ATTEMPTS,
    MAX_BACKOFF_COEFFICIENT,
    MAX_CAPABILITY_LENGTH,
    MAX_DESCRIPTION_LENGTH,
    MAX_DURATION_SECONDS,
    MAX_NAME_LENGTH,
    MAX_VERSION_LENGTH,
    RETRY_JITTER,
    RequestLimits,
)
from opscore.protocol.validation import Violations


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    initial_interval: float = 1.0
    backoff_coefficient: float = 2.0
    maximum_interval: float = 100.0

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the `failures`-th failed attempt (1-based)."""
        base = self.initial_interval * self.backoff_coefficient ** max(0, failures - 1)
        capped = min(base, self.maximum_interval)
        return capped * (1 - RETRY_JITTER * (rng or random).random())


@dataclass(frozen=True)
class TaskTimeouts:
    """Time limits in seconds as written (None: not set here)."""

    start_to_close: float | None = None
    heartbeat: float | None = None
    schedule_to_start: float | None = None

    def over(self, defaults: TaskTimeouts) -> TaskTimeouts:
        """These limits, with the unset ones taken from `defaults`."""
        return TaskTimeouts(
            *(
                mine if mine is not None else default
                for mine, default in zip(self.items(), defaults.items(), strict=True)
            )
        )

    def items(self) -> tuple[float | None, float | None, float | None]:
        return self.start_to_close, self.heartbeat, self.schedule_to_start


@dataclass(frozen=True)
class TaskDefinition:
    task_id: str
    name: str
    agent_capability: str
    parameters: dict[str, Any] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()
    retry_policy: RetryPolicy = RetryPolicy()
    # The heartbeat timeout (lease) and the other limits, resolved against the
    # workflow's task_timeouts (see `resolve_timeouts`).
    timeout: float = DEFAULT_TASK_TIMEOUT_SECONDS
    start_to_close: float | None = None
    schedule_to_start: float | None = None
    # Kept only to show the definition back as it was written.
    next_task_id: str = ""

    def lease_end(self, now: datetime, attempt_deadline: datetime | None) -> datetime:
        """Where a lease granted or extended at `now` ends: one heartbeat timeout on,
        never past the attempt's start_to_close deadline."""
        end = now + timedelta(seconds=self.timeout)
        return end if attempt_deadline is None else min(end, attempt_deadline)


def resolve_timeouts(
    written: TaskTimeouts, defaults: TaskTimeouts
) -> tuple[float, float | None, float | None]:
    """A task's (heartbeat timeout, start_to_close, schedule_to_start): its own, else
    the workflow's, else the server's (a 60s heartbeat timeout, no other limit)."""
    limits = written.over(defaults)
    heartbeat = DEFAULT_TASK_TIMEOUT_SECONDS if limits.heartbeat is None else limits.heartbeat
    return heartbeat, limits.start_to_close, limits.schedule_to_start


@dataclass(frozen=True)
class WorkflowDefinition:
    id: str
    name: str
    description: str
    version: str
    tasks: tuple[TaskDefinition, ...]
    created_at: datetime | None = None
    # Defaults for every task's limits, as written (already applied to the tasks).
    task_timeouts: TaskTimeouts = TaskTimeouts()

    def dependencies(self) -> dict[str, set[str]]:
        """Each task's prerequisites: its depends_on plus every task whose
        next_task_id names it."""
        deps: dict[str, set[str]] = {t.task_id: set(t.depends_on) for t in self.tasks}
        for t in self.tasks:
            if t.next_task_id in deps:
                deps[t.next_task_id].add(t.task_id)
        return deps

    def final_tasks(self) -> list[str]:
        """Tasks nothing depends on: their outputs are the session's output."""
        needed = {d for deps in self.dependencies().values() for d in deps}
        return [t.task_id for t in self.tasks if t.task_id not in needed]


def validate(
    defn: WorkflowDefinition,
    prefix: str = "definition",
    max_tasks: int = RequestLimits.max_tasks_per_definition,
) -> None:
    """Raises InvalidArgumentError listing every problem of the definition."""
    v = Violations(prefix)
    v.identifier("id", defn.id)
    v.text("name", defn.name, max_len=MAX_NAME_LENGTH)
    v.text("description", defn.description, max_len=MAX_DESCRIPTION_LENGTH)
    v.text("version", defn.version, max_len=MAX_VERSION_LENGTH)
    if not defn.tasks:
        v.add("tasks", "a workflow needs at least one task")
    if len(defn.tasks) > max_tasks:
        v.add("tasks", f"at most {max_tasks} tasks")
    for name, value in zip(
        ("start_to_close", "heartbeat", "schedule_to_start"),
        defn.task_timeouts.items(),
        strict=True,
    ):
        _check_timeout(v, f"task_timeouts.{name}", value)

    index: dict[str, int] = {}
    for i, task in enumerate(defn.tasks):
        where = f"tasks[{i}]"
        v.identifier(f"{where}.task_id", task.task_id)
        if task.task_id in index:
            v.add(f"{where}.task_id", f"duplicate task id (first at tasks[{index[task.task_id]}])")
        else:
            index[task.task_id] = i
        if not task.agent_capability.strip():
            v.add(f"{where}.agent_capability", "is required")
        else:
            v.text(
                f"{where}.agent_capability", task.agent_capability, max_len=MAX_CAPABILITY_LENGTH
            )
        v.text(f"{where}.name", task.name, max_len=MAX_NAME_LENGTH)
        _check_timeout(v, f"{where}.timeout", task.timeout)
        _check_timeout(v, f"{where}.timeouts.start_to_close", task.start_to_close)
        _check_timeout(v, f"{where}.timeouts.schedule_to_start", task.schedule_to_start)
        _check_retry(v, f"{where}.retry_policy", task.retry_policy)

    for i, task in enumerate(defn.tasks):
        where = f"tasks[{i}]"
        if task.next_task_id:
            if task.next_task_id not in index:
                v.add(f"{where}.next_task_id", f"no task {task.next_task_id!r} here")
            elif task.next_task_id == task.task_id:
                v.add(f"{where}.next_task_id", "a task cannot follow itself")
        seen: set[str] = set()
        for j, dep in enumerate(task.depends_on):
            if dep not in index:
                v.add(f"{where}.depends_on[{j}]", f"no task {dep!r} here")
            elif dep == task.task_id:
                v.add(f"{where}.depends_on[{j}]", "a task cannot depend on itself")
            elif dep in seen:
                v.add(f"{where}.depends_on[{j}]", f"duplicate dependency {dep!r}")
            seen.add(dep)

    v.raise_if_any()
    cycle = _find_cycle(defn)
    if cycle:
        v.add(f"tasks[{index[cycle[0]]}]", "tasks form a cycle: " + " -> ".join([*cycle, cycle[0]]))
    v.raise_if_any()


def _check_timeout(v: Violations, path: str, seconds: float | None) -> None:
    if seconds is not None and not 0 < seconds <= MAX_DURATION_SECONDS:
        v.add(path, f"must be more than 0s and at most {MAX_DURATION_SECONDS}s")


def _check_retry(v: Violations, path: str, policy: RetryPolicy) -> None:
    if not 1 <= policy.max_attempts <= MAX_ATTEMPTS:
        v.add(f"{path}.max_attempts", f"must be between 1 and {MAX_ATTEMPTS}")
    if not 0 < policy.initial_interval <= MAX_DURATION_SECONDS:
        v.add(f"{path}.initial_interval", "must be more than 0s and at most 7 days")
    if not 1.0 <= policy.backoff_coefficient <= MAX_BACKOFF_COEFFICIENT:
        v.add(f"{path}.backoff_coefficient", f"must be between 1 and {MAX_BACKOFF_COEFFICIENT:g}")
    if not policy.initial_interval <= policy.maximum_interval <= MAX_DURATION_SECONDS:
        v.add(f"{path}.maximum_interval", "must be at least initial_interval and at most 7 days")


def _find_cycle(defn: WorkflowDefinition) -> list[str]:
    """One cycle of task ids in the dependency graph, or [] if it is acyclic."""
    deps = defn.dependencies()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for dep in sorted(deps[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return []

    for task in defn.tasks:
        if task.task_id not in state and (found := visit(task.task_id)):
            return list(reversed(found))
    return []
