"""Workflow definition files (JSON or YAML) in the shape of the protobuf message.

Keys may be in proto style (`task_id`) or JSON style (`taskId`), durations are
strings like "30s" (protobuf JSON mapping), and `null` means "not set", so the
original prototype's `sample_workflow.json` loads as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format
from opspawn.opscore.v1 import workflow_pb2

from opscore.protocol.errors import InvalidArgumentError


def parse_definition(data: Any, source: str = "definition") -> workflow_pb2.WorkflowDefinition:
    if not isinstance(data, dict):
        raise InvalidArgumentError.single(source, "must be a mapping with id, name, tasks")
    message = workflow_pb2.WorkflowDefinition()
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as exc:
        raise InvalidArgumentError.single(source, str(exc)) from None
    return message


def load_definition(path: Path) -> workflow_pb2.WorkflowDefinition:
    """Reads a .json, .yaml or .yml definition file."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise InvalidArgumentError.single(str(path), f"not valid JSON/YAML: {exc}") from None
    return parse_definition(data, str(path))
