"""Every fixed limit of the contract, in one place, and the defaults of the
configurable ones (the server's settings start from `RequestLimits()`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Ids chosen by callers (agents, workflows, tasks, sessions).
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
MAX_ID_LENGTH = 128

MAX_NAME_LENGTH = 256  # agent, workflow and task names
MAX_VERSION_LENGTH = 64  # agent and workflow versions
MAX_CAPABILITY_LENGTH = 128
MAX_ENDPOINT_LENGTH = 512
MAX_METADATA_KEY_LENGTH = 128
MAX_METADATA_VALUE_LENGTH = 1024
MAX_DESCRIPTION_LENGTH = 4096
MAX_REQUEST_ID_LENGTH = 256
MAX_REASON_LENGTH = 1024  # why a session was cancelled
MAX_ERROR_MESSAGE_LENGTH = 8192  # FailTask's error_message
MAX_TASK_TOKEN_LENGTH = 1024

MAX_IN_FLIGHT = 1000  # StreamTasks' max_in_flight
MAX_WATCH_AGENT_IDS = 1000  # agent ids one watch may name

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

# Task timing in a workflow definition.
DEFAULT_TASK_TIMEOUT_SECONDS = 60.0
MAX_DURATION_SECONDS = 7 * 24 * 3600  # timeouts and retry intervals
MAX_ATTEMPTS = 100
MAX_BACKOFF_COEFFICIENT = 100.0
# Retry delays are multiplied by a random factor in [1 - RETRY_JITTER, 1].
RETRY_JITTER = 0.2


@dataclass(frozen=True)
class RequestLimits:
    """Size limits an operator may configure (OPSCORE_MAX_*); these are the defaults."""

    max_capabilities: int = 64  # per agent
    max_metadata_entries: int = 64  # per agent
    max_metadata_bytes: int = 16 * 1024  # per agent, keys and values
    max_details_bytes: int = 16 * 1024  # state details, serialized
    max_payload_bytes: int = 256 * 1024  # session input, task output, task parameters
    max_struct_depth: int = 32  # nesting of any of those
    max_tasks_per_definition: int = 1000
