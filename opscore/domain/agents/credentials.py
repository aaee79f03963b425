"""Agent tokens: issued once, stored as SHA-256 in the agent's transaction, and
cached here so that authenticating a call needs no read."""

from __future__ import annotations

from opscore.domain.access import AGENT_TOKEN_PREFIX, digest, new_secret
from opscore.store.base import Store


class AgentCredentials:
    def __init__(self, store: Store, enabled: bool) -> None:
        self._store = store
        # Off when authentication is off: agents then need no tokens.
        self.enabled = enabled
        self._owner: dict[str, str] = {}  # token SHA-256 -> agent id
        self._token_of: dict[str, str] = {}  # agent id -> token SHA-256

    async def load(self) -> None:
        if self.enabled:
            self._owner = await self._store.agent_tokens()
            self._token_of = {agent: sha for sha, agent in self._owner.items()}

    def agent_for_token(self, token: str) -> str | None:
        """The agent a bearer token belongs to, if it is a current agent token."""
        return self._owner.get(digest(token))

    def has_token(self, agent_id: str) -> bool:
        return agent_id in self._token_of

    @staticmethod
    def new_token() -> tuple[str, str]:
        """A fresh token (to hand out once) and its SHA-256 (to store)."""
        token = new_secret(AGENT_TOKEN_PREFIX)
        return token, digest(token)

    def remember(self, agent_id: str, sha: str | None) -> None:
        """After commit: the agent's current token (None: it has none any more)."""
        old = self._token_of.pop(agent_id, None)
        if old is not None:
            self._owner.pop(old, None)
        if sha is not None:
            self._token_of[agent_id] = sha
            self._owner[sha] = agent_id
