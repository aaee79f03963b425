"""The workflow engine: definitions, starting sessions, and every answer about a task
attempt. Each change is one store transaction on the session's aggregate (through the
task queue); afterwards the dispatcher is told which slots were freed and whether new
work became ready."""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from opscore.domain import paging
from opscore.domain.agents.registry import AgentRegistry
from opscore.domain.clock import Clock
from opscore.domain.dispatch.dispatcher import Dispatcher
from opscore.domain.paging import Page
from opscore.domain.workflows import definitions
from opscore.domain.workflows.definitions import WorkflowDefinition
from opscore.domain.workflows.queue import TaskQueue
from opscore.domain.workflows.session import Assignment, Session
from opscore.domain.workflows.tokens import TaskTokens
from opscore.protocol.enums import WaitingReason
from opscore.protocol.errors import (
    InvalidArgumentError,
    InvalidStateError,
    WorkflowDefinitionNotFoundError,
)
from opscore.protocol.values import JsonObject
from opscore.store.base import Store

log = logging.getLogger(__name__)

R = TypeVar("R")
DEFINITION_CACHE_SIZE = 1024
# A session's definition: given whole, or named by (id, version; "" for the newest).
DefinitionSource = WorkflowDefinition | tuple[str, str]


def session_id_at(now: datetime) -> str:
    """A UUIDv7 (RFC 9562): milliseconds since the epoch, then random bits. Sessions
    started close together get neighbouring ids, so the indexes on session_id (sessions,
    tasks, their history) grow at one end instead of dirtying random pages."""
    millis = int(now.timestamp() * 1000)
    rand = int.from_bytes(os.urandom(10), "big")  # 80 bits: 12 + 62 used
    value = (millis << 80) | (0x7 << 76) | (((rand >> 62) & 0xFFF) << 64) | (0b10 << 62)
    return str(uuid.UUID(int=value | (rand & ((1 << 62) - 1))))


@dataclass(frozen=True)
class WorkflowsConfig:
    max_tasks_per_definition: int
    # How often leases are checked and due retries woken.
    scheduler_interval: float


class WorkflowEngine:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        config: WorkflowsConfig,
        agents: AgentRegistry,
        queue: TaskQueue,
        dispatcher: Dispatcher,
    ) -> None:
        self._store = store
        self._clock = clock
        self.config = config
        self._agents = agents
        self._queue = queue
        self._dispatcher = dispatcher
        # Definitions by (id, version); version "" is the newest. Dropped on every
        # create or delete of that id.
        self._definitions: dict[tuple[str, str], WorkflowDefinition] = {}
        self._tokens: TaskTokens | None = None

    async def start(self) -> None:
        """Loads the token key. Attempts leased before a restart keep their leases: their
        agents may still be working and answer within them (or reconnect and heartbeat);
        an attempt whose agent does not come back times out like any other."""
        self._tokens = TaskTokens(await self._store.secret("task_tokens"))

    @property
    def tokens(self) -> TaskTokens:
        assert self._tokens is not None, "engine not started"
        return self._tokens

    # -- definitions -------------------------------------------------------------

    async def create_definition(self, definition: WorkflowDefinition) -> WorkflowDefinition:
        definitions.validate(definition, max_tasks=self.config.max_tasks_per_definition)
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
            if len(self._definitions) >= DEFINITION_CACHE_SIZE:
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

    # -- sessions ----------------------------------------------------------------

    async def start_session(
        self,
        definition: DefinitionSource,
        input: JsonObject,
        agent_id: str,
        request_id: str,
    ) -> Session:
        """Creates the session and queues its first tasks in one transaction; the same
        request_id returns the first session instead of starting another."""
        if isinstance(definition, WorkflowDefinition):
            definitions.validate(definition, max_tasks=self.config.max_tasks_per_definition)
            resolved = definition
        else:
            resolved = await self.get_definition(*definition)
        if agent_id:
            agent = await self._agents.get(agent_id)
            missing = {t.agent_capability for t in resolved.tasks} - set(agent.capabilities)
            if missing:
                raise InvalidStateError(
                    f"agent {agent_id} lacks capabilities {sorted(missing)} needed by "
                    f"workflow {resolved.id}; the session could never finish",
                    agent_id=agent_id,
                )
        now = self._clock.now()
        session = Session.start(session_id_at(now), resolved, input, agent_id, request_id, now)
        booked = self._dispatcher.reserve(session.ready_by_capability(), agent_id)
        eager = None
        if booked is not None:
            stream, task_id = booked
            eager = session.dispatch(task_id, stream.agent_id, now)
        session.note_waiting(self._queue.explain)
        try:
            stored, created = await self._store.create_session(session)
        except BaseException:
            if booked is not None:
                self._dispatcher.settle(booked[0], None)
            raise
        if booked is not None:
            self._dispatcher.settle(booked[0], eager if created else None)
        if created:
            log.debug(
                "session started",
                extra={"session_id": stored.session_id, "workflow_id": resolved.id},
            )
            if session.ready_by_capability():  # ready tasks left for the dispatcher
                self._dispatcher.wake()
        return stored

    async def cancel(self, session_id: str, reason: str) -> Session:
        now = self._clock.now()
        _, session = await self._queue.change(session_id, lambda s: s.cancel(reason, now))
        self._dispatcher.follow([session])
        return session

    # -- task attempts -----------------------------------------------------------

    async def serve_tasks(
        self, agent_id: str, max_in_flight: int, held_tokens: tuple[str, ...] = ()
    ) -> AsyncIterator[tuple[Assignment, str]]:
        """An agent's task stream: each assignment with its task token, until the
        stream is closed; what it still holds then stays leased to the agent. The
        stream takes over the attempts of `held_tokens` (see Dispatcher.connect)."""
        held = [
            self.tokens.read(token, f"held_task_tokens[{i}]") for i, token in enumerate(held_tokens)
        ]
        stream = await self._dispatcher.connect(agent_id, max_in_flight, held)
        try:
            while True:
                assignment = await stream.next()
                yield assignment, self.tokens.issue(assignment.key)
        finally:
            self._dispatcher.disconnect(stream)

    # `caller` is the agent making the call when authentication is on: an agent may
    # only answer attempts given to it.

    async def complete_task(self, token: str, output: JsonObject, caller: str = "") -> None:
        key = self.tokens.read(token)
        now = self._clock.now()

        def change(session: Session) -> None:
            session.check_owner(key, caller)
            session.complete(key, output, now, self._queue.rng)

        await self._change(key.session_id, change)

    async def fail_task(self, token: str, message: str, retryable: bool, caller: str = "") -> None:
        key = self.tokens.read(token)
        now = self._clock.now()

        def change(session: Session) -> None:
            session.check_owner(key, caller)
            session.fail(key, message, retryable, now, self._queue.rng)

        await self._change(key.session_id, change)

    async def heartbeat_task(self, token: str, caller: str = "") -> tuple[bool, datetime | None]:
        key = self.tokens.read(token)
        now = self._clock.now()

        def change(session: Session) -> tuple[bool, datetime | None]:
            session.check_owner(key, caller)
            return session.heartbeat(key, now, self._queue.rng)

        return await self._change(key.session_id, change)

    async def tick(self) -> None:
        """The scheduler's job: ends what ran out of time and wakes the dispatcher for
        retries whose backoff has passed."""
        try:
            self._dispatcher.follow(await self._queue.time_out())
        finally:
            self._dispatcher.wake()

    async def _change(self, session_id: str, change: Callable[[Session], R]) -> R:
        """One answer's transaction; a refused answer is raised once the transaction
        that recorded the refusal (and any timeout) has committed."""
        result, session = await self._queue.change(session_id, change)
        self._dispatcher.follow([session])
        if session.refusal is not None:
            raise session.refusal
        return result

    def waiting(self, session: Session) -> dict[str, tuple[WaitingReason, str]]:
        """Why each task of the session waits, now (UNSPECIFIED: it does not)."""
        now = self._clock.now()
        return {
            task_id: task.waiting_at(now)
            or self._dispatcher.waiting_reason(task.spec.agent_capability, session.agent_id)
            for task_id, task in session.tasks.items()
        }
