"""The Store interface: durability, revisions and the event log, for every backend."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from opscore.domain.agents.model import Agent, AgentChange, AgentEvent, AgentFilter
from opscore.domain.dispatch.matching import Claim, Offer
from opscore.domain.workflows.definitions import WorkflowDefinition
from opscore.domain.workflows.session import (
    Assignment,
    Session,
    SessionEvent,
    SessionFilter,
    TaskKey,
)

log = logging.getLogger(__name__)

# Runs inside the store's write transaction: sees the current row (or None) and
# decides the change. Raising an OpsCoreError rolls back only this change.
AgentDecision = Callable[[Agent | None], AgentChange]
# Hears every committed event (AgentEvent and SessionEvent), in commit order.
CommitListener = Callable[[list[Any]], None]
R = TypeVar("R")


class Store(ABC):
    """Every change and the event announcing it commit in one transaction; a method
    that returns has committed. Listeners hear about events after commit, in
    revision order."""

    def __init__(self) -> None:
        self._listeners: list[CommitListener] = []

    def add_commit_listener(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    def _announce(self, events: list[Any]) -> None:
        """A failing listener is logged: what committed stays committed, its callers
        still get their answers, and the other listeners still hear of it."""
        if events:
            for listener in self._listeners:
                try:
                    listener(events)
                except Exception:
                    log.exception("commit listener failed")

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
    async def agent_tokens(self) -> dict[str, str]:
        """Every agent token's SHA-256, mapped to its agent id."""

    @abstractmethod
    async def list_agents(
        self, flt: AgentFilter, after_id: str, limit: int
    ) -> tuple[list[Agent], int]:
        """Agents matching `flt` with agent_id > after_id, ordered by agent_id, and the
        revision they are consistent with."""

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

    # -- workflow definitions ----------------------------------------------------

    @abstractmethod
    async def create_definition(self, definition: WorkflowDefinition) -> WorkflowDefinition:
        """Stores a new id + version; WorkflowDefinitionError if it is taken."""

    @abstractmethod
    async def get_definition(self, definition_id: str, version: str) -> WorkflowDefinition | None:
        """One version, or the newest one when `version` is empty."""

    @abstractmethod
    async def list_definitions(
        self, after: tuple[str, str], limit: int
    ) -> list[WorkflowDefinition]:
        """Ordered by (id, version), starting after the given pair."""

    @abstractmethod
    async def delete_definition(self, definition_id: str, version: str) -> bool: ...

    # -- sessions ----------------------------------------------------------------

    @abstractmethod
    async def create_session(self, session: Session) -> tuple[Session, bool]:
        """Stores a new session; if its request_id was used before, returns the stored
        session of that request instead and False."""

    @abstractmethod
    async def change_session(
        self, session_id: str, change: Callable[[Session], R]
    ) -> tuple[R, Session]:
        """Loads the session, applies `change` and writes back what it changed,
        atomically; SessionNotFoundError if there is no such session."""

    @abstractmethod
    async def get_session(self, session_id: str) -> Session | None: ...

    @abstractmethod
    async def claim_tasks(
        self,
        offers: list[Offer],
        now: datetime,
        dispatch: Callable[[Session, str, str], Assignment],
    ) -> Claim:
        """Walks ready tasks (oldest first) through a `Matcher` of the offers, applying
        `dispatch(session, task_id, agent_id)` to each match, in one transaction."""

    @abstractmethod
    async def timed_out_tasks(self, now: datetime) -> list[TaskKey]:
        """Attempts whose lease has run out by `now`, and ready tasks past their
        schedule_to_start limit."""

    @abstractmethod
    async def leased_tasks(self, agent_id: str | None = None) -> list[TaskKey]:
        """Attempts currently leased (to one agent, or to anyone)."""

    @abstractmethod
    async def list_sessions(
        self, flt: SessionFilter, before_seq: int, limit: int
    ) -> list[tuple[int, Session]]:
        """Sessions matching `flt`, newest first, created before `before_seq` (0: from
        the newest); each with its creation sequence, the stable paging cursor."""

    @abstractmethod
    async def prune_sessions(self, ended_before: datetime) -> int:
        """Deletes finished sessions that ended before the cutoff, with their history."""

    @abstractmethod
    async def list_session_events(
        self, session_id: str, after_sequence: int, limit: int
    ) -> list[SessionEvent]: ...

    @abstractmethod
    async def secret(self, name: str) -> bytes:
        """A random key created on first use and kept across restarts."""
