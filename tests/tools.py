"""External programs that some tests run (kubectl, ...): found, or the test skipped or failed.

A developer without the program sees those tests skipped, with the reason; `make test` and CI
set `FUSION_TEST_REQUIRE_TOOLS=1` after installing the programs (`make tools`), and there a
missing one fails the test instead of letting it pass unseen.
"""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["REQUIRE_TOOLS_VARIABLE", "require_tool"]

REQUIRE_TOOLS_VARIABLE = "FUSION_TEST_REQUIRE_TOOLS"

# Debian installs some servers (nginx) in the sbin directories, which a user's PATH may lack.
_EXTRA_DIRECTORIES = ("/usr/sbin", "/sbin")


def require_tool(name: str) -> str:
    """The path of program `name` on PATH, /usr/sbin or /sbin; else skip, or fail if required."""
    directories = os.environ.get("PATH", os.defpath).split(os.pathsep)
    path = shutil.which(name, path=os.pathsep.join([*directories, *_EXTRA_DIRECTORIES]))
    if path is not None:
        return path
    reason = f"{name} is not installed (not on PATH, /usr/sbin or /sbin); `make tools` installs it"
    if os.environ.get(REQUIRE_TOOLS_VARIABLE) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_TOOLS_VARIABLE}=1 requires it")
    pytest.skip(reason)
