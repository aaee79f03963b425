"""The workflow engine: definitions, starting runs, and every answer about a task
attempt. Each change is one store transaction on the run's aggregate; afterwards the
dispatcher is told which slots were freed and whether new work became ready."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TypeVar

from opscore import definitions, paging
from opscore.clock import Clock, every
from opscore.config import Settings
from opscore.definitions import WorkflowDefinition
from opscore.dispatch import Dispatcher
from opscore.errors import (
    InvalidArgumentError,
    InvalidStateError,
    SessionNotFoundError,
    WorkflowDefinitionNotFoundError,
)
from opscore.lifecycle import Lifecycle
from opscore.models import JsonObject, Page
from opscore.runs import Claim, Offer, Run, TaskKey
from opscore.store.base import Store
from opscore.tokens import TaskTokens

log = logging.getLogger(__name__)


def session_id_at(now: datetime) -> str:
    """A UUIDv7 (RFC 9562): milliseconds since the epoch, then random bits. Sessions
    started close together get neighbouring ids, so the indexes on session_id (sessions,
    tasks, their history) grow at one end instead of dirtying random pages."""
    millis = int(now.timestamp() * 1000)
    rand = int.from_bytes(os.urandom(10), "big")  # 80 bits: 12 + 62 used
    value = (millis << 80) | (0x7 << 76) | (((rand >> 62) & 0xFFF) << 64) | (0b10 << 62)
    return str(uuid.UUID(int=value | (rand & ((1 << 62) - 1))))


R = TypeVar("R")


class WorkflowEngine:
    def __init__(
        self, store: Store, clock: Clock, settings: Settings, lifecycle: Lifecycle
    ) -> None:
        self._store = store
        self._clock = clock
        self._settings = settings
        self._lifecycle = lifecycle
        self._rng = random.Random()
        # Definitions by (id, version); version "" is the newest. Dropped on every
        # create or delete of that id.
        self._definitions: dict[tuple[str, str], WorkflowDefinition] = {}
        self._tokens: TaskTokens | None = None
        self.dispatcher = Dispatcher(
            self, lifecycle.ready_for_work, settings.max_task_streams_per_agent
        )
        store.add_commit_listener(self.dispatcher.on_commit)

    async def start(self) -> None:
        """Loads the token key and re-queues attempts leased before a restart (their
        streams died with the old process)."""
        self._tokens = TaskTokens(await self._store.secret("task_tokens"))
        leased = await self._store.leased_tasks()
        if leased:
            log.warning("re-queueing tasks leased before restart", extra={"count": len(leased)})
            await self.requeue(leased, "server restarted", lost=False)

    @property
    def tokens(self) -> TaskTokens:
        assert self._tokens is not None, "engine not started"
        return self._tokens

    # -- definitions -------------------------------------------------------------

    async def create_definition(self, definition: WorkflowDefinition) -> WorkflowDefinition:
        definitions.validate(definition, max_tasks=self._settings.max_tasks_per_definition)
        stamped = dataclasses.replace(definition, created_at=self._clock.now())
        created = await self._store.create_definition(stamped)
        self._forget_definition(definition.id)
        return created

    async def get_definition(self, definition_id: str, version: str) -> WorkflowDefinition:
        found = self._definitions.get((definition_id, version))
        if found is None:
            found = await self._store.get_definition(definition_id, version)
            if found is None:
                raise WorkflowDefinitionNotFoundError(definition_id, version)
            if len(self._definitions) >= 1024:
                self._definitions.clear()
            self._definitions[(definition_id, version)] = found
        return found

    def _forget_definition(self, definition_id: str) -> None:
        for key in [k for k in self._definitions if k[0] == definition_id]:
            del self._definitions[key]

    async def list_definitions(self, page_size: int, page_token: str) -> Page[WorkflowDefinition]:
        size = paging.page_size(page_size)
        cursor = paging.decode(page_token, "definitions")
        after = tuple(cursor.split("\x00", 1)) if cursor else ("", "")
        if len(after) != 2:
            raise InvalidArgumentError.single("page_token", "not a token from this list")
        fetched = await self._store.list_definitions((after[0], after[1]), size + 1)
        return Page(*paging.cut(fetched, size, lambda d: f"{d.id}\x00{d.version}", "definitions"))

    async def delete_definition(self, definition_id: str, version: str) -> None:
        deleted = await self._store.delete_definition(definition_id, version)
        self._forget_definition(definition_id)
        if not deleted:
            raise WorkflowDefinitionNotFoundError(definition_id, version)

    # -- runs --------------------------------------------------------------------

    async def start_workflow(
        self,
        definition: WorkflowDefinition | tuple[str, str],
        input: JsonObject,
        agent_id: str,
        request_id: str,
    ) -> Run:
        """Creates the session and queues its first tasks in one transaction; the same
        request_id returns the first session instead of starting another."""
        if isinstance(definition, WorkflowDefinition):
            definitions.validate(definition, max_tasks=self._settings.max_tasks_per_definition)
            resolved = definition
        else:
            resolved = await self.get_definition(*definition)
        if agent_id:
            agent = await self._lifecycle.get(agent_id)
            missing = {t.agent_capability for t in resolved.tasks} - set(agent.capabilities)
            if missing:
                raise InvalidStateError(
                    f"agent {agent_id} lacks capabilities {sorted(missing)} needed by "
                    f"workflow {resolved.id}; the run could never finish",
                    agent_id=agent_id,
                )
        now = self._clock.now()
        run = Run.start(session_id_at(now), resolved, input, agent_id, request_id, now)
        ready = run.ready_by_capability()
        booked = self.dispatcher.reserve(ready, agent_id)
        eager = None
        if booked is not None:
            stream, task_id = booked
            eager = run.dispatch(task_id, stream.agent_id, now)
        try:
            stored, created = await self._store.create_run(run)
        except BaseException:
            if booked is not None:
                self.dispatcher.settle(booked[0], None)
            raise
        if booked is not None:
            self.dispatcher.settle(booked[0], eager if created else None)
        if created:
            log.debug(
                "session started",
                extra={"session_id": stored.session_id, "workflow_id": resolved.id},
            )
            if run.ready_by_capability():  # ready tasks left for the dispatcher
                self.dispatcher.wake()
        return stored

    async def get_run(self, session_id: str) -> Run:
        run = await self._store.get_run(session_id)
        if run is None:
            raise SessionNotFoundError(session_id)
        return run

    # `caller` is the agent making the call when authentication is on: an agent may
    # only answer attempts given to it.

    async def complete_task(self, token: str, output: JsonObject, caller: str = "") -> None:
        key = self.tokens.read(token)
        now = self._clock.now()

        def change(run: Run) -> None:
            run.check_owner(key, caller)
            run.complete(key, output, now)

        await self._change(key.session_id, change)

    async def fail_task(self, token: str, message: str, retryable: bool, caller: str = "") -> None:
        key = self.tokens.read(token)
        now = self._clock.now()

        def change(run: Run) -> None:
            run.check_owner(key, caller)
            run.fail(key, message, retryable, now, self._rng)

        await self._change(key.session_id, change)

    async def heartbeat_task(self, token: str, caller: str = "") -> tuple[bool, datetime | None]:
        key = self.tokens.read(token)
        now = self._clock.now()

        def change(run: Run) -> tuple[bool, datetime | None]:
            run.check_owner(key, caller)
            return run.heartbeat(key, now)

        return await self._change(key.session_id, change)

    async def cancel(self, session_id: str, reason: str) -> Run:
        now = self._clock.now()
        _, run = await self._store.change_run(session_id, lambda r: r.cancel(reason, now))
        self._notify(run)
        return run

    # -- the queue (used by the dispatcher and the scheduler) ---------------------

    async def claim(self, offers: list[Offer]) -> Claim:
        now = self._clock.now()
        claim = await self._store.claim_tasks(
            offers, now, lambda run, task_id, agent_id: run.dispatch(task_id, agent_id, now)
        )
        for run in claim.runs:
            self._notify(run)
        return claim

    async def requeue(self, keys: Iterable[TaskKey], reason: str, lost: bool) -> None:
        now = self._clock.now()
        await self._change_each(keys, lambda k: _requeuer(k, reason, now, lost))

    async def requeue_agent(self, agent_id: str, reason: str) -> None:
        await self.requeue(await self._store.leased_tasks(agent_id), reason, lost=True)

    async def expire_leases(self) -> int:
        now = self._clock.now()
        expired = await self._store.expired_leases(now)
        await self._change_each(expired, lambda k: _expirer(k, now, self._rng))
        return len(expired)

    async def run_scheduler(self) -> None:
        await every(self._clock, self._settings.scheduler_interval, self.tick)

    async def tick(self) -> None:
        """Expires leases and wakes the dispatcher for retries whose backoff passed."""
        try:
            await self.expire_leases()
        finally:
            self.dispatcher.wake()

    def issue_token(self, key: TaskKey) -> str:
        return self.tokens.issue(key)

    async def _change(self, session_id: str, change: Callable[[Run], R]) -> R:
        result, run = await self._store.change_run(session_id, change)
        self._notify(run)
        return result

    async def _change_each(
        self, keys: Iterable[TaskKey], change: Callable[[TaskKey], Callable[[Run], None]]
    ) -> None:
        """Applies one change per attempt concurrently (they share group commits); a
        session pruned or gone meanwhile is skipped, anything else is logged."""
        keys = list(keys)
        results = await asyncio.gather(
            *(self._change(k.session_id, change(k)) for k in keys), return_exceptions=True
        )
        for key, result in zip(keys, results, strict=True):
            if isinstance(result, Exception) and not isinstance(result, SessionNotFoundError):
                log.error(
                    "task change failed",
                    extra={"session_id": key.session_id, "task_id": key.task_id},
                    exc_info=result,
                )

    def _notify(self, run: Run) -> None:
        if run.released:
            self.dispatcher.release(run.released)
        if run.became_ready:
            self.dispatcher.wake()


def _requeuer(key: TaskKey, reason: str, now: datetime, lost: bool) -> Callable[[Run], None]:
    return lambda run: run.requeue(key.task_id, key.attempt, reason, now, lost)


def _expirer(key: TaskKey, now: datetime, rng: random.Random) -> Callable[[Run], None]:
    return lambda run: run.expire_lease(key.task_id, now, rng)
