"""The SDK's result converter on its own: what each kind of value becomes, and that
what JSON cannot carry is refused naming its type and place (the end-to-end tests in
tests/sdk/test_sdk_worker_semantics.py show the same through a real server)."""

from __future__ import annotations

import dataclasses
import enum
import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pydantic
import pytest

from opscore.sdk.results import InputError, ResultError, parse_input, to_output


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Point(pydantic.BaseModel):
    x: int
    seen: datetime


@dataclasses.dataclass
class Box:
    label: str
    points: list[Point]
    size: tuple[int, int] = (1, 2)


MOMENT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"a": 1, "b": [True, None, 1.5]}, {"a": 1, "b": [True, None, 1.5]}),
        (7, {"result": 7}),
        ("text", {"result": "text"}),
        (None, {"result": None}),
        ([1, (2, 3)], {"result": [1, [2, 3]]}),
        ({"when": MOMENT}, {"when": "2026-01-02T03:04:05Z"}),
        (
            {"when": datetime(2026, 1, 2, 3, 4, tzinfo=timezone(timedelta(hours=2)))},
            {"when": "2026-01-02T03:04:00+02:00"},
        ),
        ({"day": date(2026, 1, 2)}, {"day": "2026-01-02"}),
        ({"c": Color.RED, "l": Level.HIGH}, {"c": "red", "l": 3}),
        (
            {"u": uuid.UUID(int=1), "d": Decimal("1.10"), "p": Path("/tmp/x")},
            {"u": "00000000-0000-0000-0000-000000000001", "d": "1.10", "p": "/tmp/x"},
        ),
        ({"s": frozenset({"only"})}, {"s": ["only"]}),
        (Point(x=1, seen=MOMENT), {"x": 1, "seen": "2026-01-02T03:04:05Z"}),
        (
            Box("b", [Point(x=2, seen=MOMENT)]),
            {"label": "b", "points": [{"x": 2, "seen": "2026-01-02T03:04:05Z"}], "size": [1, 2]},
        ),
        ({"big": 2**53, "small": -(2**53)}, {"big": 2**53, "small": -(2**53)}),
    ],
)
def test_values_convert_to_json(value: Any, expected: Any) -> None:
    assert to_output(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            {"items": [1, object()]},
            "value of type object that cannot be sent as JSON (at output.items[1])",
        ),
        ({"raw": b"x"}, "type bytes that cannot be sent as JSON (at output.raw)"),
        (timedelta(seconds=1), "type datetime.timedelta that cannot be sent as JSON (at output)"),
        ({"n": 2**53 + 1}, "output.n is the integer 9007199254740993, beyond +-2**53"),
        ({"x": float("nan")}, "output.x is nan, which JSON cannot carry"),
        ({"x": [float("inf")]}, "output.x[0] is inf"),
        ({"when": datetime(2026, 1, 2)}, "output.when is a naive datetime (2026-01-02T00:00:00)"),
        ({1: "one"}, "output has a key of type int (1); JSON keys are strings"),
        (Box("b", [], size=(1, object())), "(at output.size[1])"),  # type: ignore[arg-type]
    ],
)
def test_what_json_cannot_carry_is_refused_by_type_and_place(value: Any, message: str) -> None:
    with pytest.raises(ResultError) as caught:
        to_output(value)
    assert message in str(caught.value)


class Query(pydantic.BaseModel):
    doc: str
    limit: int = 10


def test_input_is_validated_against_the_declared_model() -> None:
    assert parse_input(Query, {"doc": "d", "limit": "3"}) == Query(doc="d", limit=3)
    with pytest.raises(InputError) as caught:
        parse_input(Query, {"limit": "many"})
    assert str(caught.value) == (
        "input does not match Query: doc: Field required; "
        "limit: Input should be a valid integer, unable to parse string as an integer"
    )
