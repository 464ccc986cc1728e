"""Tests of `tests.tools.require_tool`: a program found, or the test skipped, or failed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import tools
from tests.helpers import ROOT
from tests.tools import REQUIRE_TOOLS_VARIABLE, require_tool


def _program(directory: Path, name: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_a_program_on_path_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    program = _program(tmp_path, "fake-kubectl")
    monkeypatch.setenv("PATH", str(tmp_path))

    assert require_tool("fake-kubectl") == str(program)


def test_the_sbin_directories_are_searched_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    program = _program(sbin, "fake-nginx")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(tools, "_EXTRA_DIRECTORIES", (str(sbin),))

    assert require_tool("fake-nginx") == str(program)


def test_a_file_that_is_not_executable_is_not_a_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _program(tmp_path, "fake-tool").chmod(0o644)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(REQUIRE_TOOLS_VARIABLE, raising=False)

    with pytest.raises(pytest.skip.Exception):
        require_tool("fake-tool")


def test_a_missing_program_skips_the_test(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_TOOLS_VARIABLE, raising=False)

    with pytest.raises(pytest.skip.Exception, match="no-such-tool-here is not installed"):
        require_tool("no-such-tool-here")


def test_a_missing_program_fails_the_test_when_tools_are_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(REQUIRE_TOOLS_VARIABLE, "1")

    with pytest.raises(pytest.fail.Exception, match=f"{REQUIRE_TOOLS_VARIABLE}=1 requires it"):
        require_tool("no-such-tool-here")


def test_the_variable_is_the_one_make_test_sets() -> None:
    # Renamed on one side only, `make test` would skip what it means to require.
    assert f"{REQUIRE_TOOLS_VARIABLE}=1" in (ROOT / "Makefile").read_text()
