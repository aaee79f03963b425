"""Wire framing of the agent watch: each committed event is serialized once, framed
as one `events` entry of a WatchAgentStatesResponse, so a response to any watcher is
the concatenation of cached bytes (the codec interceptor passes bytes through), cut
so that no response carries more than the byte budget past its first event.

The agents' live fields (connected, free_slots, last_contact_at) are those of the
moment an event is first framed, just after its commit, and shared by every watcher;
snapshot events carry them as of their sending."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

from opspawn.opscore.v1 import lifecycle_pb2 as pb

from opscore.api.convert.lifecycle import event_to_proto
from opscore.domain.agents.model import AgentEvent, Presence
from opscore.protocol.enums import AgentEventType

_EVENTS_TAG = b"\x0a"  # WatchAgentStatesResponse.events: field 1, length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _framed(event: AgentEvent, presence: Callable[[str], Presence]) -> bytes:
    message = pb.AgentEvent()
    event_to_proto(event, message, presence)
    body = message.SerializeToString()
    return _EVENTS_TAG + _varint(len(body)) + body


class EventCache:
    """The framed bytes of the newest committed events, by revision: at most `size`
    events and `max_bytes` bytes (what the cache holds is shared by all watchers).
    `presence` is what the open task streams show of an agent (framed with it);
    `response_bytes` is the budget of one response."""

    def __init__(
        self,
        presence: Callable[[str], Presence],
        response_bytes: int,
        size: int = 8192,
        max_bytes: int = 16 << 20,
    ) -> None:
        self._presence = presence
        self._response_bytes = response_bytes
        self._size = size
        self._max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[int, bytes] = OrderedDict()

    def framed(self, event: AgentEvent) -> bytes:
        if event.type in (AgentEventType.SNAPSHOT, AgentEventType.SYNCED):
            return _framed(event, self._presence)  # per watcher, not a committed event
        cached = self._items.get(event.revision)
        if cached is None:
            cached = self._items[event.revision] = _framed(event, self._presence)
            self._bytes += len(cached)
            while len(self._items) > 1 and (
                len(self._items) > self._size or self._bytes > self._max_bytes
            ):
                self._bytes -= len(self._items.popitem(last=False)[1])
        return cached

    def size(self, event: AgentEvent) -> int:
        """The event's wire size (framed once, then cached for the watchers)."""
        return len(self.framed(event))

    def responses(self, batch: list[AgentEvent]) -> Iterator[bytes]:
        """Serialized WatchAgentStatesResponse messages carrying `batch` in order, each
        cut at the byte budget (but holding at least one event)."""
        parts: list[bytes] = []
        size = 0
        for event in batch:
            framed = self.framed(event)
            if parts and size + len(framed) > self._response_bytes:
                yield b"".join(parts)
                parts, size = [], 0
            parts.append(framed)
            size += len(framed)
        if parts:
            yield b"".join(parts)
