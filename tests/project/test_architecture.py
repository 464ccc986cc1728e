"""The package's house: subpackages ranked, each importing only its own or lower ranks.

Imports are read from the source with `ast` (every import: at the top, in functions and under
`TYPE_CHECKING`), so an import that points up or across, or closes a cycle, fails here before
anyone meets it at run time. docs/architecture.md draws the ranks.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "gateway"

# From the bottom up. A module may import its own subpackage's modules and those of lower
# ranks; subpackages of one rank know nothing of each other.
RANKS: dict[str, int] = {
    "gateway.core": 0,  # values and errors: outcome, errors, fusion, JSON limits, protocols
    "gateway.config": 1,  # the settings
    "gateway.observability": 2,  # logs, metrics, tracing
    "gateway.recommenders": 2,  # the HTTP clients, answers' bodies, readiness
    "gateway.resilience": 2,  # retries, breakers, hedging, admission
    "gateway.fanout": 3,  # one guarded call, and the strategies
    "gateway.feedback": 3,  # impressions, events, stores, the learner
    "gateway.contract": 4,  # the HTTP contract without Flask
    "gateway.runtime": 5,  # the worker's loop and session, the greenlet portal
    "gateway.web": 6,  # the Flask app, routes, hooks, error handlers
    "gateway.serving": 7,  # the ASGI app and the HTTP edge
}
ENTRY_RANK = 8  # the modules directly in gateway/: the package, asgi, wsgi, worker, sdk, main
WEB_FRAMEWORKS = ("flask", "werkzeug")


def module_name(path: Path) -> str:
    """`gateway/web/app.py` -> `gateway.web.app`; a package's `__init__.py` -> the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def home(module: str) -> str:
    """The subpackage a module belongs to (`gateway.web`), or the module itself at the top."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or module in RANKS else module


def rank(module: str) -> int:
    """A module's rank: its subpackage's, or the entry points' for the modules at the top."""
    return RANKS.get(home(module), ENTRY_RANK)


def imports_in(source: str, module: str) -> set[str]:
    """Every module `source` (of `module`) imports, by absolute name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package
                package = module.split(".")[: -node.level or None]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in MODULES else base)
    return found


def imports_of(module: str) -> set[str]:
    """The gateway's modules and the other packages `module` imports."""
    return imports_in(MODULES[module].read_text(), module)


def wrong_imports(module: str, imported: set[str]) -> list[str]:
    """Each import of `module` that points up or across the ranks, said why."""
    problems = []
    for other in sorted(name for name in imported if name.split(".")[0] == "gateway"):
        if other == "gateway" and module != "gateway":
            problems.append(f"{module} imports the package root (import what it names instead)")
        elif home(other) == home(module) or other == module:
            continue
        elif rank(other) > rank(module):
            problems.append(f"{module} (rank {rank(module)}) imports {other} (rank {rank(other)})")
        elif rank(other) == rank(module):
            problems.append(f"{module} imports {other} across rank {rank(module)}")
    if rank(module) < RANKS["gateway.web"]:
        problems += [
            f"{module} imports {name}: below the web layer, no web framework"
            for name in sorted(imported)
            if name.split(".")[0] in WEB_FRAMEWORKS
        ]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle of `graph` (one per strongly connected group), by Tarjan's method."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def graph() -> dict[str, set[str]]:
    """The gateway's modules, each with the gateway modules it imports."""
    return {module: {m for m in imports_of(module) if m in MODULES} for module in MODULES}


def subpackages() -> Iterator[str]:
    return (name for name, path in MODULES.items() if path.name == "__init__.py")


# --- The rules ------------------------------------------------------------------------------


def test_every_subpackage_has_a_rank_and_every_rank_a_subpackage() -> None:
    found = {name for name in subpackages() if name != "gateway"}
    assert found == set(RANKS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_ranks(module: str) -> None:
    assert wrong_imports(module, imports_of(module)) == []


def test_no_module_takes_part_in_an_import_cycle() -> None:
    assert cycles(graph()) == []


def test_the_package_root_imports_nothing_of_its_own_until_asked() -> None:
    tree = ast.parse(MODULES["gateway"].read_text())
    at_import = [
        node
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        and (getattr(node, "module", "") or "").startswith("gateway")
    ]
    assert at_import == []


def _loaded_by(statement: str) -> set[str]:
    """The top-level packages a fresh interpreter has loaded after `statement`."""
    script = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return {name.split(".")[0] for name in json.loads(done.stdout)}


def test_the_sdk_loads_no_web_framework() -> None:
    loaded = _loaded_by("import gateway.sdk")

    assert loaded.isdisjoint({"flask", "werkzeug", "uvicorn", "gunicorn", "greenlet", "sqlite3"})


def test_the_settings_load_no_store_no_tracer_and_no_web_framework() -> None:
    loaded = _loaded_by("import gateway.config")

    assert loaded.isdisjoint({"sqlite3", "redis", "opentelemetry", "flask", "aiohttp"})


def test_create_app_is_still_importable_from_the_package() -> None:
    loaded = _loaded_by("from gateway import create_app")

    assert "flask" in loaded  # loaded when asked for, and only then


# --- The checks bite ------------------------------------------------------------------------


def test_an_import_up_the_ranks_is_caught() -> None:
    imported = imports_in("from gateway.web.app import create_app", "gateway.core.fusion")

    assert wrong_imports("gateway.core.fusion", imported) == [
        "gateway.core.fusion (rank 0) imports gateway.web.app (rank 6)"
    ]


def test_an_import_across_one_rank_is_caught() -> None:
    imported = imports_in("from gateway.feedback import service", "gateway.fanout.call")

    assert wrong_imports("gateway.fanout.call", imported) == [
        "gateway.fanout.call imports gateway.feedback.service across rank 3"
    ]


def test_a_web_framework_below_the_web_layer_is_caught() -> None:
    imported = imports_in("import flask", "gateway.contract.schemas")

    assert wrong_imports("gateway.contract.schemas", imported) == [
        "gateway.contract.schemas imports flask: below the web layer, no web framework"
    ]


def test_a_cycle_is_caught() -> None:
    found = cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})

    assert found == [["a", "b", "c"]]


def test_imports_in_functions_count_too() -> None:
    source = "def later():\n    from gateway.serving import edge\n"

    assert "gateway.serving.edge" in imports_in(source, "gateway.web.hooks")


def test_the_tests_mirror_the_subpackages() -> None:
    # Each subpackage's tests in a folder of the same name (mitmproxy checks its tree likewise).
    tests = ROOT / "tests"
    for subpackage in RANKS:
        folder = tests / subpackage.removeprefix("gateway.")
        assert sorted(folder.glob("test_*.py")), f"no tests of {subpackage} in {folder}"
