"""Settings: env vars `OPSCORE_*`, overridden by CLI flags; bad values fail at start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from opscore.domain.agents.liveness import LivenessConfig
from opscore.domain.agents.registry import RegistryConfig
from opscore.domain.dispatch.dispatcher import DispatchConfig
from opscore.domain.events.hub import WatchConfig
from opscore.domain.sessions.history import SessionsConfig
from opscore.domain.workflows.engine import WorkflowsConfig
from opscore.protocol.errors import ConfigurationError
from opscore.protocol.limits import (
    MAX_SESSION_EVENT_BYTES,
    RequestLimits,
    max_agent_event_bytes,
    watch_response_bytes,
)
from opscore.store.factory import StoreConfig
from opscore.store.sqlite.engine import SqliteConfig

DEFAULT_LIMITS = RequestLimits()


class Settings(BaseSettings):
    """Every setting; each component gets only its part (the methods below)."""

    model_config = SettingsConfigDict(env_prefix="OPSCORE_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    # The store: a SQLite file path, or a URL (sqlite:///path/to/file.db).
    db: str = "opscore.db"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # SQLite: NORMAL survives a killed process (WAL); FULL also survives power loss.
    sqlite_synchronous: Literal["NORMAL", "FULL"] = SqliteConfig.synchronous
    sqlite_readers: int = Field(SqliteConfig.readers, ge=1, le=32)
    max_batch: int = Field(SqliteConfig.max_batch, ge=1, le=10_000)
    # SQLite's quick check at start refuses a damaged file; it reads the whole file,
    # so a huge one may start without it (damage then surfaces as DATA_LOSS).
    sqlite_quick_check: bool = SqliteConfig.quick_check

    # Agents silent this long go OFFLINE; checked every liveness_check_interval. An
    # open task stream is contact: its agent is never silent.
    liveness_timeout: float = Field(30.0, gt=0)
    liveness_check_interval: float = Field(5.0, gt=0)
    # An agent whose last task stream closed goes OFFLINE unless it opens a new one
    # within this many seconds (its leased attempts are kept for it meanwhile).
    stream_grace: float = Field(5.0, ge=0)
    # HTTP/2 keepalive: the server pings each connection after keepalive_time seconds
    # without traffic and drops it when no answer comes within keepalive_timeout, so a
    # vanished agent's stream closes. Clients may ping every keepalive_min_ping_interval
    # seconds (the SDK pings every 30 s).
    keepalive_time: float = Field(20.0, gt=0)
    keepalive_timeout: float = Field(10.0, gt=0)
    keepalive_min_ping_interval: float = Field(10.0, gt=0)
    # State reports observed further in the future than this are refused.
    max_clock_skew: float = Field(60.0, ge=0)

    # Agent events kept for watch resumption; older ones are compacted away.
    event_history_limit: int = Field(100_000, ge=100)
    compaction_interval: float = Field(10.0, gt=0)
    # Events a watcher may fall behind by before it is dropped.
    watch_buffer: int = Field(1024, ge=1)
    # ... or by this many bytes (wire size of its unread events). A watcher that stops
    # reading costs the server at most this, one response (a quarter of
    # max_message_bytes, at most 1 MiB), its stream's HTTP/2 window and, while it
    # replays history, one read of 500 events.
    watch_buffer_bytes: int = Field(4 * 1024 * 1024, ge=64 * 1024)
    # An event goes out at once while every watcher has written what it was given and
    # the last flush carried one event. Otherwise (a backlog) new events wait at least
    # this many seconds and go out together, and longer when there are many watchers:
    # fan-out then writes at most watch_messages_per_second stream messages (each
    # costs the event loop ~50 us, whatever its size; see bench/README.md).
    watch_flush_interval: float = Field(0.005, ge=0, le=1)
    watch_messages_per_second: int = Field(8000, ge=100)

    # Finished sessions and their history are kept this long (seconds; default 7 days).
    session_retention: float = Field(7 * 24 * 3600.0, gt=0)
    # How often leases are checked and due retries woken.
    scheduler_interval: float = Field(0.5, gt=0)

    # Authentication: operator keys (hashed) from a YAML/JSON file and/or env
    # `name:role:sha256,...`. None configured: auth is off and only loopback is served
    # unless insecure_no_auth says otherwise.
    keys_file: Path | None = None
    api_keys: str = ""
    insecure_no_auth: bool = False
    # TLS: certificate and key (PEM); with client_ca, clients must present a
    # certificate signed by it (mutual TLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    # Limits.
    rate_limit: float = Field(0.0, ge=0)  # requests/s per caller; 0: off
    rate_burst: float = Field(0.0, ge=0)  # 0: twice the rate
    max_task_streams_per_agent: int = Field(4, ge=1)
    max_watchers: int = Field(1000, ge=1)  # per watch kind (agents, sessions)
    max_concurrent_streams: int = Field(1000, ge=1)  # per HTTP/2 connection
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_capabilities: int = Field(DEFAULT_LIMITS.max_capabilities, ge=1)
    max_metadata_entries: int = Field(DEFAULT_LIMITS.max_metadata_entries, ge=0)
    max_metadata_bytes: int = Field(DEFAULT_LIMITS.max_metadata_bytes, ge=0)
    max_details_bytes: int = Field(DEFAULT_LIMITS.max_details_bytes, ge=0)
    max_payload_bytes: int = Field(DEFAULT_LIMITS.max_payload_bytes, ge=0)
    max_struct_depth: int = Field(DEFAULT_LIMITS.max_struct_depth, ge=1)
    max_tasks_per_definition: int = Field(DEFAULT_LIMITS.max_tasks_per_definition, ge=1)
    shutdown_grace: float = Field(5.0, ge=0)

    @field_validator("db", mode="before")
    @classmethod
    def _path_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, Path) else value

    @model_validator(mode="after")
    def _events_fit_in_a_message(self) -> Settings:
        """Every watch event must fit in one message, or a watch could never pass it."""
        largest = max(max_agent_event_bytes(self.limits()), MAX_SESSION_EVENT_BYTES)
        if largest > self.max_message_bytes:
            raise ValueError(
                f"max_message_bytes {self.max_message_bytes} is below the largest watch event "
                f"the limits allow ({largest} bytes, from max_capabilities, "
                "max_metadata_entries, max_metadata_bytes and max_details_bytes): raise it "
                "or lower those"
            )
        return self

    def limits(self) -> RequestLimits:
        return RequestLimits(
            max_capabilities=self.max_capabilities,
            max_metadata_entries=self.max_metadata_entries,
            max_metadata_bytes=self.max_metadata_bytes,
            max_details_bytes=self.max_details_bytes,
            max_payload_bytes=self.max_payload_bytes,
            max_struct_depth=self.max_struct_depth,
            max_tasks_per_definition=self.max_tasks_per_definition,
        )

    def store(self) -> StoreConfig:
        return StoreConfig(
            str(self.db),  # model_copy(update=...) may have set a Path
            sqlite_synchronous=self.sqlite_synchronous,
            sqlite_readers=self.sqlite_readers,
            max_batch=self.max_batch,
            sqlite_quick_check=self.sqlite_quick_check,
        )

    def watch(self) -> WatchConfig:
        return WatchConfig(
            max_watchers=self.max_watchers,
            buffer=self.watch_buffer,
            buffer_bytes=self.watch_buffer_bytes,
            response_bytes=watch_response_bytes(self.max_message_bytes),
            flush_interval=self.watch_flush_interval,
            messages_per_second=self.watch_messages_per_second,
        )

    def registry(self) -> RegistryConfig:
        return RegistryConfig(max_clock_skew=self.max_clock_skew)

    def liveness(self) -> LivenessConfig:
        return LivenessConfig(
            timeout=self.liveness_timeout,
            check_interval=self.liveness_check_interval,
            event_history_limit=self.event_history_limit,
            compaction_interval=self.compaction_interval,
        )

    def workflows(self) -> WorkflowsConfig:
        return WorkflowsConfig(
            max_tasks_per_definition=self.max_tasks_per_definition,
            scheduler_interval=self.scheduler_interval,
        )

    def dispatch(self) -> DispatchConfig:
        return DispatchConfig(
            max_streams_per_agent=self.max_task_streams_per_agent,
            stream_grace=self.stream_grace,
        )

    def sessions(self) -> SessionsConfig:
        return SessionsConfig(
            retention=self.session_retention,
            prune_interval=self.compaction_interval,
            watch=self.watch(),
        )


def load_settings(**overrides: object) -> Settings:
    """Builds settings from env plus explicit overrides, as one clear error if invalid."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigurationError(f"invalid configuration: {problems}") from None
