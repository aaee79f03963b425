"""SQL of workflow definitions on one SQLite connection."""

from __future__ import annotations

import sqlite3

from opscore.domain.workflows.definitions import WorkflowDefinition
from opscore.protocol.errors import WorkflowDefinitionError
from opscore.store.sqlite.codec import definition_from_json, definition_to_json


def create_definition(conn: sqlite3.Connection, definition: WorkflowDefinition) -> None:
    try:
        conn.execute(
            "INSERT INTO workflow_definitions (id, version, seq, body) VALUES "
            "(?, ?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM workflow_definitions), ?)",
            (definition.id, definition.version, definition_to_json(definition)),
        )
    except sqlite3.IntegrityError:
        raise WorkflowDefinitionError(
            f"workflow definition {definition.id!r} version {definition.version!r} "
            "already exists; use a new version",
            workflow_definition_id=definition.id,
        ) from None


def get_definition(
    conn: sqlite3.Connection, definition_id: str, version: str
) -> WorkflowDefinition | None:
    if version:
        row = conn.execute(
            "SELECT body FROM workflow_definitions WHERE id = ? AND version = ?",
            (definition_id, version),
        ).fetchone()
    else:
        row = conn.execute(
            "SELECT body FROM workflow_definitions WHERE id = ? ORDER BY seq DESC LIMIT 1",
            (definition_id,),
        ).fetchone()
    return None if row is None else definition_from_json(row[0])


def list_definitions(
    conn: sqlite3.Connection, after: tuple[str, str], limit: int
) -> list[WorkflowDefinition]:
    rows = conn.execute(
        "SELECT body FROM workflow_definitions WHERE (id, version) > (?, ?) "
        "ORDER BY id, version LIMIT ?",
        (*after, limit),
    ).fetchall()
    return [definition_from_json(r[0]) for r in rows]


def delete_definition(conn: sqlite3.Connection, definition_id: str, version: str) -> bool:
    cursor = conn.execute(
        "DELETE FROM workflow_definitions WHERE id = ? AND version = ?", (definition_id, version)
    )
    return cursor.rowcount > 0
