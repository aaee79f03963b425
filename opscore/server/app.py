"""The composition root: builds the store from its URL and every component with its
own config, wires commit listeners and background jobs explicitly, serves gRPC with
health and reflection, and shuts down gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opspawn.opscore.v1 import (
    lifecycle_pb2,
    lifecycle_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    workflow_pb2,
    workflow_pb2_grpc,
)

from opscore.api.convert.framing import EventCache
from opscore.api.convert.session import session_event_to_proto
from opscore.api.interceptors.auth import Authenticator
from opscore.api.interceptors.chain import interceptor_chain
from opscore.api.servicers.lifecycle import LifecycleServicer
from opscore.api.servicers.session import SessionServicer
from opscore.api.servicers.workflow import WorkflowServicer
from opscore.domain.agents.credentials import AgentCredentials
from opscore.domain.agents.liveness import Liveness
from opscore.domain.agents.registry import AgentRegistry
from opscore.domain.agents.watch import AgentWatch
from opscore.domain.clock import Clock, SystemClock, every
from opscore.domain.dispatch.dispatcher import Dispatcher
from opscore.domain.sessions.history import SessionHistory
from opscore.domain.workflows.engine import WorkflowEngine
from opscore.domain.workflows.queue import TaskQueue
from opscore.protocol.errors import ConfigurationError
from opscore.server.config import Settings
from opscore.server.security import check_exposure, load_keys, server_credentials
from opscore.store.factory import open_store

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    lifecycle_pb2.DESCRIPTOR.services_by_name["LifecycleService"].full_name,
    workflow_pb2.DESCRIPTOR.services_by_name["WorkflowService"].full_name,
    session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
]


class OpsCoreServer:
    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.port = 0
        keys = load_keys(settings)
        check_exposure(settings, keys)
        self._tls = server_credentials(settings)

        store = self._store = open_store(settings.store())
        clock = self.clock
        self._credentials = AgentCredentials(store, enabled=bool(keys))
        registry = AgentRegistry(store, clock, settings.registry(), self._credentials)
        liveness = Liveness(store, clock, settings.liveness())
        queue = TaskQueue(store, clock)
        self._dispatcher = Dispatcher(
            queue, clock, registry.ready_for_work, liveness.stream_lost, settings.dispatch()
        )
        queue.explain = self._dispatcher.waiting_reason
        liveness.presence = self._dispatcher.presence
        # Each committed agent event is framed once, for every watcher and for the
        # byte bounds of the watch.
        framing = EventCache(self._dispatcher.presence, settings.watch().response_bytes)
        self._agent_watch = AgentWatch(store, clock, settings.watch(), framing.size)
        self._engine = WorkflowEngine(
            store, clock, settings.workflows(), registry, queue, self._dispatcher
        )
        self._sessions = SessionHistory(
            store, clock, settings.sessions(), lambda e: session_event_to_proto(e).ByteSize()
        )
        self.authenticator = Authenticator(keys, self._credentials.agent_for_token)

        # What hears each commit, in this order: watchers first, then dispatch.
        store.add_commit_listener(self._agent_watch.on_commit)
        store.add_commit_listener(self._dispatcher.on_commit)
        store.add_commit_listener(self._sessions.on_commit)
        # Background jobs: (name, seconds between runs, job).
        self._jobs: list[tuple[str, float, Callable[[], Awaitable[object]]]] = [
            ("liveness", liveness.config.check_interval, liveness.mark_silent_agents_offline),
            ("compaction", liveness.config.compaction_interval, liveness.compact_history),
            ("scheduler", self._engine.config.scheduler_interval, self._engine.tick),
            ("session-retention", self._sessions.config.prune_interval, self._sessions.prune),
        ]
        limits = settings.limits()
        self._servicers = (
            LifecycleServicer(
                registry, liveness, self._agent_watch, framing, limits, self._dispatcher.presence
            ),
            WorkflowServicer(self._engine, limits, self._sessions),
            SessionServicer(self._sessions, self._engine),
        )
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._server: grpc.aio.Server | None = None
        self._background: list[asyncio.Task[None]] = []

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> None:
        await self._store.open()
        await self._credentials.load()
        await self._engine.start()
        settings = self.settings
        limit = settings.max_message_bytes
        server = grpc.aio.server(
            interceptors=[
                interceptor_chain(self.authenticator, settings.rate_limit, settings.rate_burst)
            ],
            options=[
                ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.keepalive_time_ms", int(settings.keepalive_time * 1000)),
                ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout * 1000)),
                # Pings keep coming on an idle stream (the default stops after two).
                ("grpc.http2.max_pings_without_data", 0),
                # The least interval between client pings accepted (more often is a
                # "too_many_pings" strike); named "min_recv" in gRPC core.
                (
                    "grpc.http2.min_ping_interval_without_data_ms",
                    int(settings.keepalive_min_ping_interval * 1000),
                ),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.so_reuseport", 0),
            ],
        )
        lifecycle, workflow, session = self._servicers
        lifecycle_pb2_grpc.add_LifecycleServiceServicer_to_server(lifecycle, server)
        workflow_pb2_grpc.add_WorkflowServiceServicer_to_server(workflow, server)
        session_pb2_grpc.add_SessionServiceServicer_to_server(session, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        target = f"{settings.host}:{settings.port}"
        try:
            self.port = (
                server.add_secure_port(target, self._tls)
                if self._tls is not None
                else server.add_insecure_port(target)
            )
        except RuntimeError as exc:
            await self._store.close()
            raise ConfigurationError(f"cannot listen on {target}: {exc}") from None
        await server.start()
        self._server = server
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._background = [
            asyncio.create_task(every(self.clock, interval, job), name=name)
            for name, interval, job in self._jobs
        ]
        self._background.append(asyncio.create_task(self._dispatcher.run(), name="dispatcher"))
        log.info(
            "serving",
            extra={
                "address": self.address,
                "port": self.port,
                "db": str(settings.db),
                "tls": self._tls is not None,
                "auth": self.authenticator.enabled,
            },
        )

    def reload_keys(self) -> None:
        """Re-reads operator keys (SIGHUP): rotation and revocation without a restart.
        A broken file keeps the old keys. Turning auth on or off needs a restart."""
        try:
            keys = load_keys(self.settings)
        except ConfigurationError as exc:
            log.error("keeping the old operator keys", extra={"error": exc.message})
            return
        if bool(keys) != self.authenticator.enabled:
            log.error("turning authentication on or off needs a restart; keys not reloaded")
            return
        self.authenticator.replace_keys(keys)
        log.info("operator keys reloaded", extra={"count": len(keys)})

    async def stop(self, grace: float | None = None) -> None:
        """Reports NOT_SERVING, ends watch streams, lets in-flight calls finish within
        the grace period, then closes the store (every acknowledged write is on disk)."""
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        self._agent_watch.close()
        self._sessions.close()
        await self._dispatcher.close()
        await self._server.stop(self.settings.shutdown_grace if grace is None else grace)
        self._server = None
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._store.close()
        log.info("stopped")


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    server = OpsCoreServer(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_keys)
    await stop.wait()
    log.info("shutting down")
    await server.stop()
