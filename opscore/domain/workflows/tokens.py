"""Task tokens: opaque, signed names of one task attempt.

A token is `base64(json[session_id, task_id, attempt]).hmac`: the server can tell a
forged or mangled token (INVALID_ARGUMENT) from a genuine one for an attempt that is
no longer current (FAILED_PRECONDITION). The key lives in the store, so tokens
survive restarts.
"""

from __future__ import annotations

import base64
import hmac
import json

from opscore.domain.workflows.session import TaskKey
from opscore.protocol.errors import InvalidArgumentError

_SIG_BYTES = 16


class TaskTokens:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _sign(self, body: bytes) -> str:
        digest = hmac.digest(self._key, body, "sha256")[:_SIG_BYTES]  # one-shot C path
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def issue(self, key: TaskKey) -> str:
        body = base64.urlsafe_b64encode(json.dumps(list(key), separators=(",", ":")).encode())
        text = body.decode().rstrip("=")
        return f"{text}.{self._sign(text.encode())}"

    def read(self, token: str, field: str = "task_token") -> TaskKey:
        """The attempt a token names; INVALID_ARGUMENT if it is not one we issued."""
        body, _, signature = token.partition(".")
        expected = self._sign(body.encode())
        if not body or not hmac.compare_digest(signature.encode(), expected.encode()):
            raise InvalidArgumentError.single(field, "not a task token issued by this server")
        try:
            session_id, task_id, attempt = json.loads(
                base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            )
            return TaskKey(str(session_id), str(task_id), int(attempt))
        except (ValueError, TypeError):
            raise InvalidArgumentError.single(field, "malformed task token") from None
