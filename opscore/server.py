"""The grpc.aio server: wiring, security, health, reflection, and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
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

from opscore.api.access import Access
from opscore.api.interceptor import EdgeInterceptor
from opscore.api.lifecycle import LifecycleServicer
from opscore.api.session import SessionServicer
from opscore.api.workflow import WorkflowServicer
from opscore.auth import OperatorKey, load_operator_keys
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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_keys(settings: Settings) -> list[OperatorKey]:
    return load_operator_keys(settings.keys_file, settings.api_keys)


def check_exposure(settings: Settings, keys: list[OperatorKey]) -> None:
    """Safe by default: without keys, serve loopback only unless told otherwise."""
    if keys:
        return
    if not is_loopback(settings.host) and not settings.insecure_no_auth:
        raise ConfigurationError(
            f"refusing to serve {settings.host} without authentication: configure operator "
            "keys (OPSCORE_KEYS_FILE or OPSCORE_API_KEYS) or pass --insecure-no-auth"
        )
    log.warning(
        "AUTHENTICATION IS OFF: any client that can connect may do anything",
        extra={"host": settings.host},
    )


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from PEM files; with a client CA, mutual TLS (client certificates required)."""
    if settings.tls_cert is None and settings.tls_key is None:
        if settings.tls_client_ca is not None:
            raise ConfigurationError("tls_client_ca needs tls_cert and tls_key as well")
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise ConfigurationError("TLS needs both tls_cert and tls_key")
    try:
        chain = settings.tls_cert.read_bytes()
        key = settings.tls_key.read_bytes()
        ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    except OSError as exc:
        raise ConfigurationError(f"cannot read TLS file: {exc}") from None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=ca, require_client_auth=ca is not None
    )


class OpsCoreServer:
    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.port = 0
        keys = load_keys(settings)
        check_exposure(settings, keys)
        self._credentials = server_credentials(settings)
        self._store = SqliteStore(
            settings.db,
            synchronous=settings.sqlite_synchronous,
            readers=settings.sqlite_readers,
            max_batch=settings.max_batch,
        )
        self._lifecycle = Lifecycle(self._store, self.clock, settings, issue_tokens=bool(keys))
        self.access = Access(
            keys, self._lifecycle.agent_for_token, settings.rate_limit, settings.rate_burst
        )
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
        await self._lifecycle.start()
        await self._engine.start()
        limit = self.settings.max_message_bytes
        server = grpc.aio.server(
            interceptors=[EdgeInterceptor(self.access)],
            options=[
                ("grpc.max_concurrent_streams", self.settings.max_concurrent_streams),
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
            LifecycleServicer(self._lifecycle, self.settings.limits()), server
        )
        workflow_pb2_grpc.add_WorkflowServiceServicer_to_server(
            WorkflowServicer(self._engine, self.settings.limits()), server
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
            self.port = (
                server.add_secure_port(target, self._credentials)
                if self._credentials is not None
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
            asyncio.create_task(self._lifecycle.run_liveness_checks(), name="liveness"),
            asyncio.create_task(self._lifecycle.run_compaction(), name="compaction"),
            asyncio.create_task(self._engine.run_scheduler(), name="scheduler"),
            asyncio.create_task(self._sessions.run_retention(), name="session-retention"),
            asyncio.create_task(self._engine.dispatcher.run(), name="dispatcher"),
        ]
        log.info(
            "serving",
            extra={
                "address": self.address,
                "port": self.port,
                "db": str(self.settings.db),
                "tls": self._credentials is not None,
                "auth": self.access.enabled,
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
        if bool(keys) != self.access.enabled:
            log.error("turning authentication on or off needs a restart; keys not reloaded")
            return
        self.access.replace_keys(keys)
        log.info("operator keys reloaded", extra={"count": len(keys)})

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
    loop.add_signal_handler(signal.SIGHUP, server.reload_keys)
    await stop.wait()
    log.info("shutting down")
    await server.stop()
