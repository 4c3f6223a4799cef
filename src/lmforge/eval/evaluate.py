"""Running a task of either kind, and naming its results: `evaluate_task` dispatches to
`tasks.evaluate_multiple_choice` or `generative.evaluate_generative`; `headline` flattens a
result for manifests; `unique_keys` and `predictions_jsonl` are the one way `lmforge tasks` and
the eval stage key results and write per-item predictions.

Kept apart from `tasks.py` (the Task model + multiple choice) so that `generative.py`, which
needs `Task`, and the dispatcher, which needs both evaluators, import in one direction only.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .generative import evaluate_generative
from .loglik import Scorer
from .tasks import Task, evaluate_multiple_choice


def evaluate_task(
    model,
    tok,
    task: Task,
    *,
    scorer: Scorer | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    keep_predictions: bool = False,
    **gen_kw,
) -> dict:
    """Run a task of either kind; generation options (n_samples, temperature, k...) go to
    `generative.evaluate_generative`."""
    if task.kind == "multiple_choice":
        scorer = scorer or Scorer(model, tok)
        return evaluate_multiple_choice(
            scorer, task, limit=limit, num_fewshot=num_fewshot, keep_predictions=keep_predictions
        )
    return evaluate_generative(
        model, tok, task, limit=limit, num_fewshot=num_fewshot, keep_predictions=keep_predictions, **gen_kw
    )


def headline(res: dict) -> dict[str, float]:
    """Flat numbers for manifests and summaries: acc, acc_norm, ... / exact_match, pass@k."""
    out = {}
    for k, v in res.items():
        if isinstance(v, dict) and "value" in v:
            out[k] = v["value"]
    if "chance" in res:
        out["chance"] = res["chance"]
    out["n"] = res.get("n", 0)
    return out


def unique_keys(tasks: Sequence[Task]) -> list[str]:
    """One key per task for results and prediction files: the task's name, or, when several
    tasks share a name (`--task arc:A.jsonl --task arc:B.jsonl`), the name and its source file's
    stem (`arc-A`, `arc-B`), numbered if even that repeats -- so no task overwrites another."""
    counts = Counter(t.name for t in tasks)
    keys: list[str] = []
    for t in tasks:
        key = t.name
        if counts[t.name] > 1:
            stem = re.sub(r"[^A-Za-z0-9_.]+", "_", Path(t.source).stem).strip("_")
            key = f"{t.name}-{stem}" if stem else t.name
        base, n = key, 2
        while key in keys:
            key, n = f"{base}-{n}", n + 1
        keys.append(key)
    return keys


def predictions_jsonl(predictions: Sequence[dict]) -> str:
    """Per-item predictions as JSONL, the one format of `eval/predictions/<key>.jsonl` and of
    `lmforge tasks --predictions DIR`."""
    return "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
