"""Session ids are UUIDv7: valid UUIDs that sort by start time (index locality)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from opscore.domain.workflows.engine import session_id_at


def test_session_ids_are_uuid7_ordered_by_time_and_unique() -> None:
    start = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    ids = [session_id_at(start + timedelta(milliseconds=n)) for n in range(50)]
    assert ids == sorted(ids)
    parsed = [uuid.UUID(i) for i in ids]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    assert parsed[0].int >> 80 == int(start.timestamp() * 1000)
    same_moment = {session_id_at(start) for _ in range(1000)}
    assert len(same_moment) == 1000
