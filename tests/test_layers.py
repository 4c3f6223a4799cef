"""The package's layering, read from the source with `ast` (imports inside functions count:
moving an import into a function hides a cycle, it does not remove it).

Layers, top to bottom; a module imports only from its own package or from lower layers:

    cli            lmforge.cli, lmforge.hf_cli, the tool commands (`*cli`), __main__, and
                   `scaling.sweep`, which runs whole pipelines
    pipeline       the runner
    stages         one thin module per stage
    domain         scaling > eval > align > serve > sft/chat > data > tokenizer > peft
                   (evaluation scores every kind of model, alignment generates through the
                   serving engine)
    train          the engine, objectives, optimizers, checkpoints
    model          the transformer, HF converters, generation
    ground floor   artifacts > runs, stats, config > errors, and the package's __init__ (its version)

and no module imports itself back through any chain (no cycles at all).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lmforge.pipeline import ORDER
from lmforge.runs import POLICY_STAGES

SRC = Path(__file__).resolve().parents[1] / "src" / "lmforge"

# rank of each top-level part of the package; higher may import lower (and its own part)
RANKS = {
    "__init__": 0,  # the version string
    "errors": 0,
    "config": 0.5,
    "runs": 0.5,
    "runlock": 0.5,
    "stats": 0.5,
    "artifacts": 0.7,
    "model": 1,
    "train": 2,
    "peft": 3,
    "tokenizer": 4,
    "data": 5,
    "chat": 6,
    "sft": 6.2,
    "serve": 6.5,
    "align": 7,
    "eval": 8,
    "scaling": 9,
    "stages": 10,
    "pipeline": 11,
    "cli": 12,
    "hf_cli": 12,
    "__main__": 12,
}
CLI_RANK = 12
# modules below the CLI that run whole pipelines, so they sit on top with it
RUNS_PIPELINES = {"lmforge.scaling.sweep"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(mod: str) -> set[str]:
    """The lmforge modules `mod` imports anywhere in its body (function-level included)."""
    path = MODULES[mod]
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lmforge"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("lmforge"):
                continue
            for a in node.names:  # `from pkg import module` imports the module
                full = f"{target}.{a.name}"
                found.add(full if full in MODULES else target)
    return {m for m in found if m in MODULES and m != mod}


GRAPH = {m: _imports(m) for m in MODULES}


def _rank(mod: str) -> float:
    parts = mod.split(".")
    if len(parts) == 1:
        return RANKS["__init__"]
    if parts[-1].endswith("cli") or parts[-1] == "__main__" or mod in RUNS_PIPELINES:
        return CLI_RANK  # tool commands sit with the CLI

    return RANKS[parts[1]]


def _part(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_has_a_layer():
    assert [m for m in MODULES if len(m.split(".")) > 1 and m.split(".")[1] not in RANKS] == []


def test_imports_only_go_down():
    bad = sorted(
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        for t in targets
        if _part(t) != _part(m) and (_rank(t) > _rank(m) or _rank(t) == _rank(m) < CLI_RANK)
    )
    assert bad == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_the_scan_sees_a_planted_cycle():
    planted = {k: set(v) for k, v in GRAPH.items()}
    planted["lmforge.runs"].add("lmforge.pipeline")  # pipeline reaches runs, so this closes a loop
    assert any("lmforge.runs" in c and "lmforge.pipeline" in c for c in _cycles(planted))


def test_policy_stages_keep_pipeline_order():
    assert [n for n in ORDER if n in POLICY_STAGES] == list(POLICY_STAGES)


@pytest.mark.parametrize("limit", [500])
def test_no_file_over_the_size_limit(limit):
    long = {
        m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > limit
    }
    assert long == {}


def test_no_function_over_100_lines():
    long = []
    for m, p in MODULES.items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 100:
                    long.append(f"{m}.{node.name} ({n} lines)")
    assert long == []
