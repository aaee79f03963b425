"""Opaque page tokens (AIP-158): a cursor plus a fingerprint of the filters, so a
token is refused when reused with other filters."""

from __future__ import annotations

import base64
import hashlib
import json

from opscore.errors import InvalidArgumentError

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    """0 means the default; larger than the maximum is coerced down."""
    if requested < 0:
        raise InvalidArgumentError.single("page_size", "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def fingerprint(*filters: object) -> str:
    return hashlib.sha256(repr(filters).encode()).hexdigest()[:16]


def encode(cursor: str, filters_fingerprint: str) -> str:
    raw = json.dumps([cursor, filters_fingerprint], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, filters_fingerprint: str) -> str:
    """The cursor of a token ('' for no token); INVALID_ARGUMENT if it is not ours."""
    if not token:
        return ""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        cursor, seen = json.loads(raw)
        if not isinstance(cursor, str) or not isinstance(seen, str):
            raise ValueError
    except ValueError:
        raise InvalidArgumentError.single("page_token", "not a token from this list") from None
    if seen != filters_fingerprint:
        raise InvalidArgumentError.single(
            "page_token", "token belongs to a list with other filters; start again without it"
        )
    return cursor
