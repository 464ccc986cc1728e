"""What installing the project brings: numpy only with the mocks (the `mocks` extra), and only
what uv.lock pins (`make install` refuses a lock that no longer matches pyproject.toml)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.tools import require_tool

ROOT = Path(__file__).resolve().parent.parent.parent


def uv() -> str:
    """The uv that `make install` installs (.uv/bin/uv), else one on PATH."""
    made = ROOT / ".uv" / "bin" / "uv"
    return str(made) if made.exists() else require_tool("uv")


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


def test_make_install_refuses_a_lock_that_does_not_match_pyproject(tmp_path: Path) -> None:
    for name in ("Makefile", "pyproject.toml", "uv.lock", "scripts/uv-requirements.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"redis>=5",', '"redis>=5", "six>=1.16",'))
    make = require_tool("make")

    # `-o`: the uv given is taken as made, not installed anew from the copied requirements.
    result = subprocess.run(
        [make, "--no-print-directory", "install", f"UV={uv()}", "-o", uv()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode != 0
    assert "uv.lock does not match pyproject.toml" in result.stderr
    assert "`make lock`" in result.stderr
    assert not (tmp_path / ".venv").exists()  # nothing resolved, nothing installed
    assert (tmp_path / "uv.lock").read_text() == (ROOT / "uv.lock").read_text()


def test_the_committed_lock_matches_pyproject() -> None:
    result = subprocess.run(
        [uv(), "lock", "--check", "--offline"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stderr
