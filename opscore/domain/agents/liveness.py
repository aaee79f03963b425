"""Liveness: agents silent past the timeout go OFFLINE; the agent event history is
kept to a bounded length. Both run as background jobs wired by the server."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta

from opscore.domain.agents.model import Agent, AgentChange
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

    async def mark_silent_agents_offline(self) -> int:
        """Moves every agent silent past the liveness timeout to OFFLINE."""
        now = self._clock.now()
        cutoff = now - timedelta(seconds=self.config.timeout)

        def decide(current: Agent | None) -> AgentChange:
            if current is None:
                raise AgentNotFoundError("")  # deregistered meanwhile
            if current.state is AgentState.OFFLINE or current.last_heartbeat_at >= cutoff:
                return AgentChange(current, None, now)  # heartbeat arrived meanwhile
            offline = current.evolve(state=AgentState.OFFLINE, state_updated_at=now)
            return AgentChange(offline, AgentEventType.OFFLINE, now)

        silent = await self._store.silent_agents(cutoff)
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
