"""Agent: a worker that runs task handlers for Ops-Core.

    agent = Agent("127.0.0.1:50051", agent_id="summarizer-1")

    @agent.handler("summarize")
    async def summarize(ctx: TaskContext) -> dict[str, Any]:
        return {"summary": ctx.input["doc"][:100]}

    agent.run_sync()  # until SIGTERM/SIGINT, then drains

The worker registers, reports IDLE, heartbeats, takes tasks from its StreamTasks
stream, keeps each task's lease alive, reports results, and reconnects (registering
again) whenever the server goes away. On stop it reports DRAINING so the server
sends nothing new, lets in-flight tasks finish, and only then closes its stream
(closing earlier would make the server re-queue the tasks it still holds).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import signal
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from opscore.protocol.enums import AgentState
from opscore.protocol.errors import (
    NotFoundError,
    OpsCoreError,
    ShuttingDownError,
    StorageError,
    TaskDispatchError,
)
from opscore.protocol.limits import MAX_ERROR_MESSAGE_LENGTH
from opscore.protocol.values import JsonObject
from opscore.sdk import types
from opscore.sdk.client import OpsCoreClient, backoff_delay
from opscore.sdk.errors import DeadlineExceededError, NonRetryableError, UnavailableError

log = logging.getLogger(__name__)

# Errors after which the worker reconnects (and registers again).
_RECONNECT = (
    UnavailableError,
    DeadlineExceededError,
    ShuttingDownError,
    StorageError,
    NotFoundError,
)
DEFAULT_LEASE = 60.0
MIN_LEASE_HEARTBEAT = 0.05

HandlerFn = Callable[["TaskContext"], Any]
H = TypeVar("H", bound=HandlerFn)


class TaskContext:
    """What a handler gets: one task attempt's payload, and its cancellation."""

    def __init__(self, assignment: types.TaskAssignment, client: OpsCoreClient) -> None:
        self.assignment = assignment
        self.deadline = assignment.deadline
        self._client = client
        self._cancel_requested = False

    @property
    def task_id(self) -> str:
        return self.assignment.task_id

    @property
    def session_id(self) -> str:
        return self.assignment.session_id

    @property
    def attempt(self) -> int:
        return self.assignment.attempt

    @property
    def payload(self) -> JsonObject:
        return self.assignment.payload

    @property
    def parameters(self) -> JsonObject:
        return self.assignment.parameters

    @property
    def input(self) -> JsonObject:
        return self.assignment.input

    @property
    def upstream(self) -> JsonObject:
        return self.assignment.upstream

    @property
    def cancel_requested(self) -> bool:
        """True once the session was cancelled (or the attempt was taken away): stop
        working; a result would be refused. Async handlers are also cancelled."""
        return self._cancel_requested

    def _mark_cancelled(self) -> None:
        self._cancel_requested = True

    async def heartbeat(self) -> bool:
        """Extends the lease now (the worker also does so every third of the lease);
        returns cancel_requested."""
        beat = await self._client.heartbeat_task(self.assignment.task_token)
        if beat.deadline is not None:
            self.deadline = beat.deadline
        if beat.cancel_requested:
            self._cancel_requested = True
        return self._cancel_requested


class Agent:
    """A worker process for one agent_id; see the module docstring."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        agent_id: str = "",
        name: str = "",
        capabilities: Iterable[str] | None = None,
        max_in_flight: int = 1,
        heartbeat_interval: float | None = None,
        deregister_on_stop: bool = False,
        version: str = "",
        metadata: dict[str, str] | None = None,
        timeout: float = 10.0,
        token: str | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
    ) -> None:
        self.address = address
        # This agent's token (issued when an operator registered it) and TLS files.
        self._credentials: dict[str, Any] = {
            "token": token,
            "tls_ca": tls_ca,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
        }
        self.agent_id = agent_id or f"agent-{uuid.uuid4().hex[:12]}"
        self.name = name or self.agent_id
        self.max_in_flight = max_in_flight
        self.heartbeat_interval = heartbeat_interval
        self.deregister_on_stop = deregister_on_stop
        self.version = version
        self.metadata = dict(metadata or {})
        self.timeout = timeout
        self._capabilities = list(capabilities) if capabilities is not None else None
        self._handlers: dict[str, HandlerFn] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._clock_offset = timedelta(0)
        self._failures = 0
        self._stop_requested = False
        self._stop_event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def capabilities(self) -> list[str]:
        """As given, or else the capabilities of the registered handlers."""
        return list(self._handlers) if self._capabilities is None else self._capabilities

    def handler(self, capability: str) -> Callable[[H], H]:
        """Registers the decorated function for tasks of `capability`. Async functions
        run on the event loop; plain ones in a thread, so they may block."""

        def register(fn: H) -> H:
            self._handlers[capability] = fn
            return fn

        return register

    def stop(self) -> None:
        """Asks a running worker to drain and stop; safe from any thread or signal."""
        self._stop_requested = True
        if self._loop is not None and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)

    def run_sync(self) -> None:
        """Runs until SIGTERM or SIGINT (or stop()), then drains."""
        asyncio.run(self.run_forever())

    async def run_forever(self) -> None:
        """`run()` with SIGTERM and SIGINT wired to stop()."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, self.stop)
        try:
            await self.run()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    async def run(self) -> None:
        """Works until stop(): connects, reconnects with backoff when the server goes
        away, and on stop drains, then deregisters (deregister_on_stop) or reports IDLE."""
        if not self.capabilities:
            raise ValueError("the agent has no capabilities: register a handler first")
        self._loop = asyncio.get_running_loop()
        stop = self._stop_event = asyncio.Event()
        if self._stop_requested:
            stop.set()
        async with OpsCoreClient(self.address, timeout=self.timeout, **self._credentials) as client:
            while not stop.is_set():
                try:
                    await self._serve(client, stop)
                except _RECONNECT as exc:
                    log.warning(
                        "connection to ops-core lost; reconnecting",
                        extra={"agent_id": self.agent_id, "error": str(exc)},
                    )
                    await self._abandon_in_flight()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff_delay(self._failures))
                    self._failures += 1
            await self._leave(client)

    # -- one connection ------------------------------------------------------------

    async def _serve(self, client: OpsCoreClient, stop: asyncio.Event) -> None:
        """Registers and works until stop (then drains) or until the connection fails."""
        await client.register_agent(
            self.name,
            self.capabilities,
            agent_id=self.agent_id,
            version=self.version,
            metadata=self.metadata,
        )
        self._failures = 0
        await client.update_agent_state(self.agent_id, AgentState.IDLE)
        interval = await self._heartbeat(client)
        workers = [
            asyncio.create_task(self._heartbeat_loop(client, interval)),
            asyncio.create_task(self._receive(client)),
        ]
        stopped = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([*workers, stopped], return_when=asyncio.FIRST_COMPLETED)
            if stopped in done:
                await self._drain(client)
                return
            for task in done:
                task.result()
            raise UnavailableError("task stream ended")
        finally:
            for task in (*workers, stopped):
                task.cancel()
            await asyncio.gather(*workers, stopped, return_exceptions=True)

    async def _heartbeat(self, client: OpsCoreClient) -> float:
        """Heartbeats; learns the server's clock (leases are in its time) and the
        heartbeat interval (half the liveness timeout unless configured)."""
        beat = await client.heartbeat(self.agent_id)
        self._clock_offset = beat.server_time - datetime.now(UTC)
        return self.heartbeat_interval or beat.liveness_timeout / 2

    async def _heartbeat_loop(self, client: OpsCoreClient, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._heartbeat(client)

    async def _receive(self, client: OpsCoreClient) -> None:
        async for assignment in client.stream_tasks(self.agent_id, self.max_in_flight):
            token = assignment.task_token
            task = asyncio.create_task(self._execute(client, assignment))
            self._running[token] = task
            task.add_done_callback(functools.partial(self._forget, token))

    def _forget(self, token: str, _: asyncio.Task[None]) -> None:
        self._running.pop(token, None)

    async def _drain(self, client: OpsCoreClient) -> None:
        """DRAINING first, so no new task is sent, then let in-flight tasks finish while
        the stream (which holds them) stays open."""
        log.info("draining", extra={"agent_id": self.agent_id, "in_flight": len(self._running)})
        try:
            await client.update_agent_state(self.agent_id, AgentState.DRAINING)
        except OpsCoreError as exc:
            log.warning("could not report DRAINING", extra={"error": str(exc)})
        while self._running:
            await asyncio.wait(list(self._running.values()))

    async def _abandon_in_flight(self) -> None:
        """The server re-queues what a lost stream held: results would be refused."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _leave(self, client: OpsCoreClient) -> None:
        try:
            if self.deregister_on_stop:
                await client.deregister_agent(self.agent_id)
            else:
                await client.update_agent_state(self.agent_id, AgentState.IDLE)
        except OpsCoreError as exc:
            log.warning("could not sign off", extra={"agent_id": self.agent_id, "error": str(exc)})

    # -- one task ------------------------------------------------------------------

    async def _execute(self, client: OpsCoreClient, assignment: types.TaskAssignment) -> None:
        token = assignment.task_token
        handler = self._handlers.get(assignment.agent_capability)
        if handler is None:
            message = f"agent {self.agent_id} has no handler for {assignment.agent_capability!r}"
            await self._report(client.fail_task(token, message, retryable=True))
            return
        ctx = TaskContext(assignment, client)
        work = asyncio.current_task()
        assert work is not None
        keeper = asyncio.create_task(self._keep_lease(ctx, work))
        try:
            try:
                result = await self._invoke(handler, ctx)
            finally:
                keeper.cancel()
        except asyncio.CancelledError:
            if not ctx.cancel_requested:
                raise
            work.uncancel()
            log.info("task cancelled", extra={"task_id": ctx.task_id, "session_id": ctx.session_id})
        except NonRetryableError as exc:
            await self._report(client.fail_task(token, _describe(exc), retryable=False))
        except Exception as exc:
            log.warning("task handler failed", exc_info=exc, extra={"task_id": ctx.task_id})
            await self._report(client.fail_task(token, _describe(exc), retryable=True))
        else:
            output = result if isinstance(result, dict) else {"result": result}
            await self._report(client.complete_task(token, output))

    @staticmethod
    async def _invoke(handler: HandlerFn, ctx: TaskContext) -> Any:
        if inspect.iscoroutinefunction(handler):
            return await handler(ctx)
        return await asyncio.to_thread(handler, ctx)

    async def _keep_lease(self, ctx: TaskContext, work: asyncio.Task[Any]) -> None:
        """Heartbeats the task every third of its lease; cancels the handler when the
        server asks to stop or the attempt is no longer current."""
        lease = (
            ctx.assignment.lease
            or (ctx.deadline - (datetime.now(UTC) + self._clock_offset)).total_seconds()
        )
        interval = max(MIN_LEASE_HEARTBEAT, (lease if lease > 0 else DEFAULT_LEASE) / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                cancel = await ctx.heartbeat()
            except TaskDispatchError:
                ctx._mark_cancelled()
                cancel = True
            except OpsCoreError as exc:
                log.warning("task heartbeat failed", extra={"error": str(exc)})
                continue
            if cancel:
                work.cancel()
                return

    @staticmethod
    async def _report(call: Awaitable[None]) -> None:
        """A refused report (attempt superseded, session cancelled, server gone for
        longer than the retries) is logged: the server re-queues or already moved on."""
        try:
            await call
        except OpsCoreError as exc:
            log.warning("task report not accepted", extra={"error": str(exc)})


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_MESSAGE_LENGTH]
