"""Wire framing of the agent watch: each committed event is serialized once, framed
as one `events` entry of a WatchAgentStatesResponse, so a response to any watcher is
the concatenation of cached bytes (the codec interceptor passes bytes through).

The agents' live fields (connected, free_slots, last_contact_at) are those of the
moment an event is first framed, just after its commit, and shared by every watcher;
snapshot events carry them as of their sending."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

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
    """The framed bytes of the newest committed events, by revision."""

    def __init__(self, presence: Callable[[str], Presence], size: int = 8192) -> None:
        self._presence = presence
        self._size = size
        self._items: OrderedDict[int, bytes] = OrderedDict()

    def framed(self, event: AgentEvent) -> bytes:
        if event.type in (AgentEventType.SNAPSHOT, AgentEventType.SYNCED):
            return _framed(event, self._presence)  # per watcher, not a committed event
        cached = self._items.get(event.revision)
        if cached is None:
            cached = self._items[event.revision] = _framed(event, self._presence)
            if len(self._items) > self._size:
                self._items.popitem(last=False)
        return cached

    def response(self, batch: list[AgentEvent]) -> bytes:
        """A serialized WatchAgentStatesResponse carrying `batch`."""
        return b"".join([self.framed(e) for e in batch])
