"""The front doors translate a protocol only: the HTTP and MCP modules import the feature services,
never the store, the read models or SQL, and each HTTP handler is a few statements over one service call."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "genome_service"
API = PACKAGE / "api"
FORBIDDEN = ("genome_service.projections", "genome_service.eventstore", "sqlalchemy", "sqlmodel")
HTTP_METHODS = {"get", "post", "put", "patch", "delete", "route"}
MAX_STATEMENTS = 3
MODULES = sorted(API.glob("*.py"))
FRONT_DOORS = sorted([*MODULES, *(PACKAGE / "mcp").glob("*.py")])


def imported_modules(tree: ast.Module) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def is_handler(function: ast.FunctionDef | ast.AsyncFunctionDef, wrapped: set[str]) -> bool:
    """Decorated with a route decorator, or wrapped by one elsewhere (``post(...)(_upload)``)."""
    for decorator in function.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Name) and target.id in HTTP_METHODS:
            return True
    return function.name in wrapped


def wrapped_by_route(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Call) and isinstance(node.func.func, ast.Name):
            if node.func.func.id in HTTP_METHODS:
                names |= {arg.id for arg in node.args if isinstance(arg, ast.Name)}
    return names


def statements(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Every statement in the body, nested ones included, the docstring not."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        body = body[1:]
    return sum(1 for top in body for node in ast.walk(top) if isinstance(node, ast.stmt))


def handlers(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    wrapped = wrapped_by_route(tree)
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and is_handler(node, wrapped)]


@pytest.mark.parametrize("module", FRONT_DOORS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_front_door_module_imports_no_store_read_model_or_sql(module: Path) -> None:
    imports = imported_modules(ast.parse(module.read_text(encoding="utf-8")))
    assert [name for name in imports if name.startswith(FORBIDDEN)] == []


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_every_handler_is_at_most_three_statements(module: Path) -> None:
    long = {f.name: statements(f) for f in handlers(module) if statements(f) > MAX_STATEMENTS}
    assert long == {}


def test_the_checks_see_the_handlers_and_would_catch_a_long_one() -> None:
    found = [f.name for module in MODULES for f in handlers(module)]
    assert "upload" in found or "_upload" in found  # registered through post(...)(_upload)
    assert len(found) >= 40
    long = ast.parse('@get("/")\ndef h():\n    """Doc."""\n    a = 1\n    if a:\n        b = 2\n    return a\n').body[0]
    assert statements(long) == 4  # type: ignore[arg-type]
