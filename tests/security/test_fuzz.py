"""Hostile input: property tests sending arbitrary (but well-formed) messages and raw
garbage to every RPC of the three services.

Properties: the status is never INTERNAL or UNKNOWN, the server keeps serving, and a
refused call (any error status the server returns) changes nothing in the database.

One server serves the whole module. It runs on its own event loop in a thread (so the
tests are plain synchronous hypothesis tests using a blocking gRPC client), with auth
off and a FakeClock that is never advanced: liveness, compaction, retention and the
scheduler never run, so the database changes only through the calls made here.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, message_factory, struct_pb2
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opspawn.opscore.v1 import lifecycle_pb2, session_pb2, workflow_pb2
from security_support import STREAMING, UNARY, Method

from opscore.domain.clock import FakeClock
from opscore.server.app import OpsCoreServer
from opscore.server.config import Settings

L, W, S = lifecycle_pb2, workflow_pb2, session_pb2
FD = descriptor.FieldDescriptor
NEVER = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
# Statuses the client itself ends a call with: not a server refusal.
CLIENT_ENDED = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
STREAM_WAIT = 0.1  # seconds a stream is read before it is cancelled
REFUSAL_WAIT = 5.0  # seconds a stream that must be refused has to answer

AGENT_ID, DEFINITION_ID = "fuzz-agent", "fuzz-def"
KNOWN_IDS = [AGENT_ID, DEFINITION_ID, "1", "fuzz-missing"]  # session id added at setup
FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --------------------------------------------------------------------------- server


class ThreadedServer:
    """An OpsCoreServer on its own event loop in a daemon thread."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-server")
        self.thread.daemon = True
        self.thread.start()
        cfg = Settings(
            db=db,
            host="127.0.0.1",
            port=0,
            shutdown_grace=0,
            max_task_streams_per_agent=1000,
            max_watchers=1000,
        )
        self.server: OpsCoreServer = self.run(self._start(cfg))

    async def _start(self, cfg: Settings) -> OpsCoreServer:
        server = OpsCoreServer(cfg, clock=FakeClock())
        await server.start()
        return server

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.run(self.server.stop(grace=0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


class Fuzz:
    """The running server, a blocking channel to it, and the database checksum."""

    def __init__(self, threaded: ThreadedServer, channel: grpc.Channel) -> None:
        self.threaded = threaded
        self.channel = channel
        self.health = health_pb2_grpc.HealthStub(channel)
        self.session_id = ""
        self.dirty = True  # a stream was cancelled since the last settled checksum

    def checksum(self) -> str:
        """SHA-256 over every row of every table (and the schema), in a fixed order."""
        con = sqlite3.connect(f"file:{self.threaded.db}?mode=ro", uri=True)
        try:
            digest = hashlib.sha256()
            tables = [
                name
                for (name,) in con.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
                )
            ]
            for (sql,) in con.execute("SELECT sql FROM sqlite_master ORDER BY type, name"):
                digest.update(repr(sql).encode())
            for table in tables:
                width = len(con.execute(f'SELECT * FROM "{table}" LIMIT 0').description)
                order = ", ".join(str(i + 1) for i in range(width))
                digest.update(f"\0{table}\0".encode())
                for row in con.execute(f'SELECT * FROM "{table}" ORDER BY {order}'):
                    digest.update(repr(row).encode())
            return digest.hexdigest()
        finally:
            con.close()

    def settled_checksum(self) -> str:
        """The checksum once it stops changing (a cancelled stream may still be writing;
        a unary call has committed everything before it answers)."""
        last = self.checksum()
        if not self.dirty:
            return last
        self.dirty = False
        for _ in range(50):
            time.sleep(0.005)
            now = self.checksum()
            if now == last:
                return now
            last = now
        raise AssertionError("the database keeps changing by itself")

    def serving(self) -> None:
        reply = self.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    threaded = ThreadedServer(tmp_path_factory.mktemp("fuzz") / "fuzz.db")
    try:
        with grpc.insecure_channel(threaded.server.address) as channel:
            out = Fuzz(threaded, channel)
            _populate(out)
            yield out
    finally:
        threaded.close()


def _unary(channel: grpc.Channel, path: str, request: Message, response: Any) -> Any:
    call = channel.unary_unary(
        path, request_serializer=type(request).SerializeToString, response_deserializer=response
    )
    return call(request, timeout=5)


def _populate(fuzz: Fuzz) -> None:
    """An agent, a definition and a session whose task no agent can take (so nothing is
    ever dispatched in the background)."""
    lc, wf = "/opspawn.opscore.v1.LifecycleService/", "/opspawn.opscore.v1.WorkflowService/"
    _unary(
        fuzz.channel,
        lc + "RegisterAgent",
        L.RegisterAgentRequest(agent_id=AGENT_ID, name="fuzz", capabilities=["fuzz-cap"]),
        L.Agent.FromString,
    )
    definition = W.WorkflowDefinition(
        id=DEFINITION_ID,
        version="1",
        tasks=[W.TaskDefinition(task_id="t", name="t", agent_capability="nobody-has-this")],
    )
    _unary(
        fuzz.channel,
        wf + "CreateWorkflowDefinition",
        W.CreateWorkflowDefinitionRequest(definition=definition),
        W.WorkflowDefinition.FromString,
    )
    session = _unary(
        fuzz.channel,
        wf + "StartWorkflow",
        W.StartWorkflowRequest(workflow_definition_id=DEFINITION_ID, request_id="fuzz"),
        S.Session.FromString,
    )
    fuzz.session_id = session.session_id
    KNOWN_IDS.append(session.session_id)


# --------------------------------------------------------------------------- strategies

ODD_TEXT = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "a\x00b",
        "\u202e\u0041",  # right-to-left override
        "\ufeff",
        "\U0001f600" * 3,
        "e\u0301",
        "../../etc/passwd",
        "'; DROP TABLE agents; --",
        "%s%n%x",
        "${jndi:ldap://x}",
        "\r\nX-Injected: 1",
        "a" * 129,
        "b" * 5000,
        "-leading",
        "x" * 64 + "." + "y" * 64,
    ]
)
PLAIN_TEXT = st.one_of(ODD_TEXT, st.text(max_size=24), st.text(min_size=100, max_size=300))
# Known ids are drawn lazily: the session id is added when the server is populated.
TEXT = st.one_of(st.deferred(lambda: st.sampled_from(KNOWN_IDS)), PLAIN_TEXT)
CAPABILITY_FIELDS = ("capabilities", "agent_capability", "capability")
INT_EDGES = [0, 1, -1, 2**31 - 1, -(2**31), 2**32 - 1, 2**53, 2**63 - 1, -(2**63)]


def _ints(bits: int, signed: bool) -> st.SearchStrategy[int]:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    edges = [v for v in INT_EDGES if lo <= v <= hi]
    return st.one_of(
        st.sampled_from(edges),
        st.integers(lo, hi),
        st.integers(-5, 1000).filter(lambda v: lo <= v <= hi),
    )


JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e308, -1e308, 2.0**53 + 1, 5e-324]),
    TEXT,
)
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def _struct(draw: Any) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(draw(st.dictionaries(st.one_of(TEXT, st.text(max_size=8)), JSON, max_size=5)))
    if draw(st.integers(0, 9)) == 0:  # now and then a deep one
        current = out
        for _ in range(draw(st.integers(20, 40))):
            current = current.fields["d"].struct_value
    return out


def _scalar(field: descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t == FD.TYPE_STRING:
        # Capabilities never name known ids, so no fuzzed task is dispatched to a known agent.
        return PLAIN_TEXT if field.name in CAPABILITY_FIELDS else TEXT
    if t == FD.TYPE_BYTES:
        return st.binary(max_size=32)
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.floats(width=64 if t == FD.TYPE_DOUBLE else 32)
    if t == FD.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), _ints(32, True))
    if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return _ints(32, True)
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return _ints(32, False)
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return _ints(64, True)
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return _ints(64, False)
    raise AssertionError(f"no strategy for field type {t} ({field.full_name})")


def messages(desc: descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Arbitrary messages of a type: every field random or unset, a random oneof member,
    repeated and map fields of a few entries; Struct, Timestamp and Duration included."""
    if desc.full_name == "google.protobuf.Struct":
        return _struct()
    cls = message_factory.GetMessageClass(desc)

    def value(field: descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
        if field.type == FD.TYPE_MESSAGE:
            if depth >= 4:
                return st.just(
                    field.message_type and message_factory.GetMessageClass(field.message_type)()
                )
            return messages(field.message_type, depth + 1)
        return _scalar(field)

    parts: dict[str, st.SearchStrategy[Any]] = {}
    for field in desc.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_f, value_f = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            size = 70 if field.name == "metadata" else 4
            parts[field.name] = st.dictionaries(_scalar(key_f), value(value_f), max_size=size)
        elif field.is_repeated:
            size = 70 if field.name == "capabilities" else 5
            parts[field.name] = st.lists(value(field), max_size=size if depth == 0 else 3)
        else:
            parts[field.name] = value(field)
    real_oneofs = [o for o in desc.oneofs if not o.name.startswith("_")]

    @st.composite
    def build(draw: Any) -> Message:
        msg = cls()
        chosen = {
            o.name: draw(st.sampled_from([None, *(f.name for f in o.fields)])) for o in real_oneofs
        }
        for field in desc.fields:
            oneof = field.containing_oneof
            if oneof is not None and oneof.name in chosen:
                if chosen[oneof.name] != field.name:
                    continue
            elif not draw(st.booleans()):
                continue
            item = draw(parts[field.name])
            _set(msg, field, item)
        return msg

    return build()


def _set(msg: Message, field: descriptor.FieldDescriptor, item: Any) -> None:
    target = getattr(msg, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_f = field.message_type.fields_by_name["value"]
        for key, value in item.items():
            if value_f.type == FD.TYPE_MESSAGE:
                target[key].CopyFrom(value)
            else:
                target[key] = value
    elif field.is_repeated:
        if field.type == FD.TYPE_MESSAGE:
            for value in item:
                target.add().CopyFrom(value)
        else:
            target.extend(item)
    elif field.type == FD.TYPE_MESSAGE:
        target.CopyFrom(item)
    else:
        setattr(msg, field.name, item)


# --------------------------------------------------------------------------- calling


def _code(err: grpc.RpcError) -> grpc.StatusCode:
    return err.code()  # type: ignore[no-any-return, attr-defined]


def send(
    fuzz: Fuzz, method: Method, payload: bytes, wait: float = STREAM_WAIT
) -> tuple[grpc.StatusCode | None, str]:
    """Sends raw request bytes; returns the server's status (None: a stream admitted and
    still open, ended by the client) and its message."""
    if not method.streaming:
        call = fuzz.channel.unary_unary(method.path)
        try:
            call(payload, timeout=10)
        except grpc.RpcError as err:
            return _code(err), str(err.details())  # type: ignore[attr-defined]
        return grpc.StatusCode.OK, ""
    fuzz.dirty = True
    stream = fuzz.channel.unary_stream(method.path)(payload, timeout=wait)
    try:
        next(stream)
    except StopIteration:
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        code = _code(err)
        return (None if code in CLIENT_ENDED else code), str(err.details())  # type: ignore[attr-defined]
    finally:
        stream.cancel()
    return None, ""


def check(
    fuzz: Fuzz,
    method: Method,
    payload: bytes,
    expect: grpc.StatusCode | None = None,
) -> None:
    """The three properties for one call."""
    before = fuzz.settled_checksum()
    wait = REFUSAL_WAIT if expect is not None else STREAM_WAIT
    code, message = send(fuzz, method, payload, wait)
    assert code not in NEVER, f"{method.name} -> {code}: {message} (request {payload[:200]!r})"
    if expect is not None:
        assert code == expect, f"{method.name} -> {code}, expected {expect}: {message}"
    if code is not None and code != grpc.StatusCode.OK:
        after = fuzz.settled_checksum()
        assert after == before, (
            f"{method.name} refused with {code.name} ({message}) but changed the database "
            f"(request {payload[:200]!r})"
        )
    fuzz.serving()


TASK_METHODS = ("CompleteTask", "FailTask", "HeartbeatTask")


def _serialize(msg: Message) -> bytes:
    return msg.SerializeToString()


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("method", UNARY, ids=str)
@FUZZ
@given(data=st.data())
def test_unary_rpcs_survive_arbitrary_messages(fuzz: Fuzz, method: Method, data: Any) -> None:
    """Arbitrary well-formed requests to every unary RPC: never INTERNAL/UNKNOWN, the
    server keeps serving, and a refused call leaves the database unchanged."""
    request = data.draw(messages(method.request.DESCRIPTOR), label="request")
    check(fuzz, method, _serialize(request))


@pytest.mark.parametrize("method", STREAMING, ids=str)
@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_streaming_rpcs_survive_arbitrary_messages(fuzz: Fuzz, method: Method, data: Any) -> None:
    """Arbitrary requests opening every streaming RPC (read briefly, then cancelled):
    never INTERNAL/UNKNOWN, and a refused stream leaves the database unchanged."""
    request = data.draw(messages(method.request.DESCRIPTOR), label="request")
    check(fuzz, method, _serialize(request))


def _parsed(method: Method, payload: bytes) -> Message | None:
    try:
        return method.request.FromString(payload)
    except DecodeError:
        return None


def _parses(method: Method, payload: bytes) -> bool:
    return _parsed(method, payload) is not None


ALL_METHODS = UNARY + STREAMING
BY_NAME = {m.name: m for m in ALL_METHODS}


@pytest.mark.parametrize("method", ALL_METHODS, ids=str)
@settings(FUZZ, max_examples=40)
@given(payload=st.binary(min_size=1, max_size=120))
def test_random_bytes_are_refused_cleanly(fuzz: Fuzz, method: Method, payload: bytes) -> None:
    """Random bytes as a request: INVALID_ARGUMENT when they are not a valid message of the
    request type, never INTERNAL/UNKNOWN, and nothing changes on refusal."""
    parsed = _parsed(method, payload)
    expect = None if parsed is not None else grpc.StatusCode.INVALID_ARGUMENT
    check(fuzz, method, payload, expect)


CRAFTED = {
    "truncated-varint": b"\x08\x80",
    "truncated-tag": b"\x80",
    "huge-length-prefix": b"\x0a\xff\xff\xff\xff\x0f",
    "length-past-end": b"\x0a\x10abc",
    "invalid-utf8-string": b"\x0a\x03\xff\xfe\xfd",
    "overlong-varint": b"\x08" + b"\xff" * 10 + b"\x01",
    "field-number-zero": b"\x00\x01",
    "end-group-without-start": b"\x0c",
    "start-group-unclosed": b"\x0b\x08\x01",
    "wire-type-6": b"\x0e\x00",
    "fixed64-truncated": b"\x09\x01\x02",
    "nested-huge-length": b"\x12\x05\x0a\xff\xff\xff\x7f",
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_malformed_requests(fuzz: Fuzz, name: str) -> None:
    """Hand-made malformed encodings sent to every RPC: INVALID_ARGUMENT whenever the bytes
    do not parse, never INTERNAL/UNKNOWN, and nothing changes."""
    payload = CRAFTED[name]
    for method in ALL_METHODS:
        parsed = _parsed(method, payload)
        expect = None if parsed is not None else grpc.StatusCode.INVALID_ARGUMENT
        check(fuzz, method, payload, expect)


def test_crafted_garbage_is_really_invalid() -> None:
    """The crafted encodings that are malformed for any message are refused by the local
    parser too (so the test above really expects INVALID_ARGUMENT for them)."""
    for name in ("truncated-varint", "huge-length-prefix", "length-past-end", "wire-type-6"):
        for method in ALL_METHODS:
            assert not _parses(method, CRAFTED[name]), (name, method.name)


def test_invalid_utf8_in_every_string_field(fuzz: Fuzz) -> None:
    """Invalid UTF-8 in any string field of any request is INVALID_ARGUMENT."""
    for method in ALL_METHODS:
        for field in method.request.DESCRIPTOR.fields:
            if field.type != FD.TYPE_STRING:
                continue
            tag = (field.number << 3) | 2
            payload = _varint(tag) + b"\x02\xc3\x28"
            check(fuzz, method, payload, grpc.StatusCode.INVALID_ARGUMENT)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def test_fixtures_still_exist(fuzz: Fuzz) -> None:
    """The pre-populated session is still there (the fuzzing reached a live server)."""
    session = _unary(
        fuzz.channel,
        "/opspawn.opscore.v1.SessionService/GetSession",
        S.GetSessionRequest(session_id=fuzz.session_id),
        S.Session.FromString,
    )
    assert session.workflow_definition_id == DEFINITION_ID


# --------------------------------------------------------------------------- found bugs


def _status(fuzz: Fuzz, method_name: str, request: Message) -> grpc.StatusCode:
    method = next(m for m in ALL_METHODS if m.name == method_name)
    code, _ = send(fuzz, method, request.SerializeToString(), REFUSAL_WAIT)
    assert code is not None
    return code


def _non_finite_carriers(value: float) -> dict[str, tuple[str, Message]]:
    details = L.UpdateAgentStateRequest(agent_id=AGENT_ID, state=L.AGENT_STATE_IDLE)
    details.details.update({"x": value})
    start = W.StartWorkflowRequest(workflow_definition_id=DEFINITION_ID)
    start.input.update({"x": value})
    definition = W.WorkflowDefinition(
        id="nonfinite",
        version="1",
        tasks=[W.TaskDefinition(task_id="t", agent_capability="nobody-has-this")],
    )
    definition.tasks[0].parameters.update({"x": [1, {"y": value}]})
    complete = W.CompleteTaskRequest(task_token="abc.def")
    complete.output.update({"x": value})
    return {
        "state-details": ("UpdateAgentState", details),
        "start-input": ("StartWorkflow", start),
        "definition-parameters": (
            "CreateWorkflowDefinition",
            W.CreateWorkflowDefinitionRequest(definition=definition),
        ),
        "task-output": ("CompleteTask", complete),
    }


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    "carrier", ["state-details", "start-input", "definition-parameters", "task-output"]
)
def test_non_finite_struct_numbers_are_invalid(fuzz: Fuzz, carrier: str, value: float) -> None:
    """NaN or ±Infinity in any request Struct is INVALID_ARGUMENT (JSON cannot hold it)."""
    name, request = _non_finite_carriers(value)[carrier]
    assert _status(fuzz, name, request) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("method_name", TASK_METHODS)
def test_non_ascii_task_token_is_invalid(fuzz: Fuzz, method_name: str) -> None:
    """A task token with non-ASCII characters is INVALID_ARGUMENT like any forged token."""
    request = BY_NAME[method_name].request(task_token="abc.\u00e9")
    assert _status(fuzz, method_name, request) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(2**62, 0), (-(2**62), 0), (253402300800, 0), (0, -5), (0, 2**31 - 1)],
    ids=["huge", "very-negative", "year-10000", "negative-nanos", "nanos-overflow"],
)
def test_out_of_range_observed_at_is_invalid(fuzz: Fuzz, seconds: int, nanos: int) -> None:
    """An observed_at no datetime can hold is INVALID_ARGUMENT."""
    request = L.UpdateAgentStateRequest(agent_id=AGENT_ID, state=L.AGENT_STATE_IDLE)
    request.observed_at.seconds = seconds
    request.observed_at.nanos = nanos
    assert _status(fuzz, "UpdateAgentState", request) == grpc.StatusCode.INVALID_ARGUMENT
