"""Sessions as operators see them: queries, their full history, the live watch, and
retention of finished sessions."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta

from opscore.domain import paging
from opscore.domain.clock import Clock
from opscore.domain.events.hub import Hub, WatchConfig
from opscore.domain.paging import Page
from opscore.domain.workflows.session import Session, SessionEvent, SessionFilter
from opscore.protocol.enums import FINISHED, TERMINAL_EVENTS
from opscore.protocol.errors import SequenceAheadError, SessionNotFoundError
from opscore.store.base import Store

log = logging.getLogger(__name__)

HISTORY_BATCH = 500


@dataclass(frozen=True)
class SessionsConfig:
    # Finished sessions and their history are kept this long, checked every
    # prune_interval.
    retention: float
    prune_interval: float
    watch: WatchConfig


class SessionHistory:
    """`weigh` gives an event's wire size, which bounds what a watcher may fall behind
    by (each event is one response, within MAX_SESSION_EVENT_BYTES)."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        config: SessionsConfig,
        weigh: Callable[[SessionEvent], int],
    ) -> None:
        self._store = store
        self._clock = clock
        self.config = config
        self._hub: Hub[SessionEvent] = Hub.configured(config.watch, weigh)

    def on_commit(self, events: Iterable[object]) -> None:
        """A commit listener: fans committed session events out to the watchers."""
        self._hub.publish(e for e in events if isinstance(e, SessionEvent))

    async def get(self, session_id: str) -> Session:
        session = await self._store.get_session(session_id)
        if session is None:
            raise SessionNotFoundError(session_id)
        return session

    async def list(self, flt: SessionFilter, page_size: int, page_token: str) -> Page[Session]:
        """Newest first. The cursor is the creation sequence of the last session
        shown, so sessions created meanwhile never shift later pages."""
        size = paging.page_size(page_size)
        fp = paging.fingerprint(sorted(flt.statuses), flt.workflow_definition_id, flt.agent_id)
        fetched = await self._store.list_sessions(flt, paging.decode_int(page_token, fp), size + 1)
        page, token = paging.cut(fetched, size, lambda found: str(found[0]), fp)
        return Page([session for _, session in page], token)

    async def events(self, session_id: str, page_size: int, page_token: str) -> Page[SessionEvent]:
        """The session's history in sequence order; NOT_FOUND for an unknown session."""
        size = paging.page_size(page_size)
        fp = paging.fingerprint("events", session_id)
        after = paging.decode_int(page_token, fp)
        fetched = await self._store.list_session_events(session_id, after, size + 1)
        if not fetched and after == 0:
            await self.get(session_id)  # NOT_FOUND rather than an empty history
        return Page(*paging.cut(fetched, size, lambda e: str(e.sequence), fp))

    async def watch(self, session_id: str, since_sequence: int) -> AsyncIterator[SessionEvent]:
        """Every event after `since_sequence` in order, then live ones; ends after the
        terminal event. A since_sequence past the session's last event is
        SequenceAheadError."""

        def mine(event: SessionEvent) -> bool:
            return event.session_id == session_id

        config = self.config.watch
        with self._hub.subscribe(mine, config.buffer, config.buffer_bytes) as live:
            session = await self.get(session_id)
            if since_sequence > session.last_sequence:
                raise SequenceAheadError(session_id, since_sequence, session.last_sequence)
            last = since_sequence
            while True:
                history = await self._store.list_session_events(session_id, last, HISTORY_BATCH)
                for event in history:
                    yield event
                    if event.type in TERMINAL_EVENTS:
                        return
                if len(history) < HISTORY_BATCH:
                    break
                last = history[-1].sequence
            if history:
                last = history[-1].sequence
            if session.status in FINISHED and last >= session.last_sequence:
                return  # resumed after the terminal event: nothing more will come
            while True:
                for event in await live.next_batch(HISTORY_BATCH):
                    if event.sequence <= last:
                        continue
                    last = event.sequence
                    yield event
                    if event.type in TERMINAL_EVENTS:
                        return

    def close(self) -> None:
        """Ends every watch (server shutdown)."""
        self._hub.close()

    async def prune(self) -> int:
        cutoff = self._clock.now() - timedelta(seconds=self.config.retention)
        pruned = await self._store.prune_sessions(cutoff)
        if pruned:
            log.info("pruned finished sessions", extra={"count": pruned})
        return pruned
