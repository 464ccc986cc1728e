"""The layering of the package: the domain knows no web framework and no web layer.

Imports are read from the source with `ast` (every import, in functions and under
`TYPE_CHECKING` too), so a wrong one fails here before anyone trips over it at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"

# Flask, its request hooks, views and error handlers, and the servers that run it. Everything
# else in the package is the domain (errors, outcome, fusion, fanout, clients, resilience,
# config, metrics, logs, schemas, ...) and the HTTP plumbing below Flask.
WEB_LAYER = frozenset(
    {
        "gateway",
        "gateway.asgi",
        "gateway.exchange",
        "gateway.feedback_routes",
        "gateway.hooks",
        "gateway.http_errors",
        "gateway.ops",
        "gateway.routes",
        "gateway.serving",
        "gateway.worker",
        "gateway.wsgi",
    }
)
WEB_FRAMEWORKS = ("flask", "werkzeug")


def _module_name(path: Path) -> str:
    return "gateway" if path.name == "__init__.py" else f"gateway.{path.stem}"


MODULES = {_module_name(path): path for path in sorted(PACKAGE.glob("*.py"))}


def imports_of(module: str) -> set[str]:
    """Every module `module` imports, by absolute name (`from gateway import x`: gateway.x)."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return found


def test_the_web_layer_names_modules_that_exist() -> None:
    assert set(MODULES) >= WEB_LAYER


@pytest.mark.parametrize("module", sorted(set(MODULES) - WEB_LAYER))
def test_the_domain_imports_no_web_framework_and_no_web_layer(module: str) -> None:
    imported = imports_of(module)

    frameworks = {name for name in imported if name.split(".")[0] in WEB_FRAMEWORKS}
    assert frameworks == set(), f"{module} imports a web framework"
    assert imported & WEB_LAYER == set(), f"{module} imports the web layer"


def test_the_leaf_value_types_import_nothing_of_the_gateway() -> None:
    assert {name for name in imports_of("gateway.outcome") if name.startswith("gateway")} == set()


def test_the_reader_sees_that_the_rules_bite() -> None:
    # The checks above read imports as they are written: the web layer's do name Flask.
    assert "flask" in imports_of("gateway.hooks")
    assert "gateway.exchange" in imports_of("gateway.http_errors")
    assert "gateway.metrics" in imports_of("gateway.hooks")  # `from gateway import metrics`
