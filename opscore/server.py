"""The grpc.aio server: wiring, health, reflection, and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

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

from opscore.api.lifecycle import LifecycleServicer
from opscore.api.session import SessionServicer
from opscore.api.status import ErrorMappingInterceptor
from opscore.api.workflow import WorkflowServicer
from opscore.clock import Clock, SystemClock
from opscore.config import Settings
from opscore.errors import ConfigurationError
from opscore.lifecycle import Lifecycle
from opscore.sessions import SessionTracker
from opscore.store.sqlite import SqliteStore
from opscore.workflow import WorkflowEngine

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
        self._store = SqliteStore(
            settings.db,
            synchronous=settings.sqlite_synchronous,
            readers=settings.sqlite_readers,
            max_batch=settings.max_batch,
        )
        self._lifecycle = Lifecycle(self._store, self.clock, settings)
        self._engine = WorkflowEngine(self._store, self.clock, settings, self._lifecycle)
        self._sessions = SessionTracker(self._store, self.clock, settings)
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._server: grpc.aio.Server | None = None
        self._background: list[asyncio.Task[None]] = []

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> None:
        await self._store.open()
        await self._engine.start()
        limit = self.settings.max_message_bytes
        server = grpc.aio.server(
            interceptors=[ErrorMappingInterceptor()],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.so_reuseport", 0),
            ],
        )
        lifecycle_pb2_grpc.add_LifecycleServiceServicer_to_server(
            LifecycleServicer(self._lifecycle), server
        )
        workflow_pb2_grpc.add_WorkflowServiceServicer_to_server(
            WorkflowServicer(self._engine), server
        )
        session_pb2_grpc.add_SessionServiceServicer_to_server(
            SessionServicer(self._sessions, self._engine), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        target = f"{self.settings.host}:{self.settings.port}"
        try:
            self.port = server.add_insecure_port(target)
        except RuntimeError as exc:
            await self._store.close()
            raise ConfigurationError(f"cannot listen on {target}: {exc}") from None
        await server.start()
        self._server = server
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._background = [
            asyncio.create_task(self._lifecycle.run_liveness_checks(), name="liveness"),
            asyncio.create_task(self._lifecycle.run_compaction(), name="compaction"),
            asyncio.create_task(self._engine.run_scheduler(), name="scheduler"),
            asyncio.create_task(self._sessions.run_retention(), name="session-retention"),
            asyncio.create_task(self._engine.dispatcher.run(), name="dispatcher"),
        ]
        log.info(
            "serving",
            extra={"address": self.address, "port": self.port, "db": str(self.settings.db)},
        )

    async def stop(self, grace: float | None = None) -> None:
        """Reports NOT_SERVING, ends watch streams, lets in-flight calls finish within
        the grace period, then closes the store (every acknowledged write is on disk)."""
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        self._lifecycle.close()
        self._sessions.close()
        await self._engine.dispatcher.close()
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
    await stop.wait()
    log.info("shutting down")
    await server.stop()
