"""Operator keys from configuration: a YAML/JSON keys file and the OPSCORE_API_KEYS
value. Only hashes are configured; a bad entry stops the server at start (or keeps
the old keys on SIGHUP)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from opscore.domain.access import OperatorKey, Role
from opscore.protocol.errors import ConfigurationError


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
