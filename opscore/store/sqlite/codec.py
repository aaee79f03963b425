"""Domain values <-> SQLite columns: times as integer microseconds since the epoch
(UTC), structured fields as compact JSON."""

from __future__ import annotations

import dataclasses
import functools
import json
from datetime import datetime
from typing import Any

from opscore.domain.agents.model import Agent, AgentGrant
from opscore.domain.workflows.definitions import (
    RetryPolicy,
    TaskDefinition,
    TaskTimeouts,
    WorkflowDefinition,
)
from opscore.protocol.enums import AgentState
from opscore.protocol.values import epoch_micros, from_epoch_micros


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


AGENT_COLUMNS = (
    "agent_id, name, version, capabilities, contact_endpoint, metadata, state, state_details, "
    "registered_at, state_updated_at, last_heartbeat_at, state_observed_at, revision, granted"
)


def assignments(columns: str) -> str:
    """`a, b` -> `a = ?, b = ?`: the SET clause of an UPDATE of those columns."""
    return ", ".join(f"{column.strip()} = ?" for column in columns.split(","))


# agent_to_row without its first column (agent_id), as an UPDATE's SET clause.
AGENT_STATE_ASSIGNMENTS = assignments(AGENT_COLUMNS.split(",", 1)[1])
AGENT_PLACEHOLDERS = ", ".join("?" * len(AGENT_COLUMNS.split(",")))


def agent_to_row(agent: Agent) -> tuple[Any, ...]:
    return (
        agent.agent_id,
        agent.name,
        agent.version,
        dumps(list(agent.capabilities)),
        agent.contact_endpoint,
        dumps(agent.metadata),
        int(agent.state),
        dumps(agent.state_details),
        epoch_micros(agent.registered_at),
        epoch_micros(agent.state_updated_at),
        epoch_micros(agent.last_heartbeat_at),
        None if agent.state_observed_at is None else epoch_micros(agent.state_observed_at),
        agent.revision,
        None if agent.grant is None else grant_to_json(agent.grant),
    )


def grant_to_json(grant: AgentGrant) -> str:
    return dumps(
        {"name": grant.name, "version": grant.version, "capabilities": sorted(grant.capabilities)}
    )


def grant_from_json(text: str | None) -> AgentGrant | None:
    if text is None:
        return None
    body = json.loads(text)
    return AgentGrant(body["name"], body["version"], frozenset(body["capabilities"]))


def agent_from_row(row: tuple[Any, ...]) -> Agent:
    """A row of AGENT_COLUMNS, or an event snapshot (those written before grants were
    stored lack the last column)."""
    return Agent(
        agent_id=row[0],
        name=row[1],
        version=row[2],
        capabilities=tuple(json.loads(row[3])),
        contact_endpoint=row[4],
        metadata=json.loads(row[5]),
        state=AgentState(row[6]),
        state_details=json.loads(row[7]),
        registered_at=from_epoch_micros(row[8]),
        state_updated_at=from_epoch_micros(row[9]),
        last_heartbeat_at=from_epoch_micros(row[10]),
        state_observed_at=None if row[11] is None else from_epoch_micros(row[11]),
        revision=row[12],
        grant=grant_from_json(row[13]) if len(row) > 13 else None,
    )


def agent_to_json(agent: Agent) -> str:
    """An event's snapshot: the row as a JSON array."""
    return json.dumps(agent_to_row(agent), separators=(",", ":"))


def agent_from_json(text: str) -> Agent:
    return agent_from_row(tuple(json.loads(text)))


# -- workflow definitions and sessions ---------------------------------------------


def definition_to_dict(defn: WorkflowDefinition) -> dict[str, Any]:
    body = dataclasses.asdict(defn)
    body["created_at"] = None if defn.created_at is None else epoch_micros(defn.created_at)
    return body


def definition_from_dict(body: dict[str, Any]) -> WorkflowDefinition:
    tasks = tuple(
        TaskDefinition(
            **{
                **t,
                "depends_on": tuple(t["depends_on"]),
                "retry_policy": RetryPolicy(**t["retry_policy"]),
            }
        )
        for t in body["tasks"]
    )
    created = body.get("created_at")
    return WorkflowDefinition(
        id=body["id"],
        name=body["name"],
        description=body["description"],
        version=body["version"],
        tasks=tasks,
        created_at=None if created is None else from_epoch_micros(created),
        task_timeouts=TaskTimeouts(**body.get("task_timeouts", {})),
    )


@functools.lru_cache(maxsize=256)
def definition_from_json(text: str) -> WorkflowDefinition:
    """Every session of a workflow stores the same definition text: parse it once."""
    return definition_from_dict(json.loads(text))


_definition_texts: dict[int, tuple[WorkflowDefinition, str]] = {}


def definition_to_json(definition: WorkflowDefinition) -> str:
    """The stored text of a definition, computed once per definition object (the
    engine hands the same object to every session it starts)."""
    cached = _definition_texts.get(id(definition))
    if cached is not None and cached[0] is definition:
        return cached[1]
    text = dumps(definition_to_dict(definition))
    if len(_definition_texts) >= 256:
        _definition_texts.clear()
    _definition_texts[id(definition)] = (definition, text)
    return text


def optional_micros(value: datetime | None) -> int | None:
    return None if value is None else epoch_micros(value)


def optional_from_micros(value: int | None) -> datetime | None:
    return None if value is None else from_epoch_micros(value)


def optional_json(value: Any) -> str | None:
    return None if value is None else dumps(value)


def optional_loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)
