"""The Store interface: durability, revisions and the event log, for every backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import datetime

from opscore.models import Agent, AgentChange, AgentEvent, AgentFilter

# Runs inside the store's write transaction: sees the current row (or None) and
# decides the change. Raising an OpsCoreError rolls back only this change.
AgentDecision = Callable[[Agent | None], AgentChange]
CommitListener = Callable[[list[AgentEvent]], None]


class Store(ABC):
    """Every change and the event announcing it commit in one transaction; a method
    that returns has committed. Listeners hear about events after commit, in
    revision order."""

    def __init__(self) -> None:
        self._listeners: list[CommitListener] = []

    def add_commit_listener(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    def _announce(self, events: list[AgentEvent]) -> None:
        if events:
            for listener in self._listeners:
                listener(events)

    @abstractmethod
    async def open(self) -> None:
        """Connects and applies pending schema migrations."""

    @abstractmethod
    async def close(self) -> None:
        """Finishes queued writes and releases connections."""

    @abstractmethod
    async def change_agent(
        self, agent_id: str, decide: AgentDecision
    ) -> tuple[Agent, AgentEvent | None]:
        """Applies `decide` atomically; returns the agent after the change (the
        deleted snapshot for a delete) and the event, with its revision, if any."""

    @abstractmethod
    async def get_agent(self, agent_id: str) -> Agent | None: ...

    @abstractmethod
    async def list_agents(self, flt: AgentFilter, after_id: str, limit: int) -> list[Agent]:
        """Agents matching `flt` with agent_id > after_id, ordered by agent_id."""

    @abstractmethod
    async def snapshot_agents(self, flt: AgentFilter) -> tuple[list[Agent], int]:
        """All matching agents and the revision they are consistent with."""

    @abstractmethod
    async def silent_agents(self, heartbeat_before: datetime) -> list[str]:
        """Ids of agents not OFFLINE whose last heartbeat is older than the cutoff."""

    @abstractmethod
    async def agent_events_after(self, revision: int, limit: int) -> tuple[list[AgentEvent], int]:
        """Up to `limit` events with revision > `revision`, in order, plus the
        compacted revision (history at or below it is gone), read consistently."""

    @abstractmethod
    async def compact_agent_events(self, keep: int) -> int:
        """Drops all but the newest `keep` events; returns the compacted revision."""

    @abstractmethod
    async def current_revision(self) -> int: ...
