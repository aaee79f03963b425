"""Opaque page tokens (AIP-158): a cursor plus a fingerprint of the filters, so a
token is refused when reused with other filters."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from opscore.protocol.errors import InvalidArgumentError
from opscore.protocol.limits import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list; `next_page_token` is empty on the last page."""

    items: list[T]
    next_page_token: str
    # The store revision the page is consistent with (agent lists only).
    revision: int = 0


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


def decode_int(token: str, filters_fingerprint: str) -> int:
    """A numeric cursor (0 for no token)."""
    cursor = decode(token, filters_fingerprint)
    if cursor and not cursor.isdigit():
        raise InvalidArgumentError.single("page_token", "not a token from this list")
    return int(cursor or 0)


def cut(
    fetched: list[T], size: int, cursor_of: Callable[[T], str], filters_fingerprint: str
) -> tuple[list[T], str]:
    """From `size + 1` fetched items: the page, and the token of the next one ("" when
    this is the last page)."""
    if len(fetched) <= size:
        return fetched, ""
    return fetched[:size], encode(cursor_of(fetched[size - 1]), filters_fingerprint)
