"""Sessions as operators see them: queries, their full history, the live watch, and
retention of finished sessions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

from opscore.domain import paging
from opscore.domain.clock import Clock
from opscore.domain.events.hub import Hub, WatchConfig
from opscore.domain.paging import Page
from opscore.domain.workflows.session import Session, SessionEvent, SessionFilter
from opscore.protocol.enums import FINISHED, TERMINAL_EVENTS
from opscore.protocol.errors import (
    SequenceAheadError,
    SessionNotFoundError,
    ShuttingDownError,
)
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


@dataclass(eq=False)
class _EndWaiter:
    """A caller awaiting the end of a session it is starting. Until it knows the
    session_id it records every session that ends, so an end committed before then is
    not missed."""

    session_id: str = ""
    ended_meanwhile: set[str] = field(default_factory=set)
    has_ended: bool = False
    woken: asyncio.Event = field(default_factory=asyncio.Event)  # by its end or shutdown


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
        # Callers awaiting a session's end: by session_id, and those still starting it.
        self._waiters: dict[str, set[_EndWaiter]] = {}
        self._unbound: set[_EndWaiter] = set()
        self._closed = False

    def on_commit(self, events: Iterable[object]) -> None:
        """A commit listener: fans committed session events out to the watchers and
        wakes the callers awaiting a session's end."""
        mine = [e for e in events if isinstance(e, SessionEvent)]
        self._hub.publish(mine)
        if self._waiters or self._unbound:
            for event in mine:
                if event.type in TERMINAL_EVENTS:
                    for waiter in self._unbound:
                        waiter.ended_meanwhile.add(event.session_id)
                    for waiter in self._waiters.get(event.session_id, ()):
                        waiter.has_ended = True
                        waiter.woken.set()

    @contextmanager
    def awaiting(self) -> Iterator[Callable[[Session], Awaitable[Session]]]:
        """Enter before starting a session (so its end cannot be missed); the function
        given takes the session as started and returns it once it has ended: at once
        if it had, else read once after its terminal event is committed (no polling).
        ShuttingDownError when the server stops first."""
        waiter = _EndWaiter()
        self._unbound.add(waiter)

        async def ended(session: Session) -> Session:
            if session.status in FINISHED:
                return session
            self._unbound.discard(waiter)
            waiter.session_id = session.session_id
            if waiter.session_id not in waiter.ended_meanwhile:
                self._waiters.setdefault(waiter.session_id, set()).add(waiter)
                if not self._closed:
                    await waiter.woken.wait()
                if not waiter.has_ended:
                    raise ShuttingDownError(
                        "server is shutting down; retry with the same request_id"
                    )
            return await self.get(waiter.session_id)

        try:
            yield ended
        finally:
            self._unbound.discard(waiter)
            waiters = self._waiters.get(waiter.session_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[waiter.session_id]

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
        """Ends every watch and every wait for a session's end (server shutdown)."""
        self._hub.close()
        self._closed = True
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.woken.set()

    async def prune(self) -> int:
        cutoff = self._clock.now() - timedelta(seconds=self.config.retention)
        pruned = await self._store.prune_sessions(cutoff)
        if pruned:
            log.info("pruned finished sessions", extra={"count": pruned})
        return pruned
