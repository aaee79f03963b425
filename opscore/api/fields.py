"""Request validation at the edge: collects every bad field, then raises once."""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from opscore.errors import FieldViolation, InvalidArgumentError
from opscore.models import ID_PATTERN, MAX_ID_LENGTH


def _shape(value: struct_pb2.Struct | struct_pb2.ListValue) -> tuple[int, bool]:
    """Nesting depth of a Struct or ListValue (1 for a flat one), and whether every
    number in it is finite (JSON has no NaN or infinity)."""
    values = value.fields.values() if isinstance(value, struct_pb2.Struct) else value.values
    deepest, finite = 0, True
    for item in values:
        kind = item.WhichOneof("kind")
        if kind == "number_value":
            finite = finite and math.isfinite(item.number_value)
        elif kind in ("struct_value", "list_value"):
            depth, inner_finite = _shape(getattr(item, kind))
            deepest, finite = max(deepest, depth), finite and inner_finite
    return 1 + deepest, finite


class Violations:
    def __init__(self) -> None:
        self._items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self._items.append(FieldViolation(field, description))

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

    def enum(self, field: str, value: int, allowed: Iterable[Any]) -> None:
        names = sorted(allowed, key=int)
        if value not in {int(a) for a in names}:
            self.add(field, f"must be one of {', '.join(a.name for a in names)} (got {value})")

    def struct(self, field: str, value: struct_pb2.Struct, max_bytes: int, max_depth: int) -> None:
        size = value.ByteSize()
        if size > max_bytes:
            self.add(field, f"must be at most {max_bytes} bytes serialized (got {size})")
            return
        depth, finite = _shape(value)
        if depth > max_depth:
            self.add(field, f"must nest at most {max_depth} levels deep")
        if not finite:
            self.add(field, "numbers must be finite (no NaN or infinity)")

    def duration(self, field: str, value: duration_pb2.Duration) -> None:
        """A well-formed Duration (nanos within range and of the seconds' sign)."""
        nanos_ok = -999_999_999 <= value.nanos <= 999_999_999
        signs_ok = (
            value.seconds == 0 or value.nanos == 0 or (value.seconds > 0) == (value.nanos > 0)
        )
        if not (nanos_ok and signs_ok and abs(value.seconds) <= 315_576_000_000):
            self.add(field, "is not a valid duration")

    def raise_if_any(self) -> None:
        if self._items:
            raise InvalidArgumentError(self._items)


def require_id(field: str, value: str) -> str:
    """A single id argument (Get/Deregister/...): present and well-formed."""
    v = Violations()
    v.identifier(field, value)
    v.raise_if_any()
    return value


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(value)
    return result


def dict_to_struct(value: dict[str, Any], target: struct_pb2.Struct) -> None:
    target.Clear()
    if value:
        target.update(value)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def set_time(stamp: timestamp_pb2.Timestamp, value: datetime | None) -> None:
    """Timestamp.FromDatetime without its slow `calendar.timegm` (hot in watch fan-out);
    None leaves the field unset."""
    if value is None:
        return
    delta = value - _EPOCH
    stamp.seconds = delta.days * 86_400 + delta.seconds
    stamp.nanos = delta.microseconds * 1000


def optional_time(message: Message, field: str) -> datetime | None:
    """The timestamp field as an aware datetime; INVALID_ARGUMENT if out of range."""
    if not message.HasField(field):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, field)
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgumentError.single(field, "is not a valid timestamp") from None
