"""Builds the store a URL names, so the composition root and every test suite pick a
backend the same way (`sqlite:///path/to/file.db`, or a plain file path)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from opscore.protocol.errors import ConfigurationError
from opscore.store.base import Store
from opscore.store.sqlite.engine import SqliteConfig
from opscore.store.sqlite.store import SqliteStore


@dataclass(frozen=True)
class StoreConfig:
    url: str
    # SQLite only (see SqliteConfig, the home of these defaults).
    sqlite_synchronous: Literal["NORMAL", "FULL"] = SqliteConfig.synchronous
    sqlite_readers: int = SqliteConfig.readers
    max_batch: int = SqliteConfig.max_batch
    sqlite_quick_check: bool = SqliteConfig.quick_check


def _sqlite(location: str, config: StoreConfig) -> Store:
    if not location:
        raise ConfigurationError("a sqlite URL needs a file path: sqlite:///path/to/file.db")
    return SqliteStore(
        SqliteConfig(
            Path(location),
            synchronous=config.sqlite_synchronous,
            readers=config.sqlite_readers,
            max_batch=config.max_batch,
            quick_check=config.sqlite_quick_check,
        )
    )


BACKENDS: dict[str, Callable[[str, StoreConfig], Store]] = {"sqlite": _sqlite}


def split_url(url: str) -> tuple[str, str]:
    """(backend, location): `sqlite:///a/b.db` -> ("sqlite", "/a/b.db"),
    `sqlite://b.db` -> ("sqlite", "b.db"); a URL with no scheme is a SQLite file path."""
    scheme, sep, rest = url.partition("://")
    return (scheme.lower(), rest) if sep else ("sqlite", url)


def open_store(config: StoreConfig) -> Store:
    """The store for `config.url` (not opened yet)."""
    scheme, location = split_url(config.url)
    backend = BACKENDS.get(scheme)
    if backend is None:
        raise ConfigurationError(
            f"unknown store {scheme!r} in {config.url!r}; supported: {', '.join(BACKENDS)}"
        )
    return backend(location, config)
