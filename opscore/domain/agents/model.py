"""The agent registry's values: plain frozen dataclasses, no grpc."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from opscore.protocol.enums import AgentEventType, AgentState
from opscore.protocol.values import JsonObject


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
class AgentChange:
    """What one agent transaction decided: the new row (None deletes it) and the
    event announcing it (None: a silent write, e.g. a heartbeat)."""

    agent: Agent | None
    event: AgentEventType | None
    occurred_at: datetime
    # SHA-256 of a newly issued agent token, stored in the same transaction.
    token_sha256: str | None = None
