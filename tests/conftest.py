"""Shared fixtures for the Ops-Core end-to-end tests.

Everything a test needs is a fixture, so test modules never import from here:

* `clock`, `settings`, `server`, `channel`, `lifecycle`: an in-process server on a
  fake clock and a grpc.aio stub talking to it over a real socket.
* `start_server`: starts further in-process servers (other settings, restarts).
* `settings` runs each test once per store backend (STORE_URLS); `store_url` names
  further stores on the same backend, `db_file` is the SQLite file of `settings`.
* `rpc`: helpers for errors (google.rpc.Status details), polling, the fake clock
  and reading watch streams.
* `spawn_server`: runs `python -m opscore serve` as a child process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from opspawn.opscore.v1 import lifecycle_pb2, lifecycle_pb2_grpc

from opscore.domain.clock import FakeClock
from opscore.server.config import Settings
from opscore.store.factory import split_url

if TYPE_CHECKING:
    from opscore.server.app import OpsCoreServer

REPO_ROOT = Path(__file__).resolve().parent.parent
STATUS_DETAILS_KEY = "grpc-status-details-bin"
POLL_TIMEOUT = 2.0
READ_TIMEOUT = 5.0

Event = lifecycle_pb2.AgentEvent
Stub = lifecycle_pb2_grpc.LifecycleServiceStub


# --------------------------------------------------------------------------- errors


@dataclass
class RpcFailure:
    """A failed call, with the google.rpc.Status details unpacked."""

    code: grpc.StatusCode
    message: str
    status: status_pb2.Status | None
    reason: str | None = None
    error_metadata: dict[str, str] = field(default_factory=dict)
    violations: list[tuple[str, str]] = field(default_factory=list)

    @property
    def fields(self) -> list[str]:
        """The `field` of every BadRequest violation, in order."""
        return [f for f, _ in self.violations]


def rich_status(err: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    """The google.rpc.Status carried in the trailing metadata, if any."""
    for key, value in err.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY:
            raw = value if isinstance(value, bytes) else value.encode()
            return status_pb2.Status.FromString(raw)
    return None


def describe_failure(err: grpc.aio.AioRpcError) -> RpcFailure:
    """Unpacks ErrorInfo and BadRequest from a failed call."""
    status = rich_status(err)
    failure = RpcFailure(code=err.code(), message=err.details() or "", status=status)
    if status is None:
        return failure
    assert status.code == err.code().value[0], "Status proto code differs from the call's"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            failure.reason = info.reason
            failure.error_metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            failure.violations.extend((v.field, v.description) for v in bad.field_violations)
    return failure


# --------------------------------------------------------------------------- helpers


def ts(moment: datetime) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp for an aware datetime."""
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(moment)
    return out


def struct(**values: Any) -> struct_pb2.Struct:
    """A protobuf Struct from keyword arguments."""
    out = struct_pb2.Struct()
    out.update(values)
    return out


def flatten(responses: Iterable[lifecycle_pb2.WatchAgentStatesResponse]) -> list[Event]:
    return [event for response in responses for event in response.events]


class Rpc:
    """Helpers handed to tests through the `rpc` fixture."""

    ts = staticmethod(ts)
    struct = staticmethod(struct)
    describe = staticmethod(describe_failure)

    async def fails(self, call: Awaitable[object], code: grpc.StatusCode) -> RpcFailure:
        """Awaits a unary call that must fail with `code`; returns the unpacked failure."""
        try:
            result = await call
        except grpc.aio.AioRpcError as err:
            failure = describe_failure(err)
            assert failure.code == code, f"expected {code}, got {failure.code}: {failure.message}"
            return failure
        raise AssertionError(f"expected {code}, but the call succeeded: {result!r}")

    async def stream_fails(
        self, call: grpc.aio.UnaryStreamCall, code: grpc.StatusCode, max_events: int = 10_000
    ) -> tuple[RpcFailure, list[Event]]:
        """Reads a stream that must end with `code`; returns the failure and the events read."""
        events: list[Event] = []
        try:
            while len(events) <= max_events:
                response = await asyncio.wait_for(call.read(), READ_TIMEOUT)
                if response is grpc.aio.EOF:
                    raise AssertionError(f"stream ended OK after {len(events)} events")
                events.extend(response.events)
        except grpc.aio.AioRpcError as err:
            failure = describe_failure(err)
            assert failure.code == code, f"expected {code}, got {failure.code}: {failure.message}"
            return failure, events
        except TimeoutError:
            call.cancel()
            raise AssertionError(
                f"stream idle for {READ_TIMEOUT}s after {len(events)} events, expected {code}"
            ) from None
        call.cancel()
        raise AssertionError(f"stream still open after {len(events)} events, expected {code}")

    async def read_events(
        self,
        call: grpc.aio.UnaryStreamCall,
        until: Callable[[list[Event]], bool],
        within: float = READ_TIMEOUT,
    ) -> list[Event]:
        """Reads from a watch stream until `until(events_so_far)` holds."""
        events: list[Event] = []

        async def read() -> None:
            while not until(events):
                response = await call.read()
                assert response is not grpc.aio.EOF, f"stream ended after {len(events)} events"
                events.extend(response.events)

        try:
            await asyncio.wait_for(read(), within)
        except TimeoutError:
            raise AssertionError(
                f"watch did not deliver the expected events within {within}s; got "
                f"{[(e.revision, lifecycle_pb2.AgentEventType.Name(e.type)) for e in events]}"
            ) from None
        return events

    async def read_until_revision(
        self, call: grpc.aio.UnaryStreamCall, revision: int, within: float = READ_TIMEOUT
    ) -> list[Event]:
        """Reads from a watch stream until an event with revision >= `revision` arrives."""
        return await self.read_events(
            call, lambda events: bool(events) and events[-1].revision >= revision, within
        )

    async def replay(
        self,
        stub: Stub,
        since: int,
        until_revision: int | None = None,
        until: Callable[[list[Event]], bool] | None = None,
        **request: Any,
    ) -> list[Event]:
        """Events after `since` from a fresh watch, read until an event with revision >=
        `until_revision` arrives (or until `until(events_so_far)` holds)."""
        if until is None:
            assert until_revision is not None, "give until_revision or until"
            target = until_revision

            def until(events: list[Event]) -> bool:
                return bool(events) and events[-1].revision >= target

        call = stub.WatchAgentStates(
            lifecycle_pb2.WatchAgentStatesRequest(since_revision=since, **request)
        )
        try:
            return await self.read_events(call, until)
        finally:
            call.cancel()

    async def eventually(
        self,
        check: Callable[[], Awaitable[bool]],
        within: float = POLL_TIMEOUT,
        message: str = "condition",
    ) -> None:
        """Polls `check` until it returns True; fails after `within` seconds."""
        deadline = time.monotonic() + within
        while not await check():
            if time.monotonic() > deadline:
                raise AssertionError(f"{message} did not hold within {within}s")
            await asyncio.sleep(0.01)

    async def advance_until(
        self,
        clock: FakeClock,
        check: Callable[[], Awaitable[bool]],
        first: float,
        step: float,
        limit: float,
        message: str = "condition",
    ) -> float:
        """Advances the fake clock by `first`, then by `step`, polling `check` after each
        move, until it holds; never moves more than `limit` seconds in all. Returns the
        total advance. Stepping (instead of one jump) keeps tests correct even when a
        background job is still busy with its previous run when the clock moves."""
        moved = 0.0
        amount = first
        while moved + amount <= limit:
            await clock.advance(amount)
            moved += amount
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                if await check():
                    return moved
                await asyncio.sleep(0.01)
            amount = step
        raise AssertionError(f"{message} did not hold after advancing the clock {moved}s")


@pytest.fixture
def rpc() -> Rpc:
    return Rpc()


# --------------------------------------------------------------------------- in-process server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# The stores the in-process servers run on: a backend name -> the URL of a fresh store
# in a directory. A new backend runs every test that uses `settings` (so `server`,
# `lifecycle`, ...) by adding one entry.
STORE_URLS: dict[str, Callable[[Path], str]] = {
    "sqlite": lambda tmp: f"sqlite://{tmp / 'opscore.db'}",  # sqlite:///abs/path
}


@pytest.fixture(params=sorted(STORE_URLS))
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    return Settings(
        db=STORE_URLS[request.param](tmp_path),
        host="127.0.0.1",
        port=0,
        liveness_timeout=30,
        liveness_check_interval=5,
        max_clock_skew=60,
        event_history_limit=10_000,
        compaction_interval=10,
        watch_buffer=1024,
        shutdown_grace=1,
    )


StoreUrl = Callable[[str], str]


@pytest.fixture
def store_url(request: pytest.FixtureRequest, settings: Settings, tmp_path: Path) -> StoreUrl:
    """URLs of further stores on the backend of `settings`, each in its own directory
    under tmp_path: `settings.model_copy(update={"db": store_url("other")})`."""
    backend = STORE_URLS[request.node.callspec.params["settings"]]

    def url(name: str) -> str:
        (tmp_path / name).mkdir(exist_ok=True)
        return backend(tmp_path / name)

    return url


@pytest.fixture
def db_file(settings: Settings) -> Path:
    """The SQLite file of `settings`, for tests about the file itself (skipped on other
    backends). `settings.db` is a URL: never use it as a path."""
    scheme, location = split_url(settings.db)
    if scheme != "sqlite":
        pytest.skip(f"the {scheme} store is not a SQLite file")
    return Path(location)


StartServer = Callable[..., Awaitable["OpsCoreServer"]]
Connect = Callable[["OpsCoreServer"], Awaitable[Stub]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Starts OpsCoreServers; any still running are stopped at teardown."""
    from opscore.server.app import OpsCoreServer

    running: list[OpsCoreServer] = []

    async def start(settings: Settings, clock: FakeClock | None = None) -> OpsCoreServer:
        server = OpsCoreServer(settings, clock=clock)
        await server.start()
        running.append(server)
        return server

    yield start
    for server in reversed(running):
        with contextlib.suppress(Exception):
            await server.stop(grace=0)


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Opens grpc.aio channels to servers; all are closed at teardown."""
    channels: list[grpc.aio.Channel] = []

    async def open_stub(server: OpsCoreServer) -> Stub:
        channel = grpc.aio.insecure_channel(server.address)
        channels.append(channel)
        return lifecycle_pb2_grpc.LifecycleServiceStub(channel)

    yield open_stub
    for channel in channels:
        await channel.close()


@pytest.fixture
async def server(start_server: StartServer, settings: Settings, clock: FakeClock) -> OpsCoreServer:
    return await start_server(settings, clock)


@pytest.fixture
async def channel(server: OpsCoreServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as chan:
        yield chan


@pytest.fixture
def lifecycle(channel: grpc.aio.Channel) -> Stub:
    return lifecycle_pb2_grpc.LifecycleServiceStub(channel)


# --------------------------------------------------------------------------- subprocess server


class ServerProcess:
    """`python -m opscore serve` as a child process; stderr goes to a log file."""

    def __init__(self, db: Path, log: Path, env: dict[str, str], port: int = 0) -> None:
        self.db = db
        self.log = log
        self._log_file = log.open("wb")
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("OPSCORE_")}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                *("-m", "opscore", "serve", "--host", "127.0.0.1", "--port", str(port)),
                *("--db", str(db)),
            ],
            cwd=REPO_ROOT,
            env={**base_env, **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log_file,
        )
        self.port: int | None = None

    @property
    def address(self) -> str:
        assert self.port is not None, "server not serving yet"
        return f"127.0.0.1:{self.port}"

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (other lines are skipped)."""
        lines = []
        for raw in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                if isinstance(line, dict):
                    lines.append(line)
        return lines

    def log_tail(self, count: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-count:])

    async def wait_serving(self, within: float = 15.0) -> int:
        """Waits for the "serving" log line; returns the bound port."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for line in self.log_lines():
                if line.get("msg") == "serving" and isinstance(line.get("port"), int):
                    self.port = line["port"]
                    return line["port"]
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.proc.returncode} before serving:\n{self.log_tail()}"
                )
            await asyncio.sleep(0.02)
        raise AssertionError(f"server not serving after {within}s:\n{self.log_tail()}")

    async def wait_exit(self, within: float) -> int | None:
        """Waits up to `within` seconds for the process to exit; returns its code or None."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.02)
        return self.proc.poll()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def close(self) -> None:
        self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._log_file.close()


SpawnServer = Callable[..., Awaitable[ServerProcess]]


@pytest.fixture
async def spawn_server(tmp_path: Path) -> AsyncIterator[SpawnServer]:
    """Starts `python -m opscore serve` on a db file and waits until it serves.

    Call as `await spawn_server(db_path, OPSCORE_SHUTDOWN_GRACE="1")`; extra keyword
    arguments become environment variables; `port` (default: any free one) lets a
    restarted server take its predecessor's address. Processes still alive are
    killed at teardown.
    """
    processes: list[ServerProcess] = []

    async def spawn(db: Path | None = None, port: int = 0, **env: str) -> ServerProcess:
        log = tmp_path / f"server-{len(processes)}.log"
        process = ServerProcess(db or tmp_path / "opscore.db", log, env, port)
        processes.append(process)
        await process.wait_serving()
        return process

    yield spawn
    for process in processes:
        process.close()
