"""Field helpers of every converter: the protobuf-specific checks (Struct size,
depth and finiteness, Duration form) on top of the shared `Violations`, and
Struct/Timestamp conversion."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from opscore.protocol.errors import InvalidArgumentError
from opscore.protocol.limits import RequestLimits
from opscore.protocol.validation import Violations
from opscore.protocol.values import epoch_micros


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


class RequestViolations(Violations):
    """Violations with the checks of protobuf-typed fields."""

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

    def payload(self, field: str, value: struct_pb2.Struct, limits: RequestLimits) -> None:
        """A session input, task output or task parameters."""
        self.struct(field, value, limits.max_payload_bytes, limits.max_struct_depth)


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(value)
    return result


def dict_to_struct(value: dict[str, Any], target: struct_pb2.Struct) -> None:
    target.Clear()
    if value:
        target.update(value)


def set_time(stamp: timestamp_pb2.Timestamp, value: datetime | None) -> None:
    """Timestamp.FromDatetime without its slow `calendar.timegm` (hot in watch fan-out);
    None leaves the field unset."""
    if value is None:
        return
    seconds, micros = divmod(epoch_micros(value), 1_000_000)
    stamp.seconds = seconds
    stamp.nanos = micros * 1000


def optional_time(message: Message, field: str) -> datetime | None:
    """The timestamp field as an aware datetime; INVALID_ARGUMENT if out of range."""
    if not message.HasField(field):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, field)
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgumentError.single(field, "is not a valid timestamp") from None
