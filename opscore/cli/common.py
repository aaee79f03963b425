"""What the client commands share: the --address, --token and --json options,
argument parsers, and running SDK calls with one-line errors and exit codes.

TLS for the client commands comes from the environment only, as it rarely changes
between commands: OPSCORE_CLIENT_TLS_CA (trust this CA; switches to TLS), plus
OPSCORE_CLIENT_TLS_CERT and OPSCORE_CLIENT_TLS_KEY for mutual TLS."""

from __future__ import annotations

import asyncio
import enum
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Annotated, Any, TypeVar

import typer

from opscore.cli import render
from opscore.protocol.errors import OpsCoreError
from opscore.sdk import OpsCoreClient

T = TypeVar("T")

DEFAULT_ADDRESS = "127.0.0.1:50051"
# Largest page a --limit asks for; listing more fetches further pages.
MAX_PAGE = 100

Address = Annotated[
    str,
    typer.Option("--address", envvar="OPSCORE_ADDRESS", help="Server host:port."),
]
Token = Annotated[
    str | None,
    typer.Option(
        envvar="OPSCORE_TOKEN",
        show_default=False,
        help="Operator key or agent token, when the server has authentication on.",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
Limit = Annotated[int | None, typer.Option(min=1, help="Show at most N.")]


def names(members: Iterable[enum.IntEnum]) -> list[str]:
    return [m.name for m in members]


def one_of(choices: list[str]) -> Callable[[str], str]:
    """A parser accepting one of `choices` (protocol enum names, which the SDK takes)
    in any case; anything else is a usage error listing them."""

    def parse(value: str) -> str:
        if value.upper() not in choices:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}")
        return value.upper()

    return parse


def metavar(choices: list[str]) -> str:
    return f"[{'|'.join(choices)}]"


def json_object(text: str) -> dict[str, Any]:
    """Parses a JSON object argument such as --input '{"doc": "q3"}'."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise typer.BadParameter('must be a JSON object, e.g. \'{"key": "value"}\'')
    return value


def key_values(pairs: list[str]) -> dict[str, str]:
    """Parses repeated `key=value` options (--meta)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {pair!r}", param_hint="'--meta'")
        out[key] = value
    return out


def page_size(limit: int | None) -> int:
    return min(limit or MAX_PAGE, MAX_PAGE)


async def take(items: AsyncIterator[T], limit: int | None) -> list[T]:
    """The first `limit` items (all without a limit), fetching no page beyond them."""
    out: list[T] = []
    async for item in items:
        out.append(item)
        if limit is not None and len(out) >= limit:
            break
    return out


def run(address: str, token: str | None, action: Callable[[OpsCoreClient], Awaitable[T]]) -> T:
    """Runs `action` with a client on a fresh event loop; an OpsCoreError becomes a
    one-line message and exit code 1. (Typer already turns Ctrl-C into exit 130 and a
    closed pipe, as in `| head`, into a quiet exit 1.)"""

    env = os.environ.get

    async def main() -> T:
        async with OpsCoreClient(
            address,
            token=token,
            tls_ca=env("OPSCORE_CLIENT_TLS_CA") or None,
            tls_cert=env("OPSCORE_CLIENT_TLS_CERT") or None,
            tls_key=env("OPSCORE_CLIENT_TLS_KEY") or None,
        ) as client:
            return await action(client)

    try:
        return asyncio.run(main())
    except OpsCoreError as exc:
        render.error(exc, address)
        raise typer.Exit(1) from None
