"""Workflow definitions: the task graph, its validation, and retry timing.

Validation reports every problem at once, each with the path of the field at fault
(`definition.tasks[2].next_task_id`), so an operator fixes a file in one round.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from opscore.errors import FieldViolation, InvalidArgumentError
from opscore.models import ID_PATTERN, MAX_ID_LENGTH

MAX_TASKS = 1000
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600
MAX_ATTEMPTS = 100
DEFAULT_TIMEOUT_SECONDS = 60.0
# Retry delays are multiplied by a random factor in [1 - JITTER, 1].
JITTER = 0.2


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
        return capped * (1 - JITTER * (rng or random).random())


@dataclass(frozen=True)
class TaskDefinition:
    task_id: str
    name: str
    agent_capability: str
    parameters: dict[str, Any] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()
    retry_policy: RetryPolicy = RetryPolicy()
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    # Kept only to show the definition back as it was written.
    next_task_id: str = ""


@dataclass(frozen=True)
class WorkflowDefinition:
    id: str
    name: str
    description: str
    version: str
    tasks: tuple[TaskDefinition, ...]
    created_at: datetime | None = None

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
    defn: WorkflowDefinition, prefix: str = "definition", max_tasks: int = MAX_TASKS
) -> None:
    """Raises InvalidArgumentError listing every problem of the definition."""
    problems: list[FieldViolation] = []

    def bad(path: str, description: str) -> None:
        problems.append(FieldViolation(f"{prefix}.{path}" if prefix else path, description))

    _check_id(bad, "id", defn.id)
    if len(defn.name) > 256:
        bad("name", "must be at most 256 characters")
    if len(defn.description) > 4096:
        bad("description", "must be at most 4096 characters")
    if len(defn.version) > 64:
        bad("version", "must be at most 64 characters")
    if not defn.tasks:
        bad("tasks", "a workflow needs at least one task")
    if len(defn.tasks) > max_tasks:
        bad("tasks", f"at most {max_tasks} tasks")

    index: dict[str, int] = {}
    for i, task in enumerate(defn.tasks):
        where = f"tasks[{i}]"
        _check_id(bad, f"{where}.task_id", task.task_id)
        if task.task_id in index:
            bad(
                f"{where}.task_id",
                f"duplicate task id (first at tasks[{index[task.task_id]}])",
            )
        else:
            index[task.task_id] = i
        if not task.agent_capability.strip():
            bad(f"{where}.agent_capability", "is required")
        elif len(task.agent_capability) > 128:
            bad(f"{where}.agent_capability", "must be at most 128 characters")
        if len(task.name) > 256:
            bad(f"{where}.name", "must be at most 256 characters")
        if not 0 < task.timeout <= MAX_TIMEOUT_SECONDS:
            bad(f"{where}.timeout", f"must be more than 0s and at most {MAX_TIMEOUT_SECONDS}s")
        _check_retry(bad, f"{where}.retry_policy", task.retry_policy)

    for i, task in enumerate(defn.tasks):
        where = f"tasks[{i}]"
        if task.next_task_id:
            if task.next_task_id not in index:
                bad(
                    f"{where}.next_task_id",
                    f"no task {task.next_task_id!r} here",
                )
            elif task.next_task_id == task.task_id:
                bad(f"{where}.next_task_id", "a task cannot follow itself")
        seen: set[str] = set()
        for j, dep in enumerate(task.depends_on):
            if dep not in index:
                bad(f"{where}.depends_on[{j}]", f"no task {dep!r} here")
            elif dep == task.task_id:
                bad(f"{where}.depends_on[{j}]", "a task cannot depend on itself")
            elif dep in seen:
                bad(f"{where}.depends_on[{j}]", f"duplicate dependency {dep!r}")
            seen.add(dep)

    if not problems:
        cycle = _find_cycle(defn)
        if cycle:
            bad(
                f"tasks[{index[cycle[0]]}]",
                "tasks form a cycle: " + " -> ".join([*cycle, cycle[0]]),
            )
    if problems:
        raise InvalidArgumentError(problems)


def _check_id(bad: Any, path: str, value: str) -> None:
    if not value:
        bad(path, "is required")
    elif len(value) > MAX_ID_LENGTH or not ID_PATTERN.fullmatch(value):
        bad(
            path,
            f"must be 1-{MAX_ID_LENGTH} of letters, digits, . _ : -, starting alphanumeric",
        )


def _check_retry(bad: Any, path: str, policy: RetryPolicy) -> None:
    if not 1 <= policy.max_attempts <= MAX_ATTEMPTS:
        bad(f"{path}.max_attempts", f"must be between 1 and {MAX_ATTEMPTS}")
    if not 0 < policy.initial_interval <= MAX_TIMEOUT_SECONDS:
        bad(f"{path}.initial_interval", "must be more than 0s and at most 7 days")
    if not 1.0 <= policy.backoff_coefficient <= 100.0:
        bad(f"{path}.backoff_coefficient", "must be between 1 and 100")
    if not policy.initial_interval <= policy.maximum_interval <= MAX_TIMEOUT_SECONDS:
        bad(f"{path}.maximum_interval", "must be at least initial_interval and at most 7 days")


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
