"""Helpers for the workflow and session end-to-end tests.

A plain module (tests/e2e is on sys.path while its tests run): definition builders, a
`Harness` bundling the three service stubs of one server, and `AgentConn`, an agent
with an open StreamTasks call whose assignments are pumped into a queue by a
background task (cancelling a grpc.aio read would cancel the whole call, so reads
with a timeout go through the queue instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from opspawn.opscore.v1 import (
    lifecycle_pb2,
    lifecycle_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    workflow_pb2,
    workflow_pb2_grpc,
)

from opscore.domain.clock import FakeClock

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLES = REPO_ROOT / "examples"
READ_TIMEOUT = 5.0
QUIET = 0.3  # real seconds a negative check waits for something that must not happen

S = session_pb2
W = workflow_pb2
ET = session_pb2.SessionEventType
Assignment = workflow_pb2.TaskAssignment


# --------------------------------------------------------------------------- builders


def duration(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.seconds = int(seconds)
    out.nanos = round((seconds - int(seconds)) * 1e9)
    return out


def at(stamp: timestamp_pb2.Timestamp) -> datetime:
    """A Timestamp as an aware UTC datetime."""
    return stamp.ToDatetime(tzinfo=UTC)


def struct(values: dict[str, Any] | None = None, **more: Any) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update({**(values or {}), **more})
    return out


def to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain Python (numbers come back as floats)."""
    from google.protobuf import json_format

    result: dict[str, Any] = json_format.MessageToDict(value)
    return result


def task(
    task_id: str,
    capability: str = "work",
    *,
    depends_on: Iterable[str] = (),
    next_task_id: str = "",
    timeout: float | None = None,
    retry: dict[str, Any] | None = None,
    parameters: dict[str, Any] | None = None,
    name: str = "",
    timeouts: dict[str, float] | None = None,
) -> workflow_pb2.TaskDefinition:
    """A TaskDefinition; `retry` takes max_attempts, backoff_coefficient and
    initial_interval / maximum_interval in seconds, `timeouts` start_to_close,
    heartbeat and schedule_to_start in seconds."""
    out = workflow_pb2.TaskDefinition(
        task_id=task_id,
        name=name or task_id,
        agent_capability=capability,
        depends_on=list(depends_on),
        next_task_id=next_task_id,
    )
    if parameters:
        out.parameters.update(parameters)
    if timeout is not None:
        out.timeout.CopyFrom(duration(timeout))
    for name_, seconds in (timeouts or {}).items():
        getattr(out.timeouts, name_).CopyFrom(duration(seconds))
    if retry is not None:
        policy = out.retry_policy
        policy.SetInParent()
        for key, value in retry.items():
            if key in ("initial_interval", "maximum_interval"):
                getattr(policy, key).CopyFrom(duration(value))
            else:
                setattr(policy, key, value)
    return out


def definition(
    definition_id: str, *tasks: workflow_pb2.TaskDefinition, version: str = "1", **fields: Any
) -> workflow_pb2.WorkflowDefinition:
    fields.setdefault("name", definition_id)
    return workflow_pb2.WorkflowDefinition(
        id=definition_id, version=version, tasks=list(tasks), **fields
    )


def single(definition_id: str = "single", capability: str = "work", **task_fields: Any) -> Any:
    """A one-task workflow (task id "only")."""
    return definition(definition_id, task("only", capability, **task_fields))


def event_types(events: Iterable[session_pb2.SessionEvent]) -> list[str]:
    return [ET.Name(e.type).removeprefix("SESSION_EVENT_TYPE_") for e in events]


def of_type(events: Iterable[session_pb2.SessionEvent], name: str) -> list[Any]:
    wanted = ET.Value(f"SESSION_EVENT_TYPE_{name}")
    return [e for e in events if e.type == wanted]


def task_of(session: session_pb2.Session, task_id: str) -> session_pb2.SessionTask:
    return next(t for t in session.tasks if t.task_id == task_id)


# --------------------------------------------------------------------------- agents


class AgentConn:
    """A registered agent with (usually) an open task stream."""

    def __init__(self, harness: Harness, agent_id: str, max_in_flight: int) -> None:
        self.h = harness
        self.agent_id = agent_id
        self.max_in_flight = max_in_flight
        self.inbox: asyncio.Queue[Assignment] = asyncio.Queue()
        self.received: list[Assignment] = []
        self.call: Any = None
        self.error: grpc.aio.AioRpcError | None = None
        self._pump_task: asyncio.Task[None] | None = None

    async def connect(
        self, max_in_flight: int | None = None, held: Iterable[Assignment] = ()
    ) -> None:
        """Opens StreamTasks (the pump reads it in the background), naming the
        assignments it still works on (`held`) as a reconnecting agent does."""
        if max_in_flight is not None:
            self.max_in_flight = max_in_flight
        self.error = None
        request = W.StreamTasksRequest(
            agent_id=self.agent_id,
            max_in_flight=self.max_in_flight,
            held_task_tokens=[a.task_token for a in held],
        )
        self.call = self.h.workflow.StreamTasks(request)
        self._pump_task = asyncio.create_task(self._pump(self.call))

    async def _pump(self, call: Any) -> None:
        try:
            async for assignment in call:
                self.received.append(assignment)
                self.inbox.put_nowait(assignment)
        except grpc.aio.AioRpcError as err:
            self.error = err
        except asyncio.CancelledError:
            pass

    @property
    def streaming(self) -> bool:
        return self._pump_task is not None and not self._pump_task.done()

    async def disconnect(self) -> None:
        """Cancels the StreamTasks call, as a crashed agent's connection would end."""
        if self.call is not None:
            self.call.cancel()
        if self._pump_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump_task
        self.call = None
        self._pump_task = None

    async def next(self, within: float = READ_TIMEOUT) -> Assignment:
        """The next assignment pushed to this agent; fails after `within` seconds."""
        try:
            return await asyncio.wait_for(self.inbox.get(), within)
        except TimeoutError:
            raise AssertionError(
                f"agent {self.agent_id} got no task within {within}s "
                f"(stream error: {self.error and self.error.code()})"
            ) from None

    async def take(self, count: int, within: float = READ_TIMEOUT) -> list[Assignment]:
        return [await self.next(within) for _ in range(count)]

    async def expect_none(self, within: float = QUIET) -> None:
        """Asserts nothing is pushed to this agent for `within` (real) seconds."""
        try:
            got = await asyncio.wait_for(self.inbox.get(), within)
        except TimeoutError:
            return
        raise AssertionError(f"agent {self.agent_id} unexpectedly got {got.task_id} #{got.attempt}")

    def pending(self) -> int:
        return self.inbox.qsize()

    async def complete(self, a: Assignment, output: dict[str, Any] | None = None) -> None:
        await self.h.workflow.CompleteTask(
            W.CompleteTaskRequest(task_token=a.task_token, output=struct(output or {}))
        )

    async def fail(self, a: Assignment, message: str = "boom", retryable: bool = True) -> None:
        await self.h.workflow.FailTask(
            W.FailTaskRequest(task_token=a.task_token, error_message=message, retryable=retryable)
        )

    async def heartbeat(self, a: Assignment) -> workflow_pb2.HeartbeatTaskResponse:
        return await self.h.workflow.HeartbeatTask(W.HeartbeatTaskRequest(task_token=a.task_token))

    async def set_state(self, state: int) -> None:
        await self.h.lifecycle.UpdateAgentState(
            lifecycle_pb2.UpdateAgentStateRequest(agent_id=self.agent_id, state=state)
        )


# --------------------------------------------------------------------------- harness


class Harness:
    """The stubs of one server plus helpers for runs, sessions and agents."""

    def __init__(self, channel: grpc.aio.Channel, clock: FakeClock | None) -> None:
        self.channel = channel
        self.clock = clock
        self.workflow = workflow_pb2_grpc.WorkflowServiceStub(channel)
        self.sessions = session_pb2_grpc.SessionServiceStub(channel)
        self.lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        self.agents: list[AgentConn] = []

    async def close(self) -> None:
        for agent in self.agents:
            await agent.disconnect()

    # -- agents -------------------------------------------------------------------

    async def agent(
        self,
        agent_id: str,
        capabilities: Iterable[str] = ("work",),
        max_in_flight: int = 1,
        connect: bool = True,
    ) -> AgentConn:
        """Registers an agent and (unless connect=False) opens its stream, waiting until
        the server has made it IDLE."""
        await self.lifecycle.RegisterAgent(
            lifecycle_pb2.RegisterAgentRequest(
                agent_id=agent_id, name=agent_id, capabilities=list(capabilities)
            )
        )
        conn = AgentConn(self, agent_id, max_in_flight)
        self.agents.append(conn)
        if connect:
            await conn.connect()
            await self.wait_agent_state(agent_id, lifecycle_pb2.AGENT_STATE_IDLE)
        return conn

    async def agent_state(self, agent_id: str) -> int:
        got = await self.lifecycle.GetAgent(lifecycle_pb2.GetAgentRequest(agent_id=agent_id))
        return int(got.state)

    async def wait_agent_state(self, agent_id: str, state: int) -> None:
        async def check() -> bool:
            return await self.agent_state(agent_id) == state

        await eventually(check, message=f"agent {agent_id} in state {state}")

    # -- definitions and runs -----------------------------------------------------

    async def define(
        self, defn: workflow_pb2.WorkflowDefinition
    ) -> workflow_pb2.WorkflowDefinition:
        return await self.workflow.CreateWorkflowDefinition(
            W.CreateWorkflowDefinitionRequest(definition=defn)
        )

    async def start(
        self,
        source: str | workflow_pb2.WorkflowDefinition,
        input: dict[str, Any] | None = None,
        **fields: Any,
    ) -> session_pb2.Session:
        """StartWorkflow from a stored definition id or an inline definition."""
        request = W.StartWorkflowRequest(input=struct(input or {}), **fields)
        if isinstance(source, str):
            request.workflow_definition_id = source
        else:
            request.definition.CopyFrom(source)
        return await self.workflow.StartWorkflow(request)

    async def session(self, session_id: str) -> session_pb2.Session:
        return await self.sessions.GetSession(S.GetSessionRequest(session_id=session_id))

    async def events(self, session_id: str, page_size: int = 0) -> list[S.SessionEvent]:
        """The whole history, following page tokens."""
        out: list[S.SessionEvent] = []
        token = ""
        while True:
            page = await self.sessions.ListSessionEvents(
                S.ListSessionEventsRequest(
                    session_id=session_id, page_size=page_size, page_token=token
                )
            )
            out.extend(page.events)
            token = page.next_page_token
            if not token:
                return out

    async def list_all(self, page_size: int = 0, **filters: Any) -> list[S.Session]:
        out: list[S.Session] = []
        token = ""
        while True:
            page = await self.sessions.ListSessions(
                S.ListSessionsRequest(page_size=page_size, page_token=token, **filters)
            )
            out.extend(page.sessions)
            token = page.next_page_token
            if not token:
                return out

    async def wait_status(self, session_id: str, status: int, within: float = 3.0) -> S.Session:
        """Polls GetSession until the session has `status`; returns it."""
        found: list[S.Session] = []

        async def check() -> bool:
            found[:] = [await self.session(session_id)]
            return found[0].status == status

        await eventually(
            check, within, f"session {session_id} status {S.SessionStatus.Name(status)}"
        )
        return found[0]

    async def wait_event(
        self, session_id: str, name: str, count: int = 1, within: float = 3.0
    ) -> list[S.SessionEvent]:
        """Polls the history until it holds `count` events of type `name`."""
        history: list[S.SessionEvent] = []

        async def check() -> bool:
            history[:] = await self.events(session_id)
            return len(of_type(history, name)) >= count

        await eventually(check, within, f"{count} {name} event(s) in {session_id}")
        return history

    # -- the fake clock -------------------------------------------------------------

    async def tick(self, seconds: float, step: float = 0.5) -> None:
        """Moves the fake clock forward in `step`s, letting background jobs (scheduler,
        dispatcher) run between steps."""
        assert self.clock is not None
        moved = 0.0
        while moved + step <= seconds + 1e-9:
            await self.clock.advance(step)
            moved += step
            await asyncio.sleep(0.01)
        if seconds - moved > 1e-9:
            await self.clock.advance(seconds - moved)
            await asyncio.sleep(0.01)

    async def tick_until(
        self,
        check: Callable[[], Awaitable[bool] | bool],
        limit: float,
        step: float = 0.5,
        settle: float = 0.1,
    ) -> float:
        """Advances the fake clock `step` at a time until `check` holds (polling it for a
        `settle` real seconds after each step); returns the total advance."""
        assert self.clock is not None
        moved = 0.0
        while moved < limit:
            await self.clock.advance(step)
            moved += step
            deadline = time.monotonic() + settle
            while True:
                result = check()
                if not isinstance(result, bool):
                    result = await result
                if result:
                    return moved
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.005)
        raise AssertionError(f"condition did not hold after advancing the clock {moved}s")


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float = 3.0, message: str = "condition"
) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} did not hold within {within}s")
        await asyncio.sleep(0.01)
