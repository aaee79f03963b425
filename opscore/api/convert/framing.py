"""Wire framing of the agent watch: each committed event is serialized once, framed
as one `events` entry of a WatchAgentStatesResponse, so a response to any watcher is
the concatenation of cached bytes (the codec interceptor passes bytes through)."""

from __future__ import annotations

from collections import OrderedDict

from opspawn.opscore.v1 import lifecycle_pb2 as pb

from opscore.api.convert.lifecycle import event_to_proto
from opscore.domain.agents.model import AgentEvent
from opscore.protocol.enums import AgentEventType

_EVENTS_TAG = b"\x0a"  # WatchAgentStatesResponse.events: field 1, length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _framed(event: AgentEvent) -> bytes:
    message = pb.AgentEvent()
    event_to_proto(event, message)
    body = message.SerializeToString()
    return _EVENTS_TAG + _varint(len(body)) + body


class EventCache:
    """The framed bytes of the newest committed events, by revision."""

    def __init__(self, size: int = 8192) -> None:
        self._size = size
        self._items: OrderedDict[int, bytes] = OrderedDict()

    def framed(self, event: AgentEvent) -> bytes:
        if event.type in (AgentEventType.SNAPSHOT, AgentEventType.SYNCED):
            return _framed(event)  # per watcher, not a committed event
        cached = self._items.get(event.revision)
        if cached is None:
            cached = self._items[event.revision] = _framed(event)
            if len(self._items) > self._size:
                self._items.popitem(last=False)
        return cached

    def response(self, batch: list[AgentEvent]) -> bytes:
        """A serialized WatchAgentStatesResponse carrying `batch`."""
        return b"".join([self.framed(e) for e in batch])
