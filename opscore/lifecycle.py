"""Agent lifecycle rules: registration, state reports, liveness, and the watch feed.

Every rule that depends on the stored agent runs inside the store's transaction (a
`decide` function), so concurrent calls never act on a stale read.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

from opscore import auth, paging
from opscore.clock import Clock, every
from opscore.config import Settings
from opscore.errors import (
    AgentNotFoundError,
    InvalidArgumentError,
    InvalidStateError,
    RevisionCompactedError,
    StaleStateReportError,
)
from opscore.hub import Hub
from opscore.models import (
    Agent,
    AgentChange,
    AgentEvent,
    AgentEventType,
    AgentFilter,
    AgentRegistration,
    AgentState,
    JsonObject,
    Page,
)
from opscore.store.base import Store

log = logging.getLogger(__name__)

# Events per watch message and per history read.
WATCH_BATCH = 500


class Lifecycle:
    def __init__(
        self, store: Store, clock: Clock, settings: Settings, issue_tokens: bool = False
    ) -> None:
        self._store = store
        self._clock = clock
        self._settings = settings
        self._issue_tokens = issue_tokens
        # Agent tokens by SHA-256, and back (authentication on only).
        self._token_owner: dict[str, str] = {}
        self._agent_token: dict[str, str] = {}
        self._hub: Hub[AgentEvent] = Hub(
            settings.max_watchers,
            settings.watch_flush_interval,
            settings.watch_messages_per_second,
        )
        store.add_commit_listener(
            lambda events: self._hub.publish(e for e in events if isinstance(e, AgentEvent))
        )

    @property
    def liveness_timeout(self) -> float:
        return self._settings.liveness_timeout

    async def start(self) -> None:
        if self._issue_tokens:
            self._token_owner = await self._store.agent_tokens()
            self._agent_token = {a: s for s, a in self._token_owner.items()}

    # -- agent tokens ------------------------------------------------------------

    def agent_for_token(self, token: str) -> str | None:
        """The agent a bearer token belongs to, if it is a current agent token."""
        return self._token_owner.get(auth.digest(token))

    def _new_token(self) -> tuple[str, str]:
        token = auth.new_secret(auth.AGENT_TOKEN_PREFIX)
        return token, auth.digest(token)

    def _remember_token(self, agent_id: str, sha: str | None) -> None:
        old = self._agent_token.pop(agent_id, None)
        if old is not None:
            self._token_owner.pop(old, None)
        if sha is not None:
            self._agent_token[agent_id] = sha
            self._token_owner[sha] = agent_id

    async def rotate_token(self, agent_id: str) -> tuple[Agent, str]:
        """Issues a new token for the agent; the old one stops working at once."""
        if not self._issue_tokens:
            raise InvalidStateError("authentication is off: agents need no tokens")
        token, sha = self._new_token()
        now = self._clock.now()

        def decide(current: Agent | None) -> AgentChange:
            if current is None:
                raise AgentNotFoundError(agent_id)
            return AgentChange(current, None, now, token_sha256=sha)

        agent, _ = await self._store.change_agent(agent_id, decide)
        self._remember_token(agent_id, sha)
        log.info("agent token rotated", extra={"agent_id": agent_id})
        return agent, token

    # -- registry ----------------------------------------------------------------

    async def register(self, reg: AgentRegistration) -> tuple[Agent, str | None]:
        """Creates the agent, or re-registers it: an identical retry changes nothing;
        changed fields (or an OFFLINE agent coming back) restart it as INITIALIZING.
        With authentication on, an agent without a token gets one (returned once)."""
        agent_id = reg.agent_id or str(uuid.uuid4())
        now = self._clock.now()
        token, sha = (
            self._new_token()
            if self._issue_tokens and agent_id not in self._agent_token
            else (None, None)
        )

        def decide(current: Agent | None) -> AgentChange:
            if (
                current is not None
                and current.same_registration(reg)
                and current.state is not AgentState.OFFLINE
            ):
                return AgentChange(current, None, now, token_sha256=sha)
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
            )
            return AgentChange(agent, AgentEventType.REGISTERED, now, token_sha256=sha)

        agent, event = await self._store.change_agent(agent_id, decide)
        if sha is not None:
            self._remember_token(agent_id, sha)
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
        self._remember_token(agent_id, None)
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
        if observed > now + timedelta(seconds=self._settings.max_clock_skew):
            raise InvalidArgumentError.single(
                "observed_at",
                f"is more than {self._settings.max_clock_skew:g}s ahead of the server clock",
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

    # -- liveness ----------------------------------------------------------------

    async def mark_silent_agents_offline(self) -> int:
        """Moves every agent silent past the liveness timeout to OFFLINE."""
        now = self._clock.now()
        cutoff = now - timedelta(seconds=self._settings.liveness_timeout)

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
                log.error("liveness check failed", extra={"agent_id": agent_id}, exc_info=result)
        return went_offline

    async def run_liveness_checks(self) -> None:
        await every(
            self._clock, self._settings.liveness_check_interval, self.mark_silent_agents_offline
        )

    async def compact_history(self) -> int:
        return await self._store.compact_agent_events(self._settings.event_history_limit)

    async def run_compaction(self) -> None:
        await every(self._clock, self._settings.compaction_interval, self.compact_history)

    # -- watch -------------------------------------------------------------------

    def close(self) -> None:
        """Ends every watch (server shutdown)."""
        self._hub.close()

    async def watch(
        self, flt: AgentFilter, since_revision: int | None, send_initial_state: bool
    ) -> AsyncIterator[list[AgentEvent]]:
        """Yields batches of events in revision order: the initial snapshot or the
        replayed history first, then live events, each exactly once."""

        def matches(event: AgentEvent) -> bool:
            return event.agent is not None and flt.matches(event.agent)

        unfiltered = not flt.agent_ids and not flt.states and not flt.capability
        with self._hub.subscribe(
            None if unfiltered else matches, self._settings.watch_buffer
        ) as live:
            if send_initial_state:
                agents, last = await self._store.snapshot_agents(flt)
                now = self._clock.now()
                snapshot = [AgentEvent(a.revision, AgentEventType.SNAPSHOT, a, now) for a in agents]
                for start in range(0, len(snapshot), WATCH_BATCH):
                    yield snapshot[start : start + WATCH_BATCH]
                yield [AgentEvent(last, AgentEventType.SYNCED, None, now)]
            elif since_revision is not None:
                last = since_revision
                while True:
                    events, compacted = await self._store.agent_events_after(last, WATCH_BATCH)
                    if last < compacted:
                        raise RevisionCompactedError(since_revision, compacted)
                    if not events:
                        break
                    last = events[-1].revision
                    wanted = [e for e in events if matches(e)]
                    if wanted:
                        yield wanted
            else:
                last = await self._store.current_revision()
            while True:
                batch = await live.next_batch(WATCH_BATCH)
                if batch[0].revision <= last:  # overlaps the replayed history
                    batch = [e for e in batch if e.revision > last]
                if batch:
                    last = batch[-1].revision
                    yield batch
