"""Who may call: operator keys with roles, per-agent tokens, and the principal a
request acts as (the keys themselves are configured in `opscore.server.keys`).

Secrets are random (`opk_…` operator keys, `oat_…` agent tokens) and only their
SHA-256 is stored or configured, so a leaked config file or database holds no usable
credential. High-entropy random secrets need no slow password hash.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from dataclasses import dataclass

OPERATOR_KEY_PREFIX = "opk_"
AGENT_TOKEN_PREFIX = "oat_"


class Role(enum.StrEnum):
    ADMIN = "admin"  # everything an operator can do, plus agent registration and tokens
    OPERATOR = "operator"  # workflows, sessions, agent registration
    VIEWER = "viewer"  # read and watch only
    AGENT = "agent"  # only its own agent's reports and tasks


@dataclass(frozen=True)
class Principal:
    """The caller: a key's name (never its secret) or an agent id."""

    name: str
    role: Role
    agent_id: str = ""


# With authentication off every caller acts as this (loopback-only by default).
ANONYMOUS = Principal("anonymous", Role.ADMIN)


@dataclass(frozen=True)
class OperatorKey:
    name: str
    role: Role
    sha256: str


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def new_operator_key(name: str, role: Role) -> tuple[str, OperatorKey]:
    """A fresh key (to hand out once) and the entry to configure (hash only)."""
    key = new_secret(OPERATOR_KEY_PREFIX)
    return key, OperatorKey(name, role, digest(key))
