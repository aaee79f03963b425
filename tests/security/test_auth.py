"""Authentication and authorization: operator keys with roles, agent tokens and their
grants, and the RULES table of opscore.api.interceptors.auth (the matrix of every RPC
and credential kind is in test_auth_matrix.py)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opspawn.opscore.v1 import (
    lifecycle_pb2,
    lifecycle_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    workflow_pb2,
    workflow_pb2_grpc,
)
from security_support import (
    METHODS,
    SERVICES,
    STREAM_OPEN,
    Keys,
    bearer,
    outcome,
    write_keys_file,
)

from opscore.api.interceptors.auth import RULES
from opscore.domain.access import AGENT_TOKEN_PREFIX, OPERATOR_KEY_PREFIX, Role, new_secret
from opscore.domain.clock import FakeClock
from opscore.server.config import Settings

L = lifecycle_pb2
W = workflow_pb2
OPERATOR_ROLES = (Role.ADMIN, Role.OPERATOR, Role.VIEWER)
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
READ_TIMEOUT = 5.0

# Requests that end quickly and change nothing when sent by an operator role (an
# empty request is refused as INVALID_ARGUMENT by most methods, which counts as
# "allowed": authorization passed).
BENIGN: dict[str, dict[str, Any]] = {
    "WatchAgentStates": {"send_initial_state": True},  # snapshot first: no waiting
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def keys() -> Keys:
    return Keys.fresh()


@pytest.fixture(params=["api_keys", "keys_file"])
def auth_settings(
    request: pytest.FixtureRequest, settings: Settings, keys: Keys, tmp_path: Path
) -> Settings:
    """Settings with an admin, an operator and a viewer key, from env text or a file."""
    if request.param == "api_keys":
        return settings.model_copy(update={"api_keys": keys.api_keys})
    path = write_keys_file(tmp_path / "keys.yaml", keys.entries)
    return settings.model_copy(update={"keys_file": path})


@pytest.fixture
async def auth_server(start_server: Any, auth_settings: Settings, clock: FakeClock) -> Any:
    server = await start_server(auth_settings, clock)
    assert server.authenticator.enabled
    return server


@pytest.fixture
async def chan(auth_server: Any) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(auth_server.address) as channel:
        yield channel


class Agents:
    """Agents A (capability "work") and B (capability "other") and their tokens."""

    def __init__(self, channel: grpc.aio.Channel, keys: Keys) -> None:
        self.channel = channel
        self.lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        self.workflow = workflow_pb2_grpc.WorkflowServiceStub(channel)
        self.sessions = session_pb2_grpc.SessionServiceStub(channel)
        self.admin = bearer(keys[Role.ADMIN])
        self.operator = bearer(keys[Role.OPERATOR])
        self.viewer = bearer(keys[Role.VIEWER])
        self.tokens: dict[str, str] = {}

    async def register(self, agent_id: str, capability: str) -> str:
        agent = await self.lifecycle.RegisterAgent(
            L.RegisterAgentRequest(agent_id=agent_id, name=agent_id, capabilities=[capability]),
            metadata=self.admin,
        )
        assert agent.agent_token.startswith(AGENT_TOKEN_PREFIX), "first registration: a token"
        self.tokens[agent_id] = agent.agent_token
        return agent.agent_token

    def md(self, agent_id: str) -> tuple[tuple[str, str], ...]:
        return bearer(self.tokens[agent_id])


@pytest.fixture
async def agents(chan: grpc.aio.Channel, keys: Keys) -> Agents:
    out = Agents(chan, keys)
    await out.register("agent-a", "work")
    await out.register("agent-b", "other")
    return out


async def fails(call: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    try:
        result = await call
    except grpc.aio.AioRpcError as err:
        assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"
        return err
    raise AssertionError(f"expected {code.name}, but the call succeeded: {result!r}")


async def first_assignment(call: Any) -> workflow_pb2.TaskAssignment:
    assignment = await asyncio.wait_for(call.read(), READ_TIMEOUT)
    assert assignment is not grpc.aio.EOF, "task stream ended"
    return assignment  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- credentials


BAD_CREDENTIALS = {
    "missing": None,
    "empty-bearer": (("authorization", "Bearer "),),
    "wrong-scheme": (("authorization", "Basic dXNlcjpwYXNz"),),
    "garbage": bearer("garbage!not~a token"),
    "unknown-operator-key": bearer(new_secret(OPERATOR_KEY_PREFIX)),
    "unknown-agent-token": bearer(new_secret(AGENT_TOKEN_PREFIX)),
    "key-hash-instead-of-key": "HASH",
}


@pytest.mark.parametrize("credential", list(BAD_CREDENTIALS))
@pytest.mark.parametrize(
    "method_name", ["ListAgents", "GetSession", "WatchAgentStates", "StreamTasks", "CompleteTask"]
)
async def test_bad_credentials_are_unauthenticated(
    chan: grpc.aio.Channel, keys: Keys, credential: str, method_name: str
) -> None:
    """Missing, malformed, unknown or hash-only credentials get UNAUTHENTICATED."""
    metadata = BAD_CREDENTIALS[credential]
    if metadata == "HASH":  # the configured sha256 is not itself a credential
        metadata = bearer(next(k.sha256 for k in keys.entries if k.role is Role.ADMIN))
    method = next(m for m in METHODS if m.name == method_name)
    result = await outcome(chan, method, method.request(**BENIGN.get(method_name, {})), metadata)
    assert result.code == UNAUTH, str(result)


async def test_unauthenticated_error_names_no_token(chan: grpc.aio.Channel) -> None:
    """The UNAUTHENTICATED message does not echo the presented token."""
    token = new_secret(OPERATOR_KEY_PREFIX)
    stub = lifecycle_pb2_grpc.LifecycleServiceStub(chan)
    err = await fails(stub.ListAgents(L.ListAgentsRequest(), metadata=bearer(token)), UNAUTH)
    assert token not in (err.details() or "")
    assert token[4:] not in str(err.trailing_metadata())


# --------------------------------------------------------------------------- RULES


def test_rules_cover_every_rpc() -> None:
    """Every RPC of the three services has an access rule (and every rule an RPC)."""
    paths = {m.path for m in METHODS}
    assert len(SERVICES) == 3
    assert paths == set(RULES), (
        f"no rule: {sorted(paths - set(RULES))}; no rpc: {sorted(set(RULES) - paths)}"
    )


# --------------------------------------------------------------------------- open services


async def test_health_and_reflection_need_no_token(chan: grpc.aio.Channel) -> None:
    """Health Check and reflection's service list work without credentials."""
    health = health_pb2_grpc.HealthStub(chan)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(chan)
    call = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = set()
    async for response in call:
        names |= {s.name for s in response.list_services_response.service}
    assert {s.full_name for s in SERVICES} <= names


# --------------------------------------------------------------------------- agent tokens


async def test_agent_acts_only_for_itself(agents: Agents) -> None:
    """Agent A reports state, heartbeats and streams tasks for itself, never for B."""
    lc, wf, a = agents.lifecycle, agents.workflow, agents.md("agent-a")
    reply = await lc.UpdateAgentState(
        L.UpdateAgentStateRequest(agent_id="agent-a", state=L.AGENT_STATE_IDLE), metadata=a
    )
    assert reply.state == L.AGENT_STATE_IDLE
    await lc.Heartbeat(L.HeartbeatRequest(agent_id="agent-a"), metadata=a)
    await lc.GetAgent(L.GetAgentRequest(agent_id="agent-a"), metadata=a)
    stream_tasks = next(m for m in METHODS if m.name == "StreamTasks")
    opened = await outcome(
        agents.channel, stream_tasks, W.StreamTasksRequest(agent_id="agent-a"), a
    )
    assert opened.code == STREAM_OPEN, str(opened)

    await fails(
        lc.UpdateAgentState(
            L.UpdateAgentStateRequest(agent_id="agent-b", state=L.AGENT_STATE_ERROR), metadata=a
        ),
        DENIED,
    )
    await fails(lc.Heartbeat(L.HeartbeatRequest(agent_id="agent-b"), metadata=a), DENIED)
    await fails(lc.GetAgent(L.GetAgentRequest(agent_id="agent-b"), metadata=a), DENIED)
    await fails(
        lc.DeregisterAgent(L.DeregisterAgentRequest(agent_id="agent-b"), metadata=a), DENIED
    )
    await fails(lc.ListAgents(L.ListAgentsRequest(), metadata=a), DENIED)
    await fails(
        lc.RotateAgentToken(L.RotateAgentTokenRequest(agent_id="agent-a"), metadata=a), DENIED
    )
    other = wf.StreamTasks(W.StreamTasksRequest(agent_id="agent-b"), metadata=a)
    await fails(other.read(), DENIED)
    b = await lc.GetAgent(L.GetAgentRequest(agent_id="agent-b"), metadata=agents.viewer)
    assert b.state == L.AGENT_STATE_INITIALIZING, "B is untouched"


async def test_agent_cannot_answer_another_agents_task(agents: Agents) -> None:
    """A task dispatched to A cannot be completed, failed or heartbeated by B; A can."""
    wf, a, b = agents.workflow, agents.md("agent-a"), agents.md("agent-b")
    stream = wf.StreamTasks(W.StreamTasksRequest(agent_id="agent-a"), metadata=a)
    try:
        definition = W.WorkflowDefinition(
            id="theft",
            version="1",
            tasks=[W.TaskDefinition(task_id="only", name="only", agent_capability="work")],
        )
        session = await wf.StartWorkflow(
            W.StartWorkflowRequest(definition=definition), metadata=agents.operator
        )
        task = await first_assignment(stream)
        assert task.session_id == session.session_id
        token = task.task_token
        await fails(wf.CompleteTask(W.CompleteTaskRequest(task_token=token), metadata=b), DENIED)
        await fails(
            wf.FailTask(W.FailTaskRequest(task_token=token, error_message="x"), metadata=b),
            DENIED,
        )
        await fails(wf.HeartbeatTask(W.HeartbeatTaskRequest(task_token=token), metadata=b), DENIED)
        await fails(
            wf.CompleteTask(W.CompleteTaskRequest(task_token=token), metadata=agents.admin),
            DENIED,
        )
        sessions = agents.sessions
        mid = await sessions.GetSession(
            session_pb2.GetSessionRequest(session_id=session.session_id), metadata=agents.viewer
        )
        assert mid.status == session_pb2.SESSION_STATUS_RUNNING, "B's attempts changed nothing"
        assert mid.tasks[0].agent_id == "agent-a"
        await wf.HeartbeatTask(W.HeartbeatTaskRequest(task_token=token), metadata=a)
        await wf.CompleteTask(W.CompleteTaskRequest(task_token=token), metadata=a)
        done = await sessions.GetSession(
            session_pb2.GetSessionRequest(session_id=session.session_id), metadata=agents.viewer
        )
        assert done.status == session_pb2.SESSION_STATUS_COMPLETED
    finally:
        stream.cancel()


async def test_agent_token_shown_only_once(agents: Agents) -> None:
    """Re-registration, GetAgent, ListAgents and watch events never return a token."""
    lc = agents.lifecycle
    again = await lc.RegisterAgent(
        L.RegisterAgentRequest(agent_id="agent-a", name="agent-a", capabilities=["work"]),
        metadata=agents.admin,
    )
    assert again.agent_token == ""
    changed = await lc.RegisterAgent(
        L.RegisterAgentRequest(agent_id="agent-a", name="renamed", capabilities=["work"]),
        metadata=agents.operator,
    )
    assert changed.agent_token == ""
    got = await lc.GetAgent(L.GetAgentRequest(agent_id="agent-a"), metadata=agents.admin)
    assert got.agent_token == ""
    listed = await lc.ListAgents(L.ListAgentsRequest(), metadata=agents.admin)
    assert all(x.agent_token == "" for x in listed.agents)
    watch = lc.WatchAgentStates(L.WatchAgentStatesRequest(since_revision=0), metadata=agents.admin)
    try:
        response = await asyncio.wait_for(watch.read(), READ_TIMEOUT)
        assert response.events and all(e.agent.agent_token == "" for e in response.events)
    finally:
        watch.cancel()
    # The unchanged token still works.
    await lc.Heartbeat(L.HeartbeatRequest(agent_id="agent-a"), metadata=agents.md("agent-a"))


async def test_rotated_agent_token_replaces_the_old_one(agents: Agents) -> None:
    """After RotateAgentToken the old token is UNAUTHENTICATED and the new one works."""
    lc = agents.lifecycle
    old = agents.md("agent-a")
    rotated = await lc.RotateAgentToken(
        L.RotateAgentTokenRequest(agent_id="agent-a"), metadata=agents.admin
    )
    assert rotated.agent_token.startswith(AGENT_TOKEN_PREFIX)
    assert rotated.agent_token != agents.tokens["agent-a"]
    await fails(lc.Heartbeat(L.HeartbeatRequest(agent_id="agent-a"), metadata=old), UNAUTH)
    new = bearer(rotated.agent_token)
    await lc.Heartbeat(L.HeartbeatRequest(agent_id="agent-a"), metadata=new)
    # B's token is unaffected; an operator may not rotate.
    await lc.Heartbeat(L.HeartbeatRequest(agent_id="agent-b"), metadata=agents.md("agent-b"))
    await fails(
        lc.RotateAgentToken(
            L.RotateAgentTokenRequest(agent_id="agent-b"), metadata=agents.operator
        ),
        DENIED,
    )


async def test_rotation_ends_open_task_stream_access(agents: Agents) -> None:
    """After rotation the old token can no longer open the agent's task stream."""
    wf, lc = agents.workflow, agents.lifecycle
    old = agents.md("agent-a")
    await lc.RotateAgentToken(L.RotateAgentTokenRequest(agent_id="agent-a"), metadata=agents.admin)
    await fails(
        wf.StreamTasks(W.StreamTasksRequest(agent_id="agent-a"), metadata=old).read(), UNAUTH
    )


async def test_deregistration_revokes_the_agent_token(agents: Agents) -> None:
    """A deregistered agent's token is UNAUTHENTICATED, also after re-registration."""
    lc = agents.lifecycle
    a = agents.md("agent-a")
    await lc.DeregisterAgent(L.DeregisterAgentRequest(agent_id="agent-a"), metadata=agents.admin)
    await fails(lc.Heartbeat(L.HeartbeatRequest(agent_id="agent-a"), metadata=a), UNAUTH)
    again = await lc.RegisterAgent(
        L.RegisterAgentRequest(agent_id="agent-a", name="agent-a", capabilities=["work"]),
        metadata=agents.admin,
    )
    assert again.agent_token.startswith(AGENT_TOKEN_PREFIX)
    assert again.agent_token != agents.tokens["agent-a"]
    await fails(lc.Heartbeat(L.HeartbeatRequest(agent_id="agent-a"), metadata=a), UNAUTH)
    await lc.Heartbeat(L.HeartbeatRequest(agent_id="agent-a"), metadata=bearer(again.agent_token))


async def test_agent_tokens_survive_restart(
    start_server: Any, settings: Settings, keys: Keys, clock: FakeClock
) -> None:
    """Agent tokens are stored (hashed): they work after a restart, revoked ones do not."""
    cfg = settings.model_copy(update={"api_keys": keys.api_keys})
    server = await start_server(cfg, clock)
    async with grpc.aio.insecure_channel(server.address) as channel:
        ag = Agents(channel, keys)
        await ag.register("agent-a", "work")
        old = ag.tokens["agent-a"]
        rotated = await ag.lifecycle.RotateAgentToken(
            L.RotateAgentTokenRequest(agent_id="agent-a"), metadata=ag.admin
        )
    await server.stop(grace=0)
    server = await start_server(cfg, clock)
    async with grpc.aio.insecure_channel(server.address) as channel:
        lc = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        hb = L.HeartbeatRequest(agent_id="agent-a")
        await lc.Heartbeat(hb, metadata=bearer(rotated.agent_token))
        await fails(lc.Heartbeat(hb, metadata=bearer(old)), UNAUTH)


# --------------------------------------------------------------------------- agent grants


def registration(agent_id: str, *capabilities: str, **fields: Any) -> L.RegisterAgentRequest:
    return L.RegisterAgentRequest(
        agent_id=agent_id, name=fields.pop("name", agent_id), capabilities=capabilities, **fields
    )


async def record(agents: Agents, agent_id: str) -> L.Agent:
    return await agents.lifecycle.GetAgent(
        L.GetAgentRequest(agent_id=agent_id), metadata=agents.viewer
    )


@pytest.mark.parametrize(
    "change",
    [
        {"capabilities": ("work", "other")},
        {"capabilities": ("other",)},
        {"capabilities": ("work",), "name": "renamed"},
        {"capabilities": ("work",), "version": "2"},
    ],
    ids=["extra-capability", "other-capability", "name", "version"],
)
async def test_agent_may_not_register_itself_beyond_its_grant(
    agents: Agents, change: dict[str, Any]
) -> None:
    """With its own token, agent A may not add a capability or change its name or
    version: PERMISSION_DENIED saying an operator must, and its record is unchanged."""
    lc, a = agents.lifecycle, agents.md("agent-a")
    before = await record(agents, "agent-a")
    fields = dict(change)
    err = await fails(
        lc.RegisterAgent(
            registration("agent-a", *fields.pop("capabilities"), **fields), metadata=a
        ),
        DENIED,
    )
    assert "an operator must register" in (err.details() or "")
    assert await record(agents, "agent-a") == before


async def test_widened_agent_receives_no_task_of_another_capability(agents: Agents) -> None:
    """The reported attack: A tries to take on B's capability, then a task of it is
    started while A's task stream is open; the task still goes to B."""
    lc, wf, a = agents.lifecycle, agents.workflow, agents.md("agent-a")
    await fails(lc.RegisterAgent(registration("agent-a", "work", "other"), metadata=a), DENIED)
    a_stream = wf.StreamTasks(W.StreamTasksRequest(agent_id="agent-a"), metadata=a)
    b_stream = None
    try:
        definition = W.WorkflowDefinition(
            id="steal",
            version="1",
            tasks=[W.TaskDefinition(task_id="t", name="t", agent_capability="other")],
        )
        session = await wf.StartWorkflow(
            W.StartWorkflowRequest(definition=definition), metadata=agents.operator
        )
        b_stream = wf.StreamTasks(
            W.StreamTasksRequest(agent_id="agent-b"), metadata=agents.md("agent-b")
        )
        task = await first_assignment(b_stream)
        assert task.session_id == session.session_id
        assert (await record(agents, "agent-a")).capabilities == ["work"]
    finally:
        a_stream.cancel()
        if b_stream is not None:
            b_stream.cancel()


async def test_agent_may_narrow_and_widen_again_within_its_grant(agents: Agents) -> None:
    """Granted "a", "b" and "c": the agent re-registers as "a" alone, then as all
    three again (the grant is stored, not the current record), with new metadata;
    a fourth capability is refused."""
    lc = agents.lifecycle
    granted = await lc.RegisterAgent(
        registration("agent-c", "a", "b", "c", version="1"), metadata=agents.operator
    )
    c = bearer(granted.agent_token)
    narrowed = await lc.RegisterAgent(registration("agent-c", "a", version="1"), metadata=c)
    assert list(narrowed.capabilities) == ["a"]
    widened = await lc.RegisterAgent(
        registration(
            "agent-c", "c", "b", "a", version="1", metadata={"pid": "7"}, contact_endpoint="h:1"
        ),
        metadata=c,
    )
    assert list(widened.capabilities) == ["c", "b", "a"]
    assert dict(widened.metadata) == {"pid": "7"} and widened.contact_endpoint == "h:1"
    assert widened.agent_token == "", "re-registration issues no token"
    again = await lc.RegisterAgent(
        registration(
            "agent-c", "c", "b", "a", version="1", metadata={"pid": "7"}, contact_endpoint="h:1"
        ),
        metadata=c,
    )
    assert again.revision == widened.revision, "an identical retry changes nothing"
    await fails(
        lc.RegisterAgent(registration("agent-c", "a", "d", version="1"), metadata=c), DENIED
    )
    assert (await record(agents, "agent-c")).revision == widened.revision


async def test_operator_registration_sets_the_grant(agents: Agents) -> None:
    """An operator's re-registration is the new grant, narrower or wider: after one
    with "work" alone the agent may not go back to "work" + "more", after one with
    "more" it may."""
    lc, a = agents.lifecycle, agents.md("agent-a")
    wider = registration("agent-a", "work", "more")
    await fails(lc.RegisterAgent(wider, metadata=a), DENIED)
    await lc.RegisterAgent(wider, metadata=agents.operator)
    await lc.RegisterAgent(registration("agent-a", "work"), metadata=a)
    await lc.RegisterAgent(wider, metadata=a)
    # The operator registers exactly the current record: the grant narrows all the same.
    await lc.RegisterAgent(registration("agent-a", "work"), metadata=agents.admin)
    await lc.RegisterAgent(registration("agent-a", "work"), metadata=agents.operator)
    await fails(lc.RegisterAgent(wider, metadata=a), DENIED)


async def test_agent_may_not_deregister_itself(agents: Agents) -> None:
    """DeregisterAgent with the agent's own token is PERMISSION_DENIED (an admin must),
    and the agent and its token are untouched."""
    lc, a = agents.lifecycle, agents.md("agent-a")
    before = await record(agents, "agent-a")
    err = await fails(
        lc.DeregisterAgent(L.DeregisterAgentRequest(agent_id="agent-a"), metadata=a), DENIED
    )
    assert "operator key" in (err.details() or "")
    assert await record(agents, "agent-a") == before
    await lc.Heartbeat(L.HeartbeatRequest(agent_id="agent-a"), metadata=a)


async def test_agent_grant_survives_restart(
    start_server: Any, settings: Settings, keys: Keys, clock: FakeClock
) -> None:
    """The grant is stored: after a restart a narrowed agent may widen again up to it,
    and no further."""
    cfg = settings.model_copy(update={"api_keys": keys.api_keys})
    server = await start_server(cfg, clock)
    async with grpc.aio.insecure_channel(server.address) as channel:
        ag = Agents(channel, keys)
        granted = await ag.lifecycle.RegisterAgent(
            registration("agent-a", "work", "more"), metadata=ag.admin
        )
        token = bearer(granted.agent_token)
        await ag.lifecycle.RegisterAgent(registration("agent-a", "work"), metadata=token)
    await server.stop(grace=0)
    server = await start_server(cfg, clock)
    async with grpc.aio.insecure_channel(server.address) as channel:
        lc = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        widened = await lc.RegisterAgent(registration("agent-a", "work", "more"), metadata=token)
        assert list(widened.capabilities) == ["work", "more"]
        await fails(lc.RegisterAgent(registration("agent-a", "x"), metadata=token), DENIED)


# --------------------------------------------------------------------------- key reload


async def test_operator_key_rotation_by_reload(
    start_server: Any, settings: Settings, clock: FakeClock, tmp_path: Path
) -> None:
    """Editing the keys file and calling reload_keys revokes removed keys and admits new
    ones without a restart; a broken file or an empty one keeps the old keys."""
    keys = Keys.fresh()
    path = write_keys_file(tmp_path / "keys.yaml", keys.entries)
    server = await start_server(settings.model_copy(update={"keys_file": path}), clock)
    request = L.ListAgentsRequest()
    async with grpc.aio.insecure_channel(server.address) as channel:
        lc = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        await lc.ListAgents(request, metadata=bearer(keys[Role.OPERATOR]))

        fresh = Keys.fresh("new-")
        kept_admin = next(k for k in keys.entries if k.role is Role.ADMIN)
        write_keys_file(path, [kept_admin, *fresh.entries[1:]])  # new operator and viewer
        server.reload_keys()
        await fails(lc.ListAgents(request, metadata=bearer(keys[Role.OPERATOR])), UNAUTH)
        await fails(lc.ListAgents(request, metadata=bearer(keys[Role.VIEWER])), UNAUTH)
        await lc.ListAgents(request, metadata=bearer(fresh[Role.OPERATOR]))
        await lc.ListAgents(request, metadata=bearer(fresh[Role.VIEWER]))
        await lc.ListAgents(request, metadata=bearer(keys[Role.ADMIN]))
        # The new viewer key has the viewer role, not more.
        await fails(
            lc.RegisterAgent(
                L.RegisterAgentRequest(agent_id="x", name="x"),
                metadata=bearer(fresh[Role.VIEWER]),
            ),
            DENIED,
        )

        path.write_text("keys: [ {name: broken", encoding="utf-8")
        server.reload_keys()
        await lc.ListAgents(request, metadata=bearer(fresh[Role.OPERATOR]))
        path.write_text("keys: []\n", encoding="utf-8")
        server.reload_keys()  # would turn auth off: refused, old keys kept
        await lc.ListAgents(request, metadata=bearer(fresh[Role.OPERATOR]))
        await fails(lc.ListAgents(request), UNAUTH)


async def test_operator_key_revocation_by_sighup(spawn_server: Any, tmp_path: Path) -> None:
    """SIGHUP makes a running `opscore serve` re-read its keys file: a removed key is
    UNAUTHENTICATED at once and a new one works."""
    keys = Keys.fresh()
    path = write_keys_file(tmp_path / "keys.yaml", keys.entries)
    proc = await spawn_server(tmp_path / "hup.db", OPSCORE_KEYS_FILE=str(path))
    request = L.ListAgentsRequest()
    async with grpc.aio.insecure_channel(proc.address) as channel:
        lc = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        await lc.ListAgents(request, metadata=bearer(keys[Role.VIEWER]))
        fresh = Keys.fresh("new-")
        write_keys_file(path, [keys.entries[0], fresh.entries[2]])  # old admin, new viewer
        proc.proc.send_signal(signal.SIGHUP)
        for _ in range(250):
            if any(line.get("msg") == "operator keys reloaded" for line in proc.log_lines()):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError(f"no reload logged after SIGHUP:\n{proc.log_tail()}")
        await fails(lc.ListAgents(request, metadata=bearer(keys[Role.VIEWER])), UNAUTH)
        await fails(lc.ListAgents(request, metadata=bearer(keys[Role.OPERATOR])), UNAUTH)
        await lc.ListAgents(request, metadata=bearer(fresh[Role.VIEWER]))
        await lc.ListAgents(request, metadata=bearer(keys[Role.ADMIN]))
    assert proc.proc.poll() is None, "SIGHUP must not stop the server"
