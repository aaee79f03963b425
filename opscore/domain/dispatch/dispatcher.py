"""Live dispatch: connected agents' task streams, their free slots, and the loop that
fills those slots from the durable queue.

Nothing here polls: the loop sleeps until woken by new ready work, a freed slot, a
new stream or an agent state change (plus the scheduler's periodic wake for retries
whose backoff has passed). The queue itself lives in the store; this module only
holds what a restart forgets anyway (open streams), so a crash loses nothing.

An open stream is the agent's presence: it counts as contact while it stays open.
When an agent's last stream closes, its attempts stay leased and it has a short
grace to open a new one, which takes over those it names (held_task_tokens); after
the grace it is lost (OFFLINE).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from opscore.domain.agents.model import Agent, AgentEvent, Presence
from opscore.domain.clock import Clock
from opscore.domain.dispatch.matching import Claim, Offer
from opscore.domain.dispatch.streams import TaskStream
from opscore.domain.workflows.session import Assignment, Session, TaskKey
from opscore.protocol.enums import AgentEventType, AgentState, WaitingReason
from opscore.protocol.errors import AgentNotFoundError, ResourceLimitError, ShuttingDownError
from opscore.store.failures import log_failure

log = logging.getLogger(__name__)

# Agents in these states receive work (BUSY ones only into free max_in_flight slots).
DISPATCHABLE = frozenset({AgentState.IDLE, AgentState.BUSY})
UNDELIVERED = "agent disconnected before delivery"
NOT_HELD = "agent reconnected without it"


class Queue(Protocol):
    """What the dispatcher needs of the task queue (`TaskQueue`)."""

    async def claim(self, offers: list[Offer]) -> Claim: ...

    async def requeue(self, keys: Iterable[TaskKey], reason: str) -> list[Session]: ...

    async def undeliver(self, keys: Iterable[TaskKey], reason: str) -> list[Session]: ...

    async def requeue_agent(self, agent_id: str, reason: str) -> list[Session]: ...

    async def leased(self, agent_id: str) -> list[TaskKey]: ...


@dataclass(frozen=True)
class DispatchConfig:
    max_streams_per_agent: int
    # Seconds an agent whose last stream closed has to open a new one before it is
    # marked OFFLINE (its leased attempts are kept for it meanwhile).
    stream_grace: float


class Dispatcher:
    def __init__(
        self,
        queue: Queue,
        clock: Clock,
        ready_for_work: Callable[[str], Awaitable[Agent]],
        stream_lost: Callable[[str], Awaitable[object]],
        config: DispatchConfig,
    ) -> None:
        """`ready_for_work` makes a connecting agent IDLE; `stream_lost` marks an agent
        OFFLINE whose grace ran out with no stream open."""
        self._queue = queue
        self._clock = clock
        self._max_streams_per_agent = config.max_streams_per_agent
        self._grace = config.stream_grace
        self._ready_for_work = ready_for_work
        self._stream_lost = stream_lost
        self._streams: dict[str, list[TaskStream]] = {}
        self._agents: dict[str, Agent] = {}
        self._holders: dict[TaskKey, TaskStream] = {}
        # Streams being opened, per agent (they count as presence already).
        self._opening: dict[str, list[TaskStream]] = {}
        # When each agent's last stream closed; the grace timers still running.
        self._last_seen: dict[str, datetime] = {}
        self._graces: dict[str, asyncio.Task[None]] = {}
        # Keys released while a connecting stream reads what its agent holds: not
        # adopted (their attempts ended meanwhile).
        self._adopting: list[set[TaskKey]] = []
        self._wake = asyncio.Event()
        # Capabilities known to have nothing claimable, and the count of new-work
        # wake-ups that invalidate that knowledge.
        self._exhausted: set[str] = set()
        self._work_generation = 0
        self._rotation = 0
        self._background: set[asyncio.Task[Any]] = set()
        self._closed = False

    # -- streams -----------------------------------------------------------------

    async def connect(
        self, agent_id: str, max_in_flight: int, held: Collection[TaskKey] = ()
    ) -> TaskStream:
        """Opens a task stream; an INITIALIZING or OFFLINE agent becomes IDLE. After a
        reconnect or a server restart, the stream takes over the attempts of `held`
        (those the agent says it still runs) that the store says it holds, so their
        answers free its slots (while they exceed max_in_flight it has no free slot);
        the agent's other leased attempts that no open stream of its holds never
        reached it and go back to the queue under the same attempt number."""
        if self._closed:
            raise ShuttingDownError("server is shutting down")
        opening = self._opening.setdefault(agent_id, [])
        if len(self._streams.get(agent_id, ())) + len(opening) >= self._max_streams_per_agent:
            if not opening:
                del self._opening[agent_id]
            raise ResourceLimitError(
                f"agent {agent_id} already has {self._max_streams_per_agent} task streams open",
                agent_id=agent_id,
            )
        grace = self._graces.pop(agent_id, None)
        if grace is not None:
            grace.cancel()
        stream = TaskStream(agent_id, max_in_flight)
        wanted = set(held)
        stream.reserved = len(wanted)  # while it opens, the slots it is about to adopt
        opening.append(stream)
        released: set[TaskKey] = set()
        self._adopting.append(released)
        opened = False
        try:
            leased = await self._queue.leased(agent_id)
            agent = await self._ready_for_work(agent_id)
            if self._closed:
                raise ShuttingDownError("server is shutting down")
            opened = True
        finally:
            self._adopting.remove(released)
            opening.remove(stream)
            if not opening:
                del self._opening[agent_id]
            stream.reserved = 0
            absent = agent_id in self._last_seen and not self.presence(agent_id).connected
            if not opened and absent and agent_id not in self._graces:
                self._start_grace(agent_id)  # as lost as before this attempt
        taken_back: list[TaskKey] = []
        for key in leased:
            if key in released:
                continue  # ended meanwhile
            if key in wanted:
                self._hold(stream, key)
            elif key not in self._holders:
                taken_back.append(key)
        self._streams.setdefault(agent_id, []).append(stream)
        self._agents[agent_id] = agent
        log.info(
            "task stream opened",
            extra={
                "agent_id": agent_id,
                "max_in_flight": max_in_flight,
                "adopted": len(stream.in_flight),
                "taken_back": len(taken_back),
            },
        )
        if taken_back:
            self._spawn(self._queue.undeliver(taken_back, NOT_HELD))
        self.wake()
        return stream

    def disconnect(self, stream: TaskStream) -> None:
        """Forgets the stream. What it held stays leased to the agent: another open
        stream of its takes it over, else a new one adopts it; the agent going OFFLINE
        (no stream within the grace) or the lease running out re-queues it."""
        agent_id = stream.agent_id
        streams = self._streams.get(agent_id, [])
        if stream in streams:
            streams.remove(stream)
        deregistered = isinstance(stream.closed, AgentNotFoundError)
        if not streams:
            self._streams.pop(agent_id, None)
            self._agents.pop(agent_id, None)
            if not deregistered:
                self._last_seen[agent_id] = self._clock.now()
                if not self._opening.get(agent_id):
                    self._start_grace(agent_id)
        stream.close(ShuttingDownError("stream closed"))
        log.info("task stream closed", extra={"agent_id": agent_id, "held": len(stream.in_flight)})
        for key in list(stream.in_flight):
            if self._holders.get(key) is not stream:
                continue
            if streams:
                self._hold(streams[0], key)
            else:
                del self._holders[key]
        stream.in_flight.clear()

    def _start_grace(self, agent_id: str) -> None:
        """The agent has no stream open: it is lost unless it opens one in time (a
        server shutting down loses nobody: their leases wait for the restart)."""
        if self._closed:
            return

        async def expire() -> None:
            await self._clock.sleep(self._grace)
            if self._graces.get(agent_id) is task:
                del self._graces[agent_id]
            if self.presence(agent_id).connected:
                return
            log.warning("agent lost: no task stream", extra={"agent_id": agent_id})
            try:
                await self._stream_lost(agent_id)
            except Exception:
                log.exception("marking a lost agent offline failed", extra={"agent_id": agent_id})

        task = asyncio.create_task(expire())
        self._graces[agent_id] = task
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def presence(self, agent_id: str) -> Presence:
        """The agent as its streams show it now (a stream being opened counts)."""
        streams = self._streams.get(agent_id, []) + self._opening.get(agent_id, [])
        if streams:
            free = sum(max(0, s.free_slots()) for s in streams if s.closed is None)
            return Presence(connected=True, free_slots=free, last_contact_at=self._clock.now())
        return Presence(
            connected=False, free_slots=0, last_contact_at=self._last_seen.get(agent_id)
        )

    def follow(self, sessions: Iterable[Session]) -> None:
        """After sessions changed: frees the slots of attempts that ended, and wakes
        the loop when tasks became ready."""
        for session in sessions:
            if session.released:
                self.release(session.released)
            if session.became_ready:
                self.wake()

    def release(self, keys: Iterable[TaskKey]) -> None:
        """Frees the slots of attempts that ended (completed, failed, expired...)."""
        for key in keys:
            for adopting in self._adopting:
                adopting.add(key)
            stream = self._holders.pop(key, None)
            if stream is not None:
                stream.in_flight.discard(key)
                agent = self._agents.get(stream.agent_id)
                if agent is not None and not set(agent.capabilities) <= self._exhausted:
                    self._wake.set()  # this slot may fit work still waiting

    def on_commit(self, events: list[Any]) -> None:
        """Follows agent state: eligibility, capabilities, and lost agents' tasks."""
        for event in events:
            if not isinstance(event, AgentEvent) or event.agent is None:
                continue
            agent_id = event.agent.agent_id
            if event.type in (AgentEventType.DEREGISTERED, AgentEventType.OFFLINE):
                why = "deregistered" if event.type is AgentEventType.DEREGISTERED else "offline"
                self._spawn(self._queue.requeue_agent(agent_id, f"agent {why}"))
            if event.type is AgentEventType.DEREGISTERED:
                for stream in list(self._streams.get(agent_id, [])):
                    stream.close(AgentNotFoundError(agent_id))
                grace = self._graces.pop(agent_id, None)
                if grace is not None:
                    grace.cancel()
                self._last_seen.pop(agent_id, None)
            elif agent_id in self._agents:
                self._agents[agent_id] = event.agent
                self.wake()

    def waiting_reason(self, capability: str, pinned: str) -> tuple[WaitingReason, str]:
        """Why a ready task needing `capability` (on agent `pinned`, when set) may not
        be taken, as the open streams show it now."""
        capable = [
            (agent_id, streams)
            for agent_id, streams in self._streams.items()
            if (not pinned or agent_id == pinned)
            and capability in self._agents[agent_id].capabilities
            and self._agents[agent_id].state in DISPATCHABLE
        ]
        if not capable:
            if pinned:
                message = f"the session's agent {pinned!r} is not connected or takes no work"
            else:
                message = f"no connected agent with capability {capability!r} takes work"
            return WaitingReason.NO_CAPABLE_AGENT, message
        if any(s.closed is None and s.free_slots() > 0 for _, streams in capable for s in streams):
            return WaitingReason.DISPATCHING, "a capable agent has a free slot"
        return (
            WaitingReason.AGENTS_BUSY,
            f"all {len(capable)} connected agents with capability {capability!r} are busy",
        )

    # -- eager dispatch ------------------------------------------------------------

    def reserve(self, ready: dict[str, str], pinned: str) -> tuple[TaskStream, str] | None:
        """Books a free slot for one of a new session's ready tasks (`ready`: capability ->
        task_id), so the task is dispatched in the transaction that creates the session
        instead of one commit later. Returns the stream and the task it should take."""
        streams = list(self._streams.items())
        self._rotation = (self._rotation + 1) % max(1, len(streams))
        for agent_id, agent_streams in streams[self._rotation :] + streams[: self._rotation]:
            if pinned and agent_id != pinned:
                continue
            agent = self._agents[agent_id]
            if agent.state not in DISPATCHABLE:
                continue
            task_id = next((ready[c] for c in agent.capabilities if c in ready), None)
            if task_id is None:
                continue
            for stream in agent_streams:
                if stream.closed is None and stream.free_slots() > 0:
                    stream.reserved += 1
                    return stream, task_id
        return None

    def settle(self, stream: TaskStream, assignment: Assignment | None) -> None:
        """Ends a reservation: delivers the committed assignment, or frees the slot."""
        stream.reserved -= 1
        if assignment is None:
            self._wake.set()
        elif stream.closed is not None:
            self._spawn(self._queue.undeliver([assignment.key], UNDELIVERED))
        else:
            self._deliver(stream, assignment)

    def _deliver(self, stream: TaskStream, assignment: Assignment) -> None:
        self._hold(stream, assignment.key)
        stream.push(assignment)

    def _hold(self, stream: TaskStream, key: TaskKey) -> None:
        """`stream` holds the attempt's slot (and no other stream does)."""
        previous = self._holders.get(key)
        if previous is not None and previous is not stream:
            previous.in_flight.discard(key)
        stream.in_flight.add(key)
        self._holders[key] = stream

    # -- the loop ----------------------------------------------------------------

    def wake(self) -> None:
        """New work may be claimable (ready tasks, new streams, agent changes)."""
        self._work_generation += 1
        self._exhausted.clear()
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._fill_free_slots()
            except Exception as exc:
                log_failure(log, "dispatch pass failed", exc)

    async def _fill_free_slots(self) -> None:
        offers: list[Offer] = []
        targets: list[TaskStream] = []
        for agent_id, streams in self._streams.items():
            agent = self._agents[agent_id]
            if agent.state not in DISPATCHABLE:
                continue
            for stream in streams:
                if stream.closed is None and stream.free_slots() > 0:
                    offers.append(Offer(agent_id, agent.capabilities, stream.free_slots()))
                    targets.append(stream)
        if not offers:
            return
        generation = self._work_generation
        claim = await self._queue.claim(offers)
        if generation == self._work_generation:
            self._exhausted |= claim.exhausted
        self.follow(claim.sessions)
        orphans: list[TaskKey] = []
        for index, assignment in claim.assignments:
            stream = targets[index]
            if stream.closed is not None:
                orphans.append(assignment.key)
                continue
            self._deliver(stream, assignment)
        if orphans:
            self.follow(await self._queue.undeliver(orphans, UNDELIVERED))

    def _spawn(self, job: Awaitable[list[Session]]) -> None:
        """Runs a queue change in the background, then follows what it changed."""

        async def guarded() -> None:
            try:
                self.follow(await job)
            except Exception as exc:
                log_failure(log, "dispatch background job failed", exc)

        task = asyncio.create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Ends every task stream (server shutdown); leases are recovered at restart."""
        self._closed = True
        for grace in self._graces.values():
            grace.cancel()
        self._graces.clear()
        for streams in self._streams.values():
            for stream in streams:
                stream.close(ShuttingDownError("server is shutting down; reconnect"))
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
