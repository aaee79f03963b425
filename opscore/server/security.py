"""Transport security at start: safe exposure without keys, TLS credentials."""

from __future__ import annotations

import ipaddress
import logging

import grpc

from opscore.domain.access import OperatorKey
from opscore.protocol.errors import ConfigurationError
from opscore.server.config import Settings
from opscore.server.keys import load_operator_keys

log = logging.getLogger(__name__)


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
