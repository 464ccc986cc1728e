"""What installing the project brings: numpy only with the mocks (the `mocks` extra)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_numpy_is_a_dependency_of_the_mocks_only() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("numpy")]
    assert [d for d in project["optional-dependencies"]["mocks"] if d.startswith("numpy")]


def test_the_served_app_imports_no_numpy() -> None:
    # In a fresh interpreter: this one has imported numpy for the mocks.
    script = (
        "import json, sys, gateway.asgi; "
        "print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] == 'numpy')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
