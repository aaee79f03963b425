"""Secrets never leak: operator keys, agent tokens (old and new) and task tokens appear
neither in the server's log (at DEBUG) nor in any error message or error detail."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import grpc
from opspawn.opscore.v1 import (
    lifecycle_pb2,
    lifecycle_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    workflow_pb2,
    workflow_pb2_grpc,
)
from security_support import Keys, bearer

from opscore.domain.access import AGENT_TOKEN_PREFIX, Role

L, W, S = lifecycle_pb2, workflow_pb2, session_pb2
READ_TIMEOUT = 5.0


class Recorder:
    """Makes calls and keeps every error text and trailer the client received."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def call(self, call: Any, expect: grpc.StatusCode | None = None) -> Any:
        try:
            result = await call
        except grpc.aio.AioRpcError as err:
            self.keep(err)
            assert expect is not None and err.code() == expect, f"{err.code()}: {err.details()}"
            return None
        assert expect is None, f"expected {expect}, but the call succeeded"
        return result

    def keep(self, err: grpc.aio.AioRpcError) -> None:
        self.seen.append(err.details() or "")
        self.seen.append(err.debug_error_string() or "")
        for key, value in err.trailing_metadata() or ():
            raw = value if isinstance(value, bytes) else value.encode()
            self.seen.append(f"{key}={raw!r}")
            self.seen.append(raw.decode("utf-8", "replace"))
            self.seen.append(base64.b64encode(raw).decode())


def _variants(secret: str) -> list[str]:
    """The secret and its random part: a key or agent token without its prefix, a task
    token's signature."""
    if secret.startswith(("opk_", "oat_")):
        return [secret, secret[4:]]
    return [secret, secret.rsplit(".", 1)[-1]]


async def test_no_secret_in_logs_or_errors(spawn_server: Any, tmp_path: Path) -> None:
    """Auth failures with real and wrong tokens, agent registration, token rotation and
    task tokens leave no secret in the DEBUG log or in any error returned."""
    keys = Keys.fresh()
    proc = await spawn_server(
        tmp_path / "secrets.db", OPSCORE_API_KEYS=keys.api_keys, OPSCORE_LOG_LEVEL="DEBUG"
    )
    rec = Recorder()
    secrets = [keys[r] for r in (Role.ADMIN, Role.OPERATOR, Role.VIEWER)]
    unauth, denied = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
    admin, viewer = bearer(keys[Role.ADMIN]), bearer(keys[Role.VIEWER])
    async with grpc.aio.insecure_channel(proc.address) as channel:
        lc = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        wf = workflow_pb2_grpc.WorkflowServiceStub(channel)
        ss = session_pb2_grpc.SessionServiceStub(channel)

        # Wrong credentials: near misses of real keys, a key in the wrong header.
        near_miss = keys[Role.ADMIN][:-2] + ("AA" if not keys[Role.ADMIN].endswith("AA") else "BB")
        secrets.append(near_miss)
        for metadata in (
            bearer(near_miss),
            bearer(keys[Role.ADMIN] + "x"),
            (("authorization", keys[Role.ADMIN]),),  # no scheme
            (("x-api-key", keys[Role.ADMIN]),),
            bearer(AGENT_TOKEN_PREFIX + keys[Role.ADMIN][4:]),
        ):
            await rec.call(lc.ListAgents(L.ListAgentsRequest(), metadata=metadata), unauth)
        # A real key with the wrong role.
        await rec.call(
            lc.RegisterAgent(L.RegisterAgentRequest(agent_id="x", name="x"), metadata=viewer),
            denied,
        )
        await rec.call(
            wf.CompleteTask(W.CompleteTaskRequest(task_token="t"), metadata=admin), denied
        )

        # Agents get tokens; A's is rotated; the old one is then refused.
        registered = {}
        for agent_id, capability in (("agent-a", "work"), ("agent-b", "other")):
            agent = await rec.call(
                lc.RegisterAgent(
                    L.RegisterAgentRequest(
                        agent_id=agent_id, name=agent_id, capabilities=[capability]
                    ),
                    metadata=admin,
                )
            )
            registered[agent_id] = agent.agent_token
            secrets.append(agent.agent_token)
        old_a = registered["agent-a"]
        await rec.call(lc.Heartbeat(L.HeartbeatRequest(agent_id="agent-a"), metadata=bearer(old_a)))
        rotated = await rec.call(
            lc.RotateAgentToken(L.RotateAgentTokenRequest(agent_id="agent-a"), metadata=admin)
        )
        new_a = rotated.agent_token
        secrets.append(new_a)
        await rec.call(
            lc.Heartbeat(L.HeartbeatRequest(agent_id="agent-a"), metadata=bearer(old_a)), unauth
        )
        a, b = bearer(new_a), bearer(registered["agent-b"])
        await rec.call(lc.Heartbeat(L.HeartbeatRequest(agent_id="agent-b"), metadata=a), denied)
        await rec.call(
            lc.UpdateAgentState(
                L.UpdateAgentStateRequest(agent_id="agent-a", state=L.AGENT_STATE_IDLE),
                metadata=a,
            )
        )

        # A task token: stolen by B, tampered with, then used properly by A.
        stream = wf.StreamTasks(W.StreamTasksRequest(agent_id="agent-a"), metadata=a)
        try:
            definition = W.WorkflowDefinition(
                id="leak",
                version="1",
                tasks=[W.TaskDefinition(task_id="t", name="t", agent_capability="work")],
            )
            session = await rec.call(
                wf.StartWorkflow(
                    W.StartWorkflowRequest(definition=definition),
                    metadata=bearer(keys[Role.OPERATOR]),
                )
            )
            task = await asyncio.wait_for(stream.read(), READ_TIMEOUT)
            token = task.task_token
            secrets.append(token)
            await rec.call(
                wf.CompleteTask(W.CompleteTaskRequest(task_token=token), metadata=b), denied
            )
            await rec.call(
                wf.HeartbeatTask(W.HeartbeatTaskRequest(task_token=token + "x"), metadata=a),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            await rec.call(wf.CompleteTask(W.CompleteTaskRequest(task_token=token), metadata=a))
        finally:
            stream.cancel()
        done = await rec.call(
            ss.GetSession(S.GetSessionRequest(session_id=session.session_id), metadata=viewer)
        )
        assert done.status == S.SESSION_STATUS_COMPLETED

        # Deregistration revokes B's token; using it afterwards is refused.
        await rec.call(
            lc.DeregisterAgent(L.DeregisterAgentRequest(agent_id="agent-b"), metadata=admin)
        )
        await rec.call(lc.Heartbeat(L.HeartbeatRequest(agent_id="agent-b"), metadata=b), unauth)

    proc.terminate()
    assert await proc.wait_exit(10) is not None, "server did not stop on SIGTERM"
    log = proc.log.read_text(errors="replace")
    assert '"level": "DEBUG"' in log, "the server logged at DEBUG"
    assert "agent token rotated" in log, "the exercise reached the server"
    received = "\n".join(rec.seen)
    assert len(rec.seen) > 20
    leaks = [
        (where, secret[:8] + "...")
        for secret in secrets
        for variant in _variants(secret)
        for where, text in (("server log", log), ("errors received", received))
        if variant in text
    ]
    assert not leaks, f"secrets leaked: {leaks}"
