"""The durable task queue: claiming ready tasks, putting leased attempts back, and
expiring leases. Each change is one store transaction on a session's aggregate; the
changed sessions are returned, so the caller can tell the dispatcher which slots were
freed and whether new work became ready."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable
from typing import TypeVar

from opscore.domain.clock import Clock
from opscore.domain.dispatch.matching import Claim, Offer
from opscore.domain.workflows.session import Explain, Session, TaskKey
from opscore.protocol.enums import WaitingReason
from opscore.protocol.errors import SessionNotFoundError
from opscore.store.base import Store
from opscore.store.failures import log_failure

log = logging.getLogger(__name__)

R = TypeVar("R")


class TaskQueue:
    def __init__(self, store: Store, clock: Clock, rng: random.Random | None = None) -> None:
        self._store = store
        self._clock = clock
        self.rng = rng or random.Random()
        # Why a ready task waits; the composition root sets the dispatcher's view.
        self.explain: Explain = lambda capability, pinned: (WaitingReason.UNSPECIFIED, "")

    async def change(self, session_id: str, change: Callable[[Session], R]) -> tuple[R, Session]:
        """Applies `change` in one transaction; tasks it queued say why they may wait."""

        def noted(session: Session) -> R:
            result = change(session)
            session.note_waiting(self.explain)
            return result

        return await self._store.change_session(session_id, noted)

    async def claim(self, offers: list[Offer]) -> Claim:
        now = self._clock.now()
        return await self._store.claim_tasks(
            offers, now, lambda session, task_id, agent_id: session.dispatch(task_id, agent_id, now)
        )

    async def requeue(self, keys: Iterable[TaskKey], reason: str) -> list[Session]:
        """Puts leased attempts back at once: their agent was lost (a failed attempt)."""
        now = self._clock.now()

        def requeuer(key: TaskKey) -> Callable[[Session], None]:
            return lambda session: session.requeue(key.task_id, key.attempt, reason, now)

        return await self._change_each(keys, requeuer)

    async def requeue_agent(self, agent_id: str, reason: str) -> list[Session]:
        return await self.requeue(await self.leased(agent_id), reason)

    async def leased(self, agent_id: str) -> list[TaskKey]:
        """The attempts the agent holds: a new stream of its adopts them."""
        return await self._store.leased_tasks(agent_id)

    async def undeliver(self, keys: Iterable[TaskKey], reason: str) -> list[Session]:
        """Takes back attempts committed for a stream that closed before delivery."""
        now = self._clock.now()

        def taker(key: TaskKey) -> Callable[[Session], None]:
            return lambda session: session.undeliver(
                key.task_id, key.attempt, reason, now, self.rng
            )

        return await self._change_each(keys, taker)

    async def time_out(self) -> list[Session]:
        """Ends attempts and waits whose time limits ran out."""
        now = self._clock.now()

        def timer(key: TaskKey) -> Callable[[Session], None]:
            return lambda session: session.time_out(key.task_id, now, self.rng)

        return await self._change_each(await self._store.timed_out_tasks(now), timer)

    async def _change_each(
        self, keys: Iterable[TaskKey], change: Callable[[TaskKey], Callable[[Session], None]]
    ) -> list[Session]:
        """Applies one change per attempt concurrently (they share group commits); a
        session pruned or gone meanwhile is skipped, anything else is logged."""
        keys = list(keys)
        results = await asyncio.gather(
            *(self.change(k.session_id, change(k)) for k in keys), return_exceptions=True
        )
        changed: list[Session] = []
        for key, result in zip(keys, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, SessionNotFoundError):
                    log_failure(
                        log,
                        "task change failed",
                        result,
                        session_id=key.session_id,
                        task_id=key.task_id,
                    )
            else:
                changed.append(result[1])
        return changed
