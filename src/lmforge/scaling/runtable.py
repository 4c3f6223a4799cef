"""Run tables for the scaling fits: (N parameters, D tokens, final loss) per run, read from CSV,
JSONL/JSON or lmforge run directories (their manifests), with a clear error naming the file,
line and field for anything missing, non-numeric, non-positive or NaN."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import DataError, LMForgeError
from lmforge.runs import read_manifest


class FitError(LMForgeError):
    """A law cannot be fitted from these runs (too few, degenerate, or no convergence)."""


# ============================================================================ run tables
@dataclass(frozen=True)
class Run:
    n: float
    d: float
    loss: float
    flops: float | None = None  # measured/declared training FLOPs; default 6ND
    budget: float | None = None  # IsoFLOP group label, if the sweep declares one
    lr: float | None = None
    batch_tokens: float | None = None
    name: str = ""
    source: str = ""

    @property
    def compute(self) -> float:
        return self.flops if self.flops else 6.0 * self.n * self.d


@dataclass
class RunTable:
    runs: list[Run]
    warnings: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.runs)

    @property
    def n(self) -> np.ndarray:
        return np.array([r.n for r in self.runs], dtype=float)

    @property
    def d(self) -> np.ndarray:
        return np.array([r.d for r in self.runs], dtype=float)

    @property
    def loss(self) -> np.ndarray:
        return np.array([r.loss for r in self.runs], dtype=float)

    @property
    def compute(self) -> np.ndarray:
        return np.array([r.compute for r in self.runs], dtype=float)

    @classmethod
    def from_arrays(cls, n, d, loss, **columns) -> RunTable:
        """Build (and validate) a table from arrays; extra columns: flops, budget, lr, ..."""
        n, d, loss = (np.asarray(v, dtype=float).ravel() for v in (n, d, loss))
        if not (len(n) == len(d) == len(loss)):
            raise DataError(f"n, d and loss differ in length ({len(n)}, {len(d)}, {len(loss)})")
        rows = []
        for i in range(len(n)):
            row = {"params": n[i], "tokens": d[i], "loss": loss[i]}
            row.update({k: v[i] for k, v in columns.items()})
            rows.append((row, f"row {i}"))
        return _build_table(rows, ["<arrays>"], drop_invalid=False)


_ALIASES = {
    "n": ("params", "n", "n_params", "num_params", "parameters", "model_params"),
    "d": ("tokens", "d", "n_tokens", "num_tokens", "train_tokens"),
    "loss": ("loss", "val_loss", "final_loss", "eval_loss"),
    "flops": ("flops", "compute", "c", "train_flops"),
    "budget": ("budget", "isoflop", "flops_budget"),
    "lr": ("lr", "learning_rate"),
    "batch_tokens": ("batch_tokens", "batch_size_tokens", "tokens_per_step"),
    "name": ("name", "run", "id"),
}
_REQUIRED = {"n": "N (parameters)", "d": "D (tokens)", "loss": "final loss"}


class _RowError(Exception):
    pass


def _pick(row: dict, field_: str) -> Any:
    low = {str(k).strip().lower(): v for k, v in row.items()}
    for alias in _ALIASES[field_]:
        if alias in low and low[alias] not in (None, ""):
            return low[alias]
    return None


def _number(v: Any, label: str, required: bool) -> float | None:
    if v is None:
        if required:
            raise _RowError(f"{label} is missing")
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise _RowError(f"{label} = {v!r} is not a number") from None
    if math.isnan(x):
        raise _RowError(f"{label} is NaN (a diverged or unfinished run?)")
    if math.isinf(x):
        raise _RowError(f"{label} is infinite")
    if x <= 0:
        raise _RowError(f"{label} must be positive, got {x:g}")
    return x


def _row_to_run(row: dict, where: str) -> Run:
    if "_error" in row:  # a run directory whose manifest cannot give a row
        raise _RowError(row["_error"])
    vals: dict[str, Any] = {}
    for f in ("n", "d", "loss", "flops", "budget", "lr", "batch_tokens"):
        vals[f] = _number(_pick(row, f), _REQUIRED.get(f, f), f in _REQUIRED)
    name = _pick(row, "name")
    return Run(name=str(name) if name is not None else "", source=where, **vals)


def _build_table(rows: list[tuple[dict, str]], sources: list[str], drop_invalid: bool) -> RunTable:
    runs, errors = [], []
    for row, where in rows:
        try:
            runs.append(_row_to_run(row, where))
        except _RowError as e:
            errors.append(f"{where}: {e}")
    if errors and not drop_invalid:
        shown = "; ".join(errors[:5]) + (f"; ... and {len(errors) - 5} more" if len(errors) > 5 else "")
        raise DataError(
            f"{len(errors)} invalid run(s): {shown}. Fix or remove them, or pass "
            "--drop-invalid (drop_invalid=True) to skip them"
        )
    warnings = [f"skipped {e}" for e in errors]
    if not runs:
        raise DataError(f"no valid runs in {', '.join(sources)}")
    return RunTable(runs, warnings, list(sources))


def _first_key(obj: Any, keys: tuple[str, ...]) -> Any:
    """First value under any of `keys` in a nested dict (depth-first), else None."""
    if isinstance(obj, dict):
        for k in keys:
            if k in obj and not isinstance(obj[k], (dict, list)):
                return obj[k]
        for v in obj.values():
            hit = _first_key(v, keys)
            if hit is not None:
                return hit
    return None


def _manifest_row(stage_dir: Path) -> tuple[dict, str]:
    where = str(stage_dir / "manifest.json")
    m = read_manifest(stage_dir)
    if m is None:
        return {"_error": "manifest is missing or unreadable"}, where
    if m.get("status") != "complete":
        return {"_error": f"status is {m.get('status')!r}, not 'complete'"}, where
    metrics, config = m.get("metrics") or {}, m.get("config") or {}
    row = {
        "params": metrics.get("params"),
        "tokens": metrics.get("tokens"),
        "val_loss": metrics.get("val_loss"),
        "flops": metrics.get("flops"),
        "budget": metrics.get("budget"),
        "lr": metrics.get("lr") or _first_key(config, ("lr", "learning_rate")),
        "batch_tokens": metrics.get("batch_tokens") or _first_key(config, ("batch_tokens",)),
        "name": stage_dir.parent.name if stage_dir.name == "pretrain" else stage_dir.name,
    }
    for key, label in (
        ("params", "metrics.params"),
        ("tokens", "metrics.tokens"),
        ("val_loss", "metrics.val_loss"),
    ):
        if row[key] is None:
            return {"_error": f"{label} is missing from the manifest"}, where
    return row, where


def _dir_rows(path: Path) -> list[tuple[dict, str]]:
    if (path / "pretrain" / "manifest.json").is_file():
        return [_manifest_row(path / "pretrain")]
    if (path / "manifest.json").is_file():
        return [_manifest_row(path)]
    found = sorted(p.parent.parent for p in path.glob("*/pretrain/manifest.json"))
    if not found:
        raise DataError(
            f"{path}: no lmforge runs here (expected {path}/pretrain/manifest.json "
            f"or {path}/<run>/pretrain/manifest.json)"
        )
    return [_manifest_row(p / "pretrain") for p in found]


def _file_rows(path: Path) -> list[tuple[dict, str]]:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM from spreadsheets
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        if not reader.fieldnames:
            raise DataError(f"{path}: empty CSV (expected a header row: params,tokens,loss)")
        _check_columns(path, reader.fieldnames)
        return [(row, f"{path}:{i + 2}") for i, row in enumerate(reader)]
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{i + 1}: expected a JSON object per line")
                rows.append((obj, f"{path}:{i + 1}"))
        if rows:
            _check_columns(path, set().union(*(r.keys() for r, _ in rows)))
        return rows
    if suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        items = obj.get("runs") if isinstance(obj, dict) else obj
        if not isinstance(items, list) or not all(isinstance(r, dict) for r in items):
            raise DataError(f'{path}: expected a list of run objects (or {{"runs": [...]}})')
        if items:
            _check_columns(path, set().union(*(r.keys() for r in items)))
        return [(r, f"{path}[{i}]") for i, r in enumerate(items)]
    raise DataError(
        f"{path}: unknown table format {suffix!r}; use .csv, .tsv, .jsonl, .json or an lmforge run directory"
    )


def _check_columns(path: Path, columns: Iterable[str]) -> None:
    cols = {str(c).strip().lower() for c in columns}
    for f, label in _REQUIRED.items():
        if not cols & set(_ALIASES[f]):
            raise DataError(
                f"{path}: no column for {label}; expected one of "
                f"{', '.join(_ALIASES[f])}; found {', '.join(sorted(cols)) or 'none'}"
            )


def load_runs(paths: str | Path | Iterable[str | Path], drop_invalid: bool = False) -> RunTable:
    """Read runs from CSV/TSV/JSONL/JSON tables and lmforge run directories.

    Columns (case-insensitive, aliases in `_ALIASES`): params (N), tokens (D), loss; optional
    flops, budget (IsoFLOP group), lr, batch_tokens, name. A run directory contributes the
    `metrics.params / tokens / val_loss` of its `pretrain/manifest.json`; a directory of run
    directories contributes all of them. Invalid rows raise `DataError` naming file and line,
    unless `drop_invalid` (then they are skipped and listed in `table.warnings`).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    rows: list[tuple[dict, str]] = []
    sources = []
    for p in map(Path, paths):
        if p.is_dir():
            got = _dir_rows(p)
        elif p.is_file():
            got = _file_rows(p)
        else:
            raise DataError(f"{p}: no such file or directory")
        sources.append(str(p))
        rows.extend(got)
    if not rows:
        raise DataError(f"no runs in {', '.join(sources) or 'the given paths'}")
    return _build_table(rows, sources, drop_invalid)
