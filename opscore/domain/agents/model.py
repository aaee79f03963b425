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
class AgentGrant:
    """What an operator registered the agent as: the most its own token may
    re-register it as. Stored apart from the current record, so that an agent may
    narrow its capabilities and later widen them again up to the grant."""

    name: str
    version: str
    capabilities: frozenset[str]

    @classmethod
    def of(cls, reg: AgentRegistration) -> AgentGrant:
        return cls(reg.name, reg.version, frozenset(reg.capabilities))

    def refusal(self, reg: AgentRegistration) -> str | None:
        """What in `reg` goes beyond this grant (None: nothing, the agent may register
        itself so); metadata and contact_endpoint are informational and free."""
        extra = sorted(set(reg.capabilities) - self.capabilities)
        if extra:
            return f"capabilities {extra} it was not granted"
        if reg.name != self.name:
            return f"name {reg.name!r} (granted: {self.name!r})"
        if reg.version != self.version:
            return f"version {reg.version!r} (granted: {self.version!r})"
        return None


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
    # Set by every operator registration; None only in snapshots written before
    # grants were stored (an agent without one may not register itself).
    grant: AgentGrant | None = None

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
class Presence:
    """What this server process sees of an agent now, from its open task streams; not
    stored (a server that just started has seen nobody)."""

    connected: bool
    free_slots: int
    # Now while a stream is open, else when the last one closed (None: no stream
    # since this server started).
    last_contact_at: datetime | None

    def contact(self, agent: Agent) -> datetime:
        """The agent's last sign of life: a stored heartbeat or report, or its stream."""
        if self.last_contact_at is None:
            return agent.last_heartbeat_at
        return max(agent.last_heartbeat_at, self.last_contact_at)


ABSENT = Presence(connected=False, free_slots=0, last_contact_at=None)


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
