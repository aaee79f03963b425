"""Settings: env vars `OPSCORE_*`, overridden by CLI flags; bad values fail at start."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from opscore.errors import ConfigurationError


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPSCORE_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    db: Path = Path("opscore.db")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # SQLite: NORMAL survives a killed process (WAL); FULL also survives power loss.
    sqlite_synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    sqlite_readers: int = Field(2, ge=1, le=32)
    max_batch: int = Field(256, ge=1, le=10_000)

    # Agents silent this long go OFFLINE; checked every liveness_check_interval.
    liveness_timeout: float = Field(30.0, gt=0)
    liveness_check_interval: float = Field(5.0, gt=0)
    # State reports observed further in the future than this are refused.
    max_clock_skew: float = Field(60.0, ge=0)

    # Agent events kept for watch resumption; older ones are compacted away.
    event_history_limit: int = Field(100_000, ge=100)
    compaction_interval: float = Field(10.0, gt=0)
    # Events a watcher may fall behind by before it is dropped.
    watch_buffer: int = Field(1024, ge=1)
    # Under load, watchers get the events of at least this many seconds in one message,
    # and longer when there are many watchers: fan-out writes at most
    # watch_messages_per_second stream messages (each costs the event loop ~50 us,
    # whatever its size; see bench/README.md).
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
    max_capabilities: int = Field(64, ge=1)  # per agent
    max_metadata_entries: int = Field(64, ge=0)  # per agent
    max_metadata_bytes: int = Field(16 * 1024, ge=0)  # per agent, keys and values
    max_details_bytes: int = Field(16 * 1024, ge=0)  # state details, serialized
    max_payload_bytes: int = Field(256 * 1024, ge=0)  # input, output, parameters
    max_struct_depth: int = Field(32, ge=1)  # nesting of any Struct field
    max_tasks_per_definition: int = Field(1000, ge=1)
    shutdown_grace: float = Field(5.0, ge=0)

    def limits(self) -> Limits:
        return Limits(
            max_capabilities=self.max_capabilities,
            max_metadata_entries=self.max_metadata_entries,
            max_metadata_bytes=self.max_metadata_bytes,
            max_details_bytes=self.max_details_bytes,
            max_payload_bytes=self.max_payload_bytes,
            max_struct_depth=self.max_struct_depth,
            max_tasks_per_definition=self.max_tasks_per_definition,
        )


@dataclass(frozen=True)
class Limits:
    """Request size limits checked at the edge (defaults as in Settings)."""

    max_capabilities: int = 64
    max_metadata_entries: int = 64
    max_metadata_bytes: int = 16 * 1024
    max_details_bytes: int = 16 * 1024
    max_payload_bytes: int = 256 * 1024
    max_struct_depth: int = 32
    max_tasks_per_definition: int = 1000


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
