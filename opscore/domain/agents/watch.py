"""The live agent watch: an initial snapshot or replayed history from the store, then
committed events from the hub, each exactly once and in revision order."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable

from opscore.domain.agents.model import AgentEvent, AgentFilter
from opscore.domain.clock import Clock
from opscore.domain.events.hub import Hub, WatchConfig
from opscore.protocol.enums import AgentEventType
from opscore.protocol.errors import RevisionAheadError, RevisionCompactedError
from opscore.protocol.limits import WATCH_BATCH
from opscore.store.base import Store


class AgentWatch:
    """`weigh` gives an event's wire size (the edge frames each committed event once),
    which bounds what a watcher may fall behind by and what one batch carries."""

    def __init__(
        self, store: Store, clock: Clock, config: WatchConfig, weigh: Callable[[AgentEvent], int]
    ) -> None:
        self._store = store
        self._clock = clock
        self._config = config
        self._hub: Hub[AgentEvent] = Hub.configured(config, weigh)

    def on_commit(self, events: Iterable[object]) -> None:
        """A commit listener: fans committed agent events out to the watchers."""
        self._hub.publish(e for e in events if isinstance(e, AgentEvent))

    def close(self) -> None:
        """Ends every watch (server shutdown)."""
        self._hub.close()

    async def watch(
        self, flt: AgentFilter, since_revision: int | None, send_initial_state: bool
    ) -> AsyncIterator[list[AgentEvent]]:
        """Yields batches of events in revision order: the initial snapshot or the
        replayed history first, then live events, each exactly once. A since_revision
        the store has not reached is RevisionAheadError (no event would ever come)."""

        def matches(event: AgentEvent) -> bool:
            return event.agent is not None and flt.matches(event.agent)

        unfiltered = not flt.agent_ids and not flt.states and not flt.capability
        config = self._config
        accepts = None if unfiltered else matches
        with self._hub.subscribe(accepts, config.buffer, config.buffer_bytes) as live:
            if send_initial_state:
                agents, last = await self._store.snapshot_agents(flt)
                now = self._clock.now()
                snapshot = [AgentEvent(a.revision, AgentEventType.SNAPSHOT, a, now) for a in agents]
                for start in range(0, len(snapshot), WATCH_BATCH):
                    yield snapshot[start : start + WATCH_BATCH]
                yield [AgentEvent(last, AgentEventType.SYNCED, None, now)]
            elif since_revision is not None:
                current = await self._store.current_revision()
                if since_revision > current:
                    raise RevisionAheadError(since_revision, current)
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
                batch = await live.next_batch(WATCH_BATCH, config.response_bytes)
                if batch[0].revision <= last:  # overlaps the replayed history
                    batch = [e for e in batch if e.revision > last]
                if batch:
                    last = batch[-1].revision
                    yield batch
