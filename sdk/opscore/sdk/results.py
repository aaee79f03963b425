"""The one converter between handler values and the JSON a task carries.

A handler's result becomes a task's output, a protobuf Struct: JSON values only,
every number a double. `to_output` turns what handlers commonly return into that,
and refuses the rest with the type and where it sits (`output.items[2]`), so the
worker fails the attempt at once instead of losing it to a serialization error:

* dict (str keys), list, tuple, set, str, bool, None, int (within +-2**53, which a
  double holds exactly), finite float;
* pydantic v2 models (`model_dump(mode="json")`), dataclasses (their fields);
* aware datetimes as RFC 3339 (`2026-01-02T03:04:05Z`, or with their offset),
  dates as `2026-01-02`; naive datetimes are refused, since guessing their zone
  would misdate them;
* Enum members as their value; UUID, Decimal and Path as strings.

`parse_input` validates a task's data against a declared input model (anything
with pydantic's `model_validate`); pydantic is never imported here, so the SDK
works without it.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import sys
import uuid
from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from pathlib import PurePath
from typing import Any, Protocol, Self, TypeVar

from opscore.protocol.values import JsonObject

# The largest integer a JSON number (a double in a Struct) carries exactly.
MAX_EXACT_INT = 2**53


class ResultError(TypeError):
    """A handler's value cannot be sent as JSON; the message names type and place."""


class InputError(ValueError):
    """A task's data does not match the handler's declared input model."""


class InputModel(Protocol):
    """What a declared input must offer (pydantic v2 models do)."""

    @classmethod
    def model_validate(cls, obj: Any) -> Self: ...


M = TypeVar("M", bound=InputModel)


def to_output(value: Any) -> JsonObject:
    """A task output from a handler's result: a dict stays one (its values
    converted), anything else is wrapped as {"result": value}."""
    converted = to_json(value, "output")
    return converted if isinstance(converted, dict) else {"result": converted}


def to_json(value: Any, where: str) -> Any:
    """`value` as plain JSON values; ResultError naming `where` when it cannot be."""
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_EXACT_INT:
            raise ResultError(
                f"{where} is the integer {value}, beyond +-2**53 that a JSON number "
                "carries exactly; send it as a string"
            )
        return int(value)  # an IntEnum or other int subclass as the plain number
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ResultError(f"{where} is {value}, which JSON cannot carry")
        return float(value)
    if isinstance(value, Mapping):
        out: JsonObject = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ResultError(
                    f"{where} has a key of type {_type_name(key)} ({key!r}); JSON keys are strings"
                )
            out[key] = to_json(item, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple | set | frozenset):
        return [to_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ResultError(
                f"{where} is a naive datetime ({value.isoformat()}); use an aware one, "
                "e.g. datetime.now(UTC)"
            )
        text = value.isoformat()
        return text.removesuffix("+00:00") + "Z" if text.endswith("+00:00") else text
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return to_json(value.value, where)
    if isinstance(value, uuid.UUID | Decimal | PurePath):
        return str(value)
    if _is_pydantic_model(value):
        return to_json(value.model_dump(mode="json"), where)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return to_json(fields, where)
    raise ResultError(
        f"handler returned a value of type {_type_name(value)} that cannot be sent as JSON "
        f"(at {where})"
    )


def parse_input(model: type[M], data: JsonObject) -> M:
    """The task's data validated as `model`; InputError with a one-line summary of
    every mismatch (field path and reason) when it does not fit."""
    try:
        return model.model_validate(data)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise InputError(f"input does not match {model.__name__}: {_summary(exc)}") from None


def _summary(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for error in errors(include_url=False, include_input=False):
        path = ".".join(str(part) for part in error.get("loc", ())) or "(root)"
        parts.append(f"{path}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


def _is_pydantic_model(value: Any) -> bool:
    """Without importing pydantic: an instance of one of its models means it is loaded."""
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and isinstance(value, pydantic.BaseModel)


def _type_name(value: Any) -> str:
    kind = type(value)
    return (
        kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    )
