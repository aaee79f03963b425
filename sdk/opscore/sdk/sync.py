"""SyncOpsCoreClient: the async client for code without an event loop.

The async client runs on a private event loop in a daemon thread; each method
submits the coroutine there and waits. Listings and watches become plain iterators.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

from opscore.sdk.client import OpsCoreClient

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def _unary(
    method: Callable[Concatenate[OpsCoreClient, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[SyncOpsCoreClient, P], R]:
    def call(self: SyncOpsCoreClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._run(method(self._client, *args, **kwargs))

    call.__name__ = method.__name__
    call.__doc__ = method.__doc__
    return call


def _streaming(
    method: Callable[Concatenate[OpsCoreClient, P], AsyncIterator[T]],
) -> Callable[Concatenate[SyncOpsCoreClient, P], Iterator[T]]:
    def call(self: SyncOpsCoreClient, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        return self._iterate(method(self._client, *args, **kwargs))

    call.__name__ = method.__name__
    call.__doc__ = method.__doc__
    return call


class SyncOpsCoreClient:
    """The OpsCoreClient API with blocking calls; use `with` or call `close()`."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        timeout: float = 10.0,
        retries: int = 3,
        **credentials: Any,
    ) -> None:
        """`credentials`: token, tls_ca, tls_cert, tls_key, as for OpsCoreClient."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="opscore-sdk", daemon=True
        )
        self._thread.start()

        async def make() -> OpsCoreClient:
            # grpc.aio binds a channel to the loop it is created on.
            return OpsCoreClient(address, timeout=timeout, retries=retries, **credentials)

        self._client = self._run(make())

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _run(self, coro: Coroutine[Any, Any, R]) -> R:
        future: Future[R] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result()

    def _iterate(self, source: AsyncIterator[T]) -> Iterator[T]:
        """Pulls one item at a time; closing the iterator (or breaking out of a for
        loop) closes the async one, which ends its call."""

        async def step() -> list[T]:
            try:
                return [await anext(source)]
            except StopAsyncIteration:
                return []

        try:
            while items := self._run(step()):
                yield items[0]
        finally:
            if isinstance(source, AsyncGenerator) and not self._loop.is_closed():
                self._run(source.aclose())

    register_agent = _unary(OpsCoreClient.register_agent)
    deregister_agent = _unary(OpsCoreClient.deregister_agent)
    get_agent = _unary(OpsCoreClient.get_agent)
    list_agents = _streaming(OpsCoreClient.list_agents)
    update_agent_state = _unary(OpsCoreClient.update_agent_state)
    heartbeat = _unary(OpsCoreClient.heartbeat)
    watch_agents = _streaming(OpsCoreClient.watch_agents)

    create_workflow = _unary(OpsCoreClient.create_workflow)
    get_workflow_definition = _unary(OpsCoreClient.get_workflow_definition)
    list_workflow_definitions = _streaming(OpsCoreClient.list_workflow_definitions)
    delete_workflow_definition = _unary(OpsCoreClient.delete_workflow_definition)
    start_workflow = _unary(OpsCoreClient.start_workflow)
    execute_workflow = _unary(OpsCoreClient.execute_workflow)
    stream_tasks = _streaming(OpsCoreClient.stream_tasks)
    complete_task = _unary(OpsCoreClient.complete_task)
    fail_task = _unary(OpsCoreClient.fail_task)
    heartbeat_task = _unary(OpsCoreClient.heartbeat_task)

    get_session = _unary(OpsCoreClient.get_session)
    list_sessions = _streaming(OpsCoreClient.list_sessions)
    cancel_session = _unary(OpsCoreClient.cancel_session)
    list_session_events = _streaming(OpsCoreClient.list_session_events)
    watch_session = _streaming(OpsCoreClient.watch_session)
    wait_session = _unary(OpsCoreClient.wait_session)
