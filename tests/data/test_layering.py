"""The data package imports only downward: no import cycle among its modules (imports inside
functions count: moving an import into a function hides a cycle, it does not remove it), and
nothing from the layers above it (stages, pipeline, cli)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
ABOVE = ("lmforge.stages", "lmforge.pipeline", "lmforge.cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(name: str) -> str:
    """The module `name` refers to: itself if it is a module or package, else its parent."""
    base = SRC / Path(*name.split("."))
    if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
        return name
    return name.rsplit(".", 1)[0]


def imports_of(path: Path) -> set[str]:
    """Every lmforge module `path` imports, at any depth of its code."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(resolve(a.name) for a in node.names if a.name.startswith("lmforge"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("lmforge"):
                for a in node.names:
                    out.add(resolve(f"{mod}.{a.name}"))
    out.discard(me)
    return out


def graph(package: str) -> dict[str, set[str]]:
    root = SRC / Path(*package.split("."))
    return {module_name(p): imports_of(p) for p in sorted(root.rglob("*.py"))}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if n not in g:
                continue
            if state.get(n) == 1:
                found.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    return found


def check_package(package: str, allowed_upward: dict[str, list[str]] | None = None) -> None:
    """No cycle inside `package`; imports from the layers above only where `allowed_upward` says."""
    g = graph(package)
    assert len(g) > 5
    assert cycles(g) == [], f"import cycles in {package}: {cycles(g)}"
    upward = {m: sorted(t for t in ts if t.startswith(ABOVE)) for m, ts in g.items()}
    assert {m: t for m, t in upward.items() if t} == (allowed_upward or {}), (
        f"{package} imports from the layers above it"
    )


def test_the_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", ["lmforge.data"])
def test_no_cycles_and_nothing_from_above(package):
    check_package(package)
