"""Session tracking: reading runs, their full history, live watch, and retention."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import timedelta

from opscore import paging
from opscore.clock import Clock, every
from opscore.config import Settings
from opscore.errors import SessionNotFoundError
from opscore.hub import Hub
from opscore.models import Page
from opscore.runs import FINISHED, Run, RunFilter, SessionEvent, SessionEventType
from opscore.store.base import Store

log = logging.getLogger(__name__)

TERMINAL_EVENTS = frozenset(
    {
        SessionEventType.SESSION_COMPLETED,
        SessionEventType.SESSION_FAILED,
        SessionEventType.SESSION_CANCELLED,
    }
)
HISTORY_BATCH = 500


class SessionTracker:
    def __init__(self, store: Store, clock: Clock, settings: Settings) -> None:
        self._store = store
        self._clock = clock
        self._settings = settings
        self._hub: Hub[SessionEvent] = Hub(
            settings.max_watchers,
            settings.watch_flush_interval,
            settings.watch_messages_per_second,
        )
        store.add_commit_listener(
            lambda events: self._hub.publish(e for e in events if isinstance(e, SessionEvent))
        )

    async def get(self, session_id: str) -> Run:
        run = await self._store.get_run(session_id)
        if run is None:
            raise SessionNotFoundError(session_id)
        return run

    async def list(self, flt: RunFilter, page_size: int, page_token: str) -> Page[Run]:
        """Newest first. The cursor is the creation sequence of the last session
        shown, so sessions created meanwhile never shift later pages."""
        size = paging.page_size(page_size)
        fp = paging.fingerprint(sorted(flt.statuses), flt.workflow_definition_id, flt.agent_id)
        fetched = await self._store.list_runs(flt, paging.decode_int(page_token, fp), size + 1)
        page, token = paging.cut(fetched, size, lambda found: str(found[0]), fp)
        return Page([run for _, run in page], token)

    async def events(self, session_id: str, page_size: int, page_token: str) -> Page[SessionEvent]:
        """The run's history in sequence order; NOT_FOUND for an unknown session."""
        size = paging.page_size(page_size)
        fp = paging.fingerprint("events", session_id)
        after = paging.decode_int(page_token, fp)
        fetched = await self._store.list_session_events(session_id, after, size + 1)
        if not fetched and after == 0:
            await self.get(session_id)  # NOT_FOUND rather than an empty history
        return Page(*paging.cut(fetched, size, lambda e: str(e.sequence), fp))

    async def watch(self, session_id: str, since_sequence: int) -> AsyncIterator[SessionEvent]:
        """Every event after `since_sequence` in order, then live ones; ends after the
        terminal event."""

        def mine(event: SessionEvent) -> bool:
            return event.session_id == session_id

        with self._hub.subscribe(mine, self._settings.watch_buffer) as live:
            run = await self.get(session_id)
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
            if run.status in FINISHED and last >= run.last_sequence:
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
        cutoff = self._clock.now() - timedelta(seconds=self._settings.session_retention)
        pruned = await self._store.prune_runs(cutoff)
        if pruned:
            log.info("pruned finished sessions", extra={"count": pruned})
        return pruned

    async def run_retention(self) -> None:
        await every(self._clock, self._settings.compaction_interval, self.prune)
