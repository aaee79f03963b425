"""examples/two_agents.py runs to completion on its own server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_two_agents_example_completes() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "two_agents.py")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "SESSION_COMPLETED" in result.stdout
    assert "session COMPLETED: {'step_2': {" in result.stdout
    assert "'value_doubled': 246" in result.stdout
