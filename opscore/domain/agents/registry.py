"""The agent registry and its state rules: registration, state reports, heartbeats.

Every rule that depends on the stored agent runs inside the store's transaction (a
`decide` function), so concurrent calls never act on a stale read.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from opscore.domain import paging
from opscore.domain.agents.credentials import AgentCredentials
from opscore.domain.agents.model import (
    Agent,
    AgentChange,
    AgentFilter,
    AgentGrant,
    AgentRegistration,
)
from opscore.domain.clock import Clock
from opscore.domain.paging import Page
from opscore.protocol.enums import AgentEventType, AgentState
from opscore.protocol.errors import (
    AgentNotFoundError,
    InvalidArgumentError,
    InvalidStateError,
    PermissionDeniedError,
    StaleStateReportError,
)
from opscore.protocol.values import JsonObject
from opscore.store.base import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryConfig:
    # State reports observed further in the future than this are refused.
    max_clock_skew: float


def _check_grant(agent_id: str, current: Agent | None, reg: AgentRegistration) -> None:
    """An agent registering itself stays within what an operator registered."""
    grant = None if current is None else current.grant
    if grant is None:
        raise PermissionDeniedError(
            f"agent {agent_id} has no operator registration: an operator must register it",
            agent_id=agent_id,
        )
    beyond = grant.refusal(reg)
    if beyond is not None:
        raise PermissionDeniedError(
            f"agent {agent_id} may not register itself with {beyond}: "
            "an operator must register that",
            agent_id=agent_id,
        )


class AgentRegistry:
    def __init__(
        self, store: Store, clock: Clock, config: RegistryConfig, credentials: AgentCredentials
    ) -> None:
        self._store = store
        self._clock = clock
        self._config = config
        self._credentials = credentials

    # -- registry ----------------------------------------------------------------

    async def register(
        self, reg: AgentRegistration, by_agent: bool = False
    ) -> tuple[Agent, str | None]:
        """Creates the agent, or re-registers it: an identical retry changes nothing;
        changed fields (or an OFFLINE agent coming back) restart it as INITIALIZING.
        An operator's registration is the agent's grant; `by_agent` (the agent with
        its own token) may only stay within it, else PERMISSION_DENIED and nothing
        changes. With authentication on, an agent without a token gets one (returned
        once)."""
        agent_id = reg.agent_id or str(uuid.uuid4())
        now = self._clock.now()
        token, sha = (
            self._credentials.new_token()
            if not by_agent
            and self._credentials.enabled
            and not self._credentials.has_token(agent_id)
            else (None, None)
        )
        grant = None if by_agent else AgentGrant.of(reg)

        def decide(current: Agent | None) -> AgentChange:
            if by_agent:
                _check_grant(agent_id, current, reg)
            if (
                current is not None
                and current.same_registration(reg)
                and current.state is not AgentState.OFFLINE
            ):
                if grant is None or grant == current.grant:
                    return AgentChange(current, None, now, token_sha256=sha)
                return AgentChange(current.evolve(grant=grant), None, now, token_sha256=sha)
            base = current or Agent(
                agent_id=agent_id,
                name="",
                version="",
                capabilities=(),
                contact_endpoint="",
                metadata={},
                state=AgentState.INITIALIZING,
                state_details={},
                registered_at=now,
                state_updated_at=now,
                last_heartbeat_at=now,
                state_observed_at=None,
                revision=0,
            )
            agent = base.evolve(
                name=reg.name,
                version=reg.version,
                capabilities=reg.capabilities,
                contact_endpoint=reg.contact_endpoint,
                metadata=reg.metadata,
                state=AgentState.INITIALIZING,
                state_details={},
                state_updated_at=now,
                last_heartbeat_at=now,
                grant=grant or base.grant,
            )
            return AgentChange(agent, AgentEventType.REGISTERED, now, token_sha256=sha)

        agent, event = await self._store.change_agent(agent_id, decide)
        if sha is not None:
            self._credentials.remember(agent_id, sha)
        if event is not None:
            log.info("agent registered", extra={"agent_id": agent_id, "revision": event.revision})
        return agent, token

    async def deregister(self, agent_id: str) -> Agent:
        now = self._clock.now()

        def decide(current: Agent | None) -> AgentChange:
            if current is None:
                raise AgentNotFoundError(agent_id)
            return AgentChange(None, AgentEventType.DEREGISTERED, now)

        agent, _ = await self._store.change_agent(agent_id, decide)
        self._credentials.remember(agent_id, None)
        log.info("agent deregistered", extra={"agent_id": agent_id})
        return agent

    async def get(self, agent_id: str) -> Agent:
        agent = await self._store.get_agent(agent_id)
        if agent is None:
            raise AgentNotFoundError(agent_id)
        return agent

    async def list_agents(self, flt: AgentFilter, page_size: int, page_token: str) -> Page[Agent]:
        size = paging.page_size(page_size)
        fp = paging.fingerprint(sorted(flt.states), flt.capability, sorted(flt.agent_ids))
        after = paging.decode(page_token, fp)
        fetched, revision = await self._store.list_agents(flt, after, size + 1)
        agents, token = paging.cut(fetched, size, lambda a: a.agent_id, fp)
        return Page(agents, token, revision)

    # -- state reports -----------------------------------------------------------

    async def update_state(
        self,
        agent_id: str,
        state: AgentState,
        details: JsonObject,
        observed_at: datetime | None = None,
    ) -> Agent:
        """Records a report; one observed before the newest accepted report is
        refused (FAILED_PRECONDITION) and changes nothing."""
        now = self._clock.now()
        observed = observed_at or now
        if observed > now + timedelta(seconds=self._config.max_clock_skew):
            raise InvalidArgumentError.single(
                "observed_at",
                f"is more than {self._config.max_clock_skew:g}s ahead of the server clock",
            )

        def decide(current: Agent | None) -> AgentChange:
            if current is None:
                raise AgentNotFoundError(agent_id)
            last = current.state_observed_at
            if last is not None and observed < last:
                raise StaleStateReportError(
                    f"report observed at {observed} is older than the accepted one "
                    f"observed at {last.isoformat()}",
                    agent_id=agent_id,
                )
            if current.state is state and current.state_details == details:
                return AgentChange(
                    current.evolve(state_observed_at=observed, last_heartbeat_at=now), None, now
                )
            updated = current.evolve(
                state=state,
                state_details=details,
                state_updated_at=now,
                state_observed_at=observed,
                last_heartbeat_at=now,
            )
            return AgentChange(updated, AgentEventType.STATE_CHANGED, now)

        agent, _ = await self._store.change_agent(agent_id, decide)
        return agent

    async def heartbeat(self, agent_id: str) -> Agent:
        """Keeps the agent live; an OFFLINE agent that heartbeats comes back IDLE."""
        now = self._clock.now()

        def decide(current: Agent | None) -> AgentChange:
            if current is None:
                raise AgentNotFoundError(agent_id)
            if current.state is AgentState.OFFLINE:
                revived = current.evolve(
                    state=AgentState.IDLE,
                    state_details={},
                    state_updated_at=now,
                    last_heartbeat_at=now,
                )
                return AgentChange(revived, AgentEventType.STATE_CHANGED, now)
            return AgentChange(current.evolve(last_heartbeat_at=now), None, now)

        agent, _ = await self._store.change_agent(agent_id, decide)
        return agent

    async def ready_for_work(self, agent_id: str) -> Agent:
        """An agent opening its task stream is live, and ready if it was INITIALIZING
        or OFFLINE (it becomes IDLE)."""
        now = self._clock.now()

        def decide(current: Agent | None) -> AgentChange:
            if current is None:
                raise AgentNotFoundError(agent_id)
            if current.state in (AgentState.INITIALIZING, AgentState.OFFLINE):
                ready = current.evolve(
                    state=AgentState.IDLE, state_updated_at=now, last_heartbeat_at=now
                )
                return AgentChange(ready, AgentEventType.STATE_CHANGED, now)
            return AgentChange(current.evolve(last_heartbeat_at=now), None, now)

        agent, _ = await self._store.change_agent(agent_id, decide)
        return agent

    # -- agent tokens ------------------------------------------------------------

    async def rotate_token(self, agent_id: str) -> tuple[Agent, str]:
        """Issues a new token for the agent; the old one stops working at once."""
        if not self._credentials.enabled:
            raise InvalidStateError("authentication is off: agents need no tokens")
        token, sha = self._credentials.new_token()
        now = self._clock.now()

        def decide(current: Agent | None) -> AgentChange:
            if current is None:
                raise AgentNotFoundError(agent_id)
            return AgentChange(current, None, now, token_sha256=sha)

        agent, _ = await self._store.change_agent(agent_id, decide)
        self._credentials.remember(agent_id, sha)
        log.info("agent token rotated", extra={"agent_id": agent_id})
        return agent, token
