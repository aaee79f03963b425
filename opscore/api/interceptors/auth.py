"""Authentication and authorization: who the caller is (an operator key or an agent
token, from `authorization: Bearer <token>`), and which methods each role may call.
Refused calls never reach a servicer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from opscore.api.interceptors.base import Handler, MethodInterceptor, behaviour_of, rebuild
from opscore.domain.access import (
    AGENT_TOKEN_PREFIX,
    ANONYMOUS,
    OperatorKey,
    Principal,
    Role,
    digest,
)
from opscore.protocol.errors import PermissionDeniedError, UnauthenticatedError

# The principal of the RPC being served (set by the interceptor for its task).
current_principal: ContextVar[Principal] = ContextVar("current_principal", default=ANONYMOUS)

READERS = frozenset({Role.ADMIN, Role.OPERATOR, Role.VIEWER})
WRITERS = frozenset({Role.ADMIN, Role.OPERATOR})
ADMINS = frozenset({Role.ADMIN})
NOBODY: frozenset[Role] = frozenset()


@dataclass(frozen=True)
class Rule:
    """Operator roles allowed; `agent_self`: an agent may call it naming its own
    agent_id (RegisterAgent: only within its grant, checked by the registry);
    `agent_tasks`: an agent may call it for tasks given to it (the engine checks the
    attempt belongs to that agent)."""

    roles: frozenset[Role]
    agent_self: bool = False
    agent_tasks: bool = False


_PACKAGE = "/opspawn.opscore.v1."
_L = _PACKAGE + "LifecycleService/"
_W = _PACKAGE + "WorkflowService/"
_S = _PACKAGE + "SessionService/"
RULES: dict[str, Rule] = {
    _L + "RegisterAgent": Rule(WRITERS, agent_self=True),
    _L + "DeregisterAgent": Rule(ADMINS),
    _L + "GetAgent": Rule(READERS, agent_self=True),
    _L + "ListAgents": Rule(READERS),
    _L + "UpdateAgentState": Rule(NOBODY, agent_self=True),
    _L + "Heartbeat": Rule(NOBODY, agent_self=True),
    _L + "WatchAgentStates": Rule(READERS),
    _L + "RotateAgentToken": Rule(ADMINS),
    _W + "CreateWorkflowDefinition": Rule(WRITERS),
    _W + "GetWorkflowDefinition": Rule(READERS),
    _W + "ListWorkflowDefinitions": Rule(READERS),
    _W + "DeleteWorkflowDefinition": Rule(WRITERS),
    _W + "StartWorkflow": Rule(WRITERS),
    _W + "StreamTasks": Rule(NOBODY, agent_self=True),
    _W + "CompleteTask": Rule(NOBODY, agent_tasks=True),
    _W + "FailTask": Rule(NOBODY, agent_tasks=True),
    _W + "HeartbeatTask": Rule(NOBODY, agent_tasks=True),
    _S + "GetSession": Rule(READERS),
    _S + "ListSessions": Rule(READERS),
    _S + "CancelSession": Rule(WRITERS),
    _S + "ListSessionEvents": Rule(READERS),
    _S + "WatchSession": Rule(READERS),
}


class Authenticator:
    def __init__(
        self, keys: Sequence[OperatorKey], agent_for_token: Callable[[str], str | None]
    ) -> None:
        self._agent_for_token = agent_for_token
        self._keys: dict[str, OperatorKey] = {}
        self.replace_keys(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def replace_keys(self, keys: Sequence[OperatorKey]) -> None:
        """Swaps the operator keys (rotation and revocation without a restart)."""
        self._keys = {k.sha256: k for k in keys}

    def authenticate(self, metadata: Sequence[tuple[str, Any]] | None) -> Principal:
        """The caller named by `authorization: Bearer <token>`; the token itself never
        appears in an error or a log line."""
        if not self.enabled:
            return ANONYMOUS
        header = next((str(v) for k, v in metadata or () if k == "authorization"), "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthenticatedError("missing credentials: send 'authorization: Bearer <token>'")
        token = token.strip()
        if token.startswith(AGENT_TOKEN_PREFIX):
            agent_id = self._agent_for_token(token)
            if agent_id is not None:
                return Principal(agent_id, Role.AGENT, agent_id)
        else:
            key = self._keys.get(digest(token))
            if key is not None:
                return Principal(key.name, key.role)
        raise UnauthenticatedError("unknown or revoked token")


def authorize(method: str, principal: Principal, request: Any) -> None:
    """Whether `principal` may make this call (`request`: the message it sends)."""
    if principal is ANONYMOUS:
        return
    rule = RULES.get(method)
    if rule is None:
        raise PermissionDeniedError(f"{method} is not open to any caller")
    if principal.role is Role.AGENT:
        if rule.agent_tasks:
            return
        if not rule.agent_self:
            roles = ", ".join(sorted(r.value for r in rule.roles))
            raise PermissionDeniedError(
                f"an agent token may not call {method.rsplit('/', 1)[-1]}: "
                f"it needs an operator key ({roles})",
                method=method,
            )
        if getattr(request, "agent_id", None) == principal.agent_id:
            return
        raise PermissionDeniedError(
            f"agent {principal.agent_id} may only act for itself", method=method
        )
    if principal.role not in rule.roles:
        raise PermissionDeniedError(
            f"role {principal.role.value} may not call {method.rsplit('/', 1)[-1]}",
            method=method,
        )


class AuthInterceptor(MethodInterceptor):
    """Authenticates every call when it starts and authorizes each request message
    (every message of a request stream), then names the caller in
    `current_principal` for the servicer."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    def _caller(self, context: Any) -> Principal:
        principal = self._authenticator.authenticate(context.invocation_metadata())
        current_principal.set(principal)
        return principal

    def wrap(self, handler: Handler, method: str) -> Handler:
        inner = behaviour_of(handler)
        if not handler.request_streaming:

            def one_request(request: Any, context: Any) -> Any:
                authorize(method, self._caller(context), request)
                return inner(request, context)

            return rebuild(handler, one_request)

        async def authorized(principal: Principal, requests: AsyncIterator[Any]) -> Any:
            async for request in requests:
                authorize(method, principal, request)
                yield request

        def request_stream(requests: AsyncIterator[Any], context: Any) -> Any:
            principal = self._caller(context)
            if principal.role is not Role.AGENT:  # roles need no message to judge
                authorize(method, principal, None)
            return inner(authorized(principal, requests), context)

        return rebuild(handler, request_stream)
