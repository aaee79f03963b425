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

# Watches. gRPC's default message limit (4 MiB) is the server's default send limit
# (OPSCORE_MAX_MESSAGE_BYTES) and the receive limit of every client that sets none.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# A WatchAgentStates response carries at most WATCH_BATCH events and, past its first
# event, at most watch_response_bytes(); a replay reads WATCH_BATCH events at a time.
WATCH_BATCH = 500
# WatchSession sends one SessionEvent per response. Its largest free text is an error
# message (MAX_ERROR_MESSAGE_LENGTH characters x 4 = 32 KiB); its ids (3 x 128) and other
# detail entries (names, numbers, timestamps, a waiting message naming a capability)
# stay under 8 KiB, so an event is below this bound, which the send limit must hold.
MAX_SESSION_EVENT_BYTES = 64 * 1024
# Texts are limited in characters; one character is at most this many UTF-8 bytes.
_UTF8 = 4
# Protobuf framing (tag + length varint) of one field or map entry, at most.
_FRAMING = 16

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


def watch_response_bytes(max_message_bytes: int) -> int:
    """The byte budget of one watch response: a quarter of the send limit (1 MiB by
    default), never more than a default client accepts, so responses stay small."""
    return min(max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES) // 4


def max_agent_event_bytes(limits: RequestLimits) -> int:
    """The most one AgentEvent, framed in a watch response, can take under `limits`.

    With the defaults: agent_id 128 (ASCII) + name, version, endpoint (256 + 64 + 512)
    x 4 = 3,456; 64 capabilities x (128 x 4 + 16) = 33,792; metadata 16,384 characters
    x 4 + 64 entries x 3 x 16 = 68,608; details 16,384 + 16 (bytes, serialized); 24
    fields of framing, numbers and timestamps x 16 = 384: 122,640 bytes (120 KiB),
    below the 1 MiB response budget and the 4 MiB send limit, so any event fits in one
    response and no response exceeds max(budget, one event). Settings refuses limits
    under which this bound exceeds OPSCORE_MAX_MESSAGE_BYTES.
    """
    texts = MAX_ID_LENGTH + _UTF8 * (MAX_NAME_LENGTH + MAX_VERSION_LENGTH + MAX_ENDPOINT_LENGTH)
    capabilities = limits.max_capabilities * (_UTF8 * MAX_CAPABILITY_LENGTH + _FRAMING)
    metadata = _UTF8 * limits.max_metadata_bytes + limits.max_metadata_entries * 3 * _FRAMING
    details = limits.max_details_bytes + _FRAMING
    return texts + capabilities + metadata + details + 24 * _FRAMING
