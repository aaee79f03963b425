"""Who may call: operator keys with roles, per-agent tokens, and the principal a
request acts as.

Secrets are random (`opk_…` operator keys, `oat_…` agent tokens) and only their
SHA-256 is stored or configured, so a leaked config file or database holds no usable
credential. High-entropy random secrets need no slow password hash.
"""

from __future__ import annotations

import enum
import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml

from opscore.errors import ConfigurationError

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


def _parse_entry(raw: object, where: str) -> OperatorKey:
    if not isinstance(raw, dict):
        raise ConfigurationError(f"{where}: each key needs name, role and sha256")
    name, role, sha = raw.get("name"), raw.get("role"), str(raw.get("sha256", "")).lower()
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{where}: name is required")
    if role not in {r.value for r in Role} or role == Role.AGENT:
        raise ConfigurationError(f"{where}: role must be admin, operator or viewer (got {role!r})")
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ConfigurationError(f"{where}: sha256 must be 64 hex digits (the key's SHA-256)")
    return OperatorKey(name, Role(role), sha)


def load_operator_keys(path: Path | None, env_value: str) -> list[OperatorKey]:
    """Keys from a YAML/JSON file (`keys: [{name, role, sha256}]`) and from the env
    value `name:role:sha256[,…]`; names must be unique."""
    keys: list[OperatorKey] = []
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise ConfigurationError(f"cannot read keys file {path}: {exc}") from None
        entries = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ConfigurationError(f"keys file {path}: expected a top-level 'keys' list")
        keys += [_parse_entry(e, f"keys file {path}, entry {i}") for i, e in enumerate(entries)]
    for i, item in enumerate(filter(None, (p.strip() for p in env_value.split(",")))):
        parts = item.split(":")
        if len(parts) != 3:
            raise ConfigurationError(f"OPSCORE_API_KEYS entry {i}: expected name:role:sha256")
        keys.append(
            _parse_entry(
                dict(zip(("name", "role", "sha256"), parts, strict=True)),
                f"OPSCORE_API_KEYS entry {i}",
            )
        )
    names = [k.name for k in keys]
    if len(names) != len(set(names)):
        raise ConfigurationError("operator key names must be unique")
    return keys
