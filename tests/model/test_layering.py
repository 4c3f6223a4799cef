"""The model layer imports nothing above it (issue 17): no `peft`, `train`, `stages`, `cli` or
domain package, at module level or inside functions, and its own modules form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import lmforge.model

MODEL = Path(lmforge.model.__file__).parent
ALLOWED_UP = {"errors", "runs", "config"}  # the ground floor


def _imports(path: Path) -> set[str]:
    """Every lmforge module `path` imports (relative imports resolved), function bodies included."""
    pkg = ["lmforge", *path.relative_to(MODEL.parent).with_suffix("").parts[:-1]]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith("lmforge.")}


def test_model_imports_only_downward():
    bad = []
    for f in sorted(MODEL.rglob("*.py")):
        for mod in _imports(f):
            top = mod.split(".")[1]
            if top != "model" and top not in ALLOWED_UP:
                bad.append(f"{f.relative_to(MODEL.parent)} imports {mod}")
    assert not bad, bad


def test_no_cycle_between_model_modules():
    files = {f: _imports(f) for f in MODEL.glob("*.py")}
    name = {f: f"lmforge.model.{f.stem}" for f in files}
    deps = {name[f]: {m for m in imps if m in name.values() and m != name[f]} for f, imps in files.items()}
    deps.pop("lmforge.model.__init__", None)
    for a, ds in deps.items():
        for b in ds:
            assert a not in deps.get(b, set()), f"{a} <-> {b}"
