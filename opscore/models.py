"""Domain models of the agent lifecycle: plain frozen dataclasses, no grpc."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Generic, TypeVar

JsonObject = dict[str, Any]

# Ids chosen by callers (agents, workflows, tasks).
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
MAX_ID_LENGTH = 128
T = TypeVar("T")


class AgentState(enum.IntEnum):
    """Mirrors `opspawn.opscore.v1.AgentState` number for number."""

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


@dataclass(frozen=True)
class AgentRegistration:
    """What a caller supplies to register an agent (already validated)."""

    agent_id: str
    name: str
    version: str
    capabilities: tuple[str, ...]
    contact_endpoint: str
    metadata: dict[str, str]


@dataclass(frozen=True)
class Agent:
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

    def evolve(self, **changes: Any) -> Agent:
        return replace(self, **changes)

    def same_registration(self, reg: AgentRegistration) -> bool:
        return (
            self.name == reg.name
            and self.version == reg.version
            and self.capabilities == reg.capabilities
            and self.contact_endpoint == reg.contact_endpoint
            and self.metadata == reg.metadata
        )


@dataclass(frozen=True)
class AgentEvent:
    """One committed change; `agent` is the snapshot after it (None for SYNCED)."""

    revision: int
    type: AgentEventType
    agent: Agent | None
    occurred_at: datetime


@dataclass(frozen=True)
class AgentFilter:
    """Which agents a list or watch covers; empty fields match everything."""

    agent_ids: frozenset[str] = field(default_factory=frozenset)
    states: frozenset[AgentState] = field(default_factory=frozenset)
    capability: str = ""

    def matches(self, agent: Agent) -> bool:
        return (
            (not self.agent_ids or agent.agent_id in self.agent_ids)
            and (not self.states or agent.state in self.states)
            and (not self.capability or self.capability in agent.capabilities)
        )


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list; `next_page_token` is empty on the last page."""

    items: list[T]
    next_page_token: str
    # The store revision the page is consistent with (agent lists only).
    revision: int = 0


@dataclass(frozen=True)
class AgentChange:
    """What one agent transaction decided: the new row (None deletes it) and the
    event announcing it (None: a silent write, e.g. a heartbeat)."""

    agent: Agent | None
    event: AgentEventType | None
    occurred_at: datetime
    # SHA-256 of a newly issued agent token, stored in the same transaction.
    token_sha256: str | None = None
