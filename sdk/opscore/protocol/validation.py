"""The checks every request field goes through: collect each problem with the path
of its field, then raise them together, so a caller fixes a request in one round.
The server's edge adds protobuf-specific checks (`opscore.api.convert.fields`)."""

from __future__ import annotations

import enum
from collections.abc import Iterable

from opscore.protocol.errors import FieldViolation, InvalidArgumentError
from opscore.protocol.limits import ID_PATTERN, MAX_ID_LENGTH


class Violations:
    def __init__(self, prefix: str = "") -> None:
        self._prefix = prefix
        self._items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        path = f"{self._prefix}.{field}" if self._prefix else field
        self._items.append(FieldViolation(path, description))

    def text(self, field: str, value: str, *, max_len: int, required: bool = False) -> None:
        if required and not value:
            self.add(field, "is required")
        elif len(value) > max_len:
            self.add(field, f"must be at most {max_len} characters (got {len(value)})")

    def identifier(self, field: str, value: str, *, required: bool = True) -> None:
        if not value:
            if required:
                self.add(field, "is required")
        elif len(value) > MAX_ID_LENGTH:
            self.add(field, f"must be at most {MAX_ID_LENGTH} characters")
        elif not ID_PATTERN.fullmatch(value):
            self.add(
                field, "must start with a letter or digit and hold only letters, digits, . _ : -"
            )

    def enum(self, field: str, value: int, allowed: Iterable[enum.IntEnum]) -> None:
        names = sorted(allowed, key=int)
        if value not in {int(a) for a in names}:
            self.add(field, f"must be one of {', '.join(a.name for a in names)} (got {value})")

    def raise_if_any(self) -> None:
        if self._items:
            raise InvalidArgumentError(self._items)


def require_id(field: str, value: str) -> str:
    """A single id argument (Get/Deregister/...): present and well-formed."""
    v = Violations()
    v.identifier(field, value)
    v.raise_if_any()
    return value
