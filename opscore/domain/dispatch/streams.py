"""One open StreamTasks call: its outbox of assignments and its in-flight set."""

from __future__ import annotations

import asyncio
from collections import deque

from opscore.domain.workflows.session import Assignment, TaskKey
from opscore.protocol.errors import OpsCoreError


class TaskStream:
    """One open StreamTasks call: an outbox of assignments and its in-flight set."""

    def __init__(self, agent_id: str, max_in_flight: int) -> None:
        self.agent_id = agent_id
        self.max_in_flight = max_in_flight
        self.in_flight: set[TaskKey] = set()
        self.reserved = 0  # slots booked for assignments being committed
        self._outbox: deque[Assignment] = deque()
        self._ready = asyncio.Event()
        self.closed: OpsCoreError | None = None

    def free_slots(self) -> int:
        return self.max_in_flight - len(self.in_flight) - self.reserved

    def push(self, assignment: Assignment) -> None:
        self._outbox.append(assignment)
        self._ready.set()

    def close(self, reason: OpsCoreError) -> None:
        self.closed = reason
        self._ready.set()

    async def next(self) -> Assignment:
        while not self._outbox:
            if self.closed is not None:
                raise self.closed
            self._ready.clear()
            await self._ready.wait()
        return self._outbox.popleft()
