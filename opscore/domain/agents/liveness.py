"""Liveness: agents silent past the timeout go OFFLINE, and so do agents whose task
stream closed without a new one within the grace (the dispatcher's timer); the agent
event history is kept to a bounded length. The sweeps run as background jobs wired by
the server. An open task stream is contact: its agent is never silent."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from opscore.domain.agents.model import ABSENT, Agent, AgentChange, Presence
from opscore.domain.clock import Clock
from opscore.protocol.enums import AgentEventType, AgentState
from opscore.protocol.errors import AgentNotFoundError
from opscore.store.base import Store
from opscore.store.failures import log_failure

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LivenessConfig:
    # Agents silent this long go OFFLINE; checked every check_interval.
    timeout: float
    check_interval: float
    # Agent events kept for watch resumption; older ones are compacted every
    # compaction_interval.
    event_history_limit: int
    compaction_interval: float


class Liveness:
    def __init__(self, store: Store, clock: Clock, config: LivenessConfig) -> None:
        self._store = store
        self._clock = clock
        self.config = config
        # The live view of open task streams; the composition root sets the dispatcher's.
        self.presence: Callable[[str], Presence] = lambda agent_id: ABSENT

    def _offline(
        self, now: datetime, cutoff: datetime | None
    ) -> Callable[[Agent | None], AgentChange]:
        """Decides OFFLINE for an agent without an open stream whose last contact is
        before `cutoff` (None: whatever its last contact)."""

        def decide(current: Agent | None) -> AgentChange:
            if current is None:
                raise AgentNotFoundError("")  # deregistered meanwhile
            presence = self.presence(current.agent_id)
            if (
                current.state is AgentState.OFFLINE
                or presence.connected
                or (cutoff is not None and presence.contact(current) >= cutoff)
            ):
                return AgentChange(current, None, now)  # back in contact meanwhile
            offline = current.evolve(state=AgentState.OFFLINE, state_updated_at=now)
            return AgentChange(offline, AgentEventType.OFFLINE, now)

        return decide

    async def stream_lost(self, agent_id: str) -> None:
        """The agent's last task stream closed and no new one opened within the grace:
        OFFLINE, unless it has reconnected meanwhile."""
        try:
            _, event = await self._store.change_agent(
                agent_id, self._offline(self._clock.now(), None)
            )
        except AgentNotFoundError:
            return  # deregistered meanwhile
        if event is not None:
            log.warning("agent offline: its task stream closed", extra={"agent_id": agent_id})

    async def mark_silent_agents_offline(self) -> int:
        """Moves every agent silent past the liveness timeout to OFFLINE; an agent with
        an open task stream is in contact, however long since its last heartbeat."""
        now = self._clock.now()
        cutoff = now - timedelta(seconds=self.config.timeout)
        decide = self._offline(now, cutoff)
        silent = [
            agent_id
            for agent_id in await self._store.silent_agents(cutoff)
            if not self.presence(agent_id).connected
        ]
        results = await asyncio.gather(
            *(self._store.change_agent(agent_id, decide) for agent_id in silent),
            return_exceptions=True,
        )
        went_offline = 0
        for agent_id, result in zip(silent, results, strict=True):
            if isinstance(result, tuple) and result[1] is not None:
                went_offline += 1
                log.warning("agent offline: no heartbeat", extra={"agent_id": agent_id})
            elif isinstance(result, Exception) and not isinstance(result, AgentNotFoundError):
                log_failure(log, "liveness check failed", result, agent_id=agent_id)
        return went_offline

    async def compact_history(self) -> int:
        """Drops agent events beyond the retained history (watch resumption)."""
        return await self._store.compact_agent_events(self.config.event_history_limit)
