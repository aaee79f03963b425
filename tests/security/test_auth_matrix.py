"""The auth matrix: every RPC of the three services (read from the proto descriptors)
called with every kind of credential, against a server with authentication on, and
compared with the README's table of who may call what, so the table, the RULES and
the server cannot drift apart.

A call is "allowed" when it got past authentication and authorization: any code but
UNAUTHENTICATED and PERMISSION_DENIED (NOT_FOUND or FAILED_PRECONDITION are fine).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from opspawn.opscore.v1 import (
    lifecycle_pb2,
    lifecycle_pb2_grpc,
    session_pb2,
    workflow_pb2,
    workflow_pb2_grpc,
)
from security_support import METHODS, Keys, Method, bearer, outcome

from opscore.api.interceptors.auth import RULES
from opscore.domain.access import AGENT_TOKEN_PREFIX, Role, new_secret
from opscore.domain.clock import FakeClock
from opscore.server.config import Settings

L, W, S = lifecycle_pb2, workflow_pb2, session_pb2
README = Path(__file__).resolve().parents[2] / "README.md"
TABLE_HEADER = "| RPC | admin | operator | viewer | agent token |"
OPERATOR_ROLES = (Role.ADMIN, Role.OPERATOR, Role.VIEWER)
UNAUTH = grpc.StatusCode.UNAUTHENTICATED.name
DENIED = grpc.StatusCode.PERMISSION_DENIED.name
ALLOWED = "allowed"
READ_TIMEOUT = 5.0


# --------------------------------------------------------------------------- the README


def readme_table() -> dict[str, dict[str, str]]:
    """RPC name -> column -> cell, from the README's table of who may call what."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == TABLE_HEADER)
    columns = [c.strip() for c in TABLE_HEADER.strip("|").split("|")][1:]
    table: dict[str, dict[str, str]] = {}
    for line in lines[start + 2 :]:
        if not line.strip().startswith("|"):
            break
        name, *cells = (c.strip() for c in line.strip().strip("|").split("|"))
        rpc = name.strip("`")
        assert rpc not in table, f"README: two rows for {rpc}"
        assert len(cells) == len(columns), f"README row {rpc}: {len(cells)} cells"
        table[rpc] = dict(zip(columns, cells, strict=True))
    return table


AGENT_CELLS = {"no", "itself", "itself, within its grant", "its own tasks"}


def expected(row: dict[str, str]) -> dict[str, str]:
    """What each credential kind gets, as the README's row says."""
    for role in OPERATOR_ROLES:
        assert row[role.value] in ("yes", "no"), f"operator cell {row[role.value]!r}"
    assert row["agent token"] in AGENT_CELLS, f"agent cell {row['agent token']!r}"
    out = {"no token": UNAUTH, "wrong token": UNAUTH}
    out["another agent's token"] = DENIED
    out["own agent token"] = DENIED if row["agent token"] == "no" else ALLOWED
    for role in OPERATOR_ROLES:
        out[role.value] = ALLOWED if row[role.value] == "yes" else DENIED
    return out


def test_readme_table_has_one_row_per_rpc() -> None:
    """Every RPC has a row (a new RPC without one fails here) and every row an RPC."""
    names = [m.name for m in METHODS]
    assert len(set(names)) == len(names), "RPC names are not unique across services"
    table = readme_table()
    assert set(table) == set(names), (
        f"no README row: {sorted(set(names) - set(table))}; "
        f"no such RPC: {sorted(set(table) - set(names))}"
    )


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    """Agents A ("work", the caller's own) and B, a definition, and one of its
    sessions whose task is leased to A on A's open task stream."""

    channel: grpc.aio.Channel
    keys: Keys
    tokens: dict[str, str]
    session_id: str
    task_token: str


Request = Callable[[World], Message]

# One request per RPC, naming agent A, A's task or A's session (the call an agent
# token would make for itself). An RPC without an entry fails the matrix.
DEFINITION = W.WorkflowDefinition(
    id="matrix",
    version="1",
    tasks=[W.TaskDefinition(task_id="only", name="only", agent_capability="work")],
)
REQUESTS: dict[str, Request] = {
    "RegisterAgent": lambda w: L.RegisterAgentRequest(
        agent_id="agent-a", name="agent-a", capabilities=["work"]
    ),
    "DeregisterAgent": lambda w: L.DeregisterAgentRequest(agent_id="agent-a"),
    "GetAgent": lambda w: L.GetAgentRequest(agent_id="agent-a"),
    "ListAgents": lambda w: L.ListAgentsRequest(),
    "UpdateAgentState": lambda w: L.UpdateAgentStateRequest(
        agent_id="agent-a", state=L.AGENT_STATE_BUSY
    ),
    "Heartbeat": lambda w: L.HeartbeatRequest(agent_id="agent-a"),
    "WatchAgentStates": lambda w: L.WatchAgentStatesRequest(send_initial_state=True),
    "RotateAgentToken": lambda w: L.RotateAgentTokenRequest(agent_id="agent-a"),
    "CreateWorkflowDefinition": lambda w: W.CreateWorkflowDefinitionRequest(
        definition=W.WorkflowDefinition(id="created", version="1", tasks=list(DEFINITION.tasks))
    ),
    "GetWorkflowDefinition": lambda w: W.GetWorkflowDefinitionRequest(id="matrix"),
    "ListWorkflowDefinitions": lambda w: W.ListWorkflowDefinitionsRequest(),
    "DeleteWorkflowDefinition": lambda w: W.DeleteWorkflowDefinitionRequest(
        id="matrix", version="1"
    ),
    "StartWorkflow": lambda w: W.StartWorkflowRequest(workflow_definition_id="matrix"),
    "StreamTasks": lambda w: W.StreamTasksRequest(agent_id="agent-a"),
    "CompleteTask": lambda w: W.CompleteTaskRequest(task_token=w.task_token),
    "FailTask": lambda w: W.FailTaskRequest(task_token=w.task_token, error_message="x"),
    "HeartbeatTask": lambda w: W.HeartbeatTaskRequest(task_token=w.task_token),
    "GetSession": lambda w: S.GetSessionRequest(session_id=w.session_id),
    "ListSessions": lambda w: S.ListSessionsRequest(),
    "CancelSession": lambda w: S.CancelSessionRequest(session_id=w.session_id),
    "ListSessionEvents": lambda w: S.ListSessionEventsRequest(session_id=w.session_id),
    "WatchSession": lambda w: S.WatchSessionRequest(session_id=w.session_id),
}


@pytest.fixture
async def world(start_server: Any, settings: Settings, clock: FakeClock) -> AsyncIterator[World]:
    keys = Keys.fresh()
    server = await start_server(settings.model_copy(update={"api_keys": keys.api_keys}), clock)
    admin = bearer(keys[Role.ADMIN])
    async with grpc.aio.insecure_channel(server.address) as channel:
        lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        workflow = workflow_pb2_grpc.WorkflowServiceStub(channel)
        tokens = {}
        for agent_id, capability in (("agent-a", "work"), ("agent-b", "other")):
            registered = await lifecycle.RegisterAgent(
                L.RegisterAgentRequest(agent_id=agent_id, name=agent_id, capabilities=[capability]),
                metadata=admin,
            )
            tokens[agent_id] = registered.agent_token
        await workflow.CreateWorkflowDefinition(
            W.CreateWorkflowDefinitionRequest(definition=DEFINITION), metadata=admin
        )
        stream = workflow.StreamTasks(
            W.StreamTasksRequest(agent_id="agent-a"), metadata=bearer(tokens["agent-a"])
        )
        try:
            session = await workflow.StartWorkflow(
                W.StartWorkflowRequest(workflow_definition_id="matrix"), metadata=admin
            )
            assignment = await asyncio.wait_for(stream.read(), READ_TIMEOUT)
            assert assignment is not grpc.aio.EOF, "agent A's task stream ended"
            yield World(channel, keys, tokens, session.session_id, assignment.task_token)
        finally:
            stream.cancel()


def credentials(world: World) -> list[tuple[str, tuple[tuple[str, str], ...] | None]]:
    """Every credential kind, in the order the matrix uses them: those that must be
    refused first, the destructive ones (admin deregisters, rotates) last."""
    return [
        ("no token", None),
        ("wrong token", bearer(new_secret(AGENT_TOKEN_PREFIX))),
        ("another agent's token", bearer(world.tokens["agent-b"])),
        ("viewer", bearer(world.keys[Role.VIEWER])),
        ("own agent token", bearer(world.tokens["agent-a"])),
        ("operator", bearer(world.keys[Role.OPERATOR])),
        ("admin", bearer(world.keys[Role.ADMIN])),
    ]


@pytest.mark.parametrize("method", METHODS, ids=str)
async def test_matrix(world: World, method: Method) -> None:
    """Each credential kind gets on this RPC what the README's row says."""
    assert method.name in REQUESTS, f"the matrix has no request for {method.name}"
    row = readme_table().get(method.name)
    assert row is not None, f"README has no row for {method.name}"
    want = expected(row)
    problems = []
    for kind, metadata in credentials(world):
        result = await outcome(world.channel, method, REQUESTS[method.name](world), metadata)
        code = result.code
        got = code.name if isinstance(code, grpc.StatusCode) and result.denied else ALLOWED
        if got != want[kind]:
            problems.append(f"{kind}: expected {want[kind]}, got {result}")
    assert not problems, f"{method.name}: " + "; ".join(problems)


def test_agent_cells_match_the_rules() -> None:
    """The README's agent column says what kind of self-access RULES grant."""
    for method in METHODS:
        cell = readme_table()[method.name]["agent token"]
        rule = RULES[method.path]
        kind = "tasks" if rule.agent_tasks else "self" if rule.agent_self else "no"
        assert re.match({"tasks": "its own tasks", "self": "itself", "no": "no$"}[kind], cell), (
            f"{method.name}: README says {cell!r}, RULES say {kind}"
        )
