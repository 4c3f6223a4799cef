"""Fuzzing evaluation task files: YAML task specs with inline items, bare JSONL item files and
MMLU CSVs (`lmforge.eval.readers.load_task`).

Properties: a `DataError` naming the file, or a Task that can be used as returned -- every item
renders a prompt (few-shot included), multiple-choice items have non-empty choices and a gold
index in range, generation settings have the right types -- and with ``on_error=skip`` every
item is either kept or counted as skipped."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from lmforge.errors import DataError
from lmforge.eval.readers import load_task
from tests.fuzz_support import documented, fuzz

FIELDS = ["q", "question", "options", "choices", "label", "answer", "id", "context", "x"]
scalars = st.none() | st.booleans() | st.integers(-3, 10) | st.floats(allow_nan=False) | st.text(max_size=8)
values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(FIELDS + ["text"]), c, max_size=3),
    max_leaves=8,
)
items = st.dictionaries(st.sampled_from(FIELDS), values, max_size=5)
templates = st.one_of(
    st.sampled_from(
        [
            "Q: {q}\nA:",
            "{question}",
            "{x.y}",
            "{0}",
            "{q!r:>5}",
            "{",
            "}",
            "{{q}}",
            "{q:99999999999999999999}",
            "{q:{x}}",
            "plain",
        ]
    ),
    st.text(max_size=12),
)
spec = st.fixed_dictionaries(
    {},
    optional={
        "name": values,
        "type": st.sampled_from(["multiple_choice", "generate", "other"]) | values,
        "prompt": templates,
        "choices": st.sampled_from(["options", "choices"]) | st.lists(templates, max_size=3) | values,
        "answer": st.sampled_from(["label", "answer"]) | values,
        "labels": st.lists(st.text(max_size=2), max_size=4) | values,
        "target": templates,
        "num_fewshot": st.integers(-2, 4) | values,
        "seed": values,
        "description": values,
        "target_delimiter": values,
        "fewshot_delimiter": values,
        "until": values,
        "max_new_tokens": st.integers(-2, 64) | values,
        "extract": st.sampled_from(["text", "number", "regex:(\\d+)", "regex:(", "bogus"]) | values,
        "examples": st.lists(items, max_size=5) | values,
        "bogus_key": values,
    },
)


def _check_task(task, n_items: int | None, on_error: str) -> None:
    assert task.docs
    for i, d in enumerate(task.docs):
        p = task.prompt(i)
        assert isinstance(p, str)
        if task.kind == "multiple_choice":
            assert d.choices and all(isinstance(c, str) and c.strip() for c in d.choices)
            assert isinstance(d.gold, int) and 0 <= d.gold < len(d.choices)
        else:
            assert isinstance(d.answer, str)
    assert isinstance(task.num_fewshot, int) and task.num_fewshot >= 0
    assert isinstance(task.description, str) and isinstance(task.target_delimiter, str)
    assert isinstance(task.fewshot_delimiter, str)
    if task.kind == "generate":
        assert isinstance(task.until, list) and all(isinstance(u, str) and u for u in task.until)
        assert isinstance(task.max_new_tokens, int) and task.max_new_tokens >= 1
        assert task.extract in ("text", "number") or task.extract.startswith("regex:")
    if n_items is not None and on_error == "skip":
        assert len(task.docs) + sum(task.skipped.values()) == n_items


@fuzz(80)
@given(spec, st.sampled_from(["raise", "skip"]))
@example(
    {
        "prompt": "{q}",
        "choices": "options",
        "answer": "label",
        "num_fewshot": "two",
        "examples": [{"q": "a", "options": ["x", "y"], "label": 1}],
    },
    "raise",
)
@example(
    {
        "type": "generate",
        "prompt": "{q}",
        "until": "\n",
        "max_new_tokens": "many",
        "examples": [{"q": "a", "answer": "1"}],
    },
    "raise",
)
@example(
    {
        "prompt": "{q}",
        "choices": "options",
        "description": 5,
        "examples": [{"q": "a", "options": ["x", "y"], "label": 0}],
    },
    "raise",
)
@example(
    {"type": "generate", "prompt": "{q}", "extract": "regex:(", "examples": [{"q": "a", "answer": "1"}]},
    "raise",
)
def test_task_spec(doc, on_error):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "task.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
        task, err = documented(load_task, str(path), on_error=on_error)
    if err is not None:
        assert isinstance(err, DataError) and str(path) in str(err), err
        return
    n = len(doc["examples"]) if isinstance(doc.get("examples"), list) else None
    _check_task(task, n, on_error)


lines = st.one_of(
    items.map(json.dumps), st.text(max_size=20), st.sampled_from(["[" * 3000, "1" * 5000, "{}", "[]"])
)


@fuzz(60)
@given(st.lists(lines, min_size=1, max_size=6), st.sampled_from(["raise", "skip"]))
@example(["[" * 3000, '{"question": "q", "answer": "a"}'], "skip")
def test_items_jsonl(raw, on_error):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "items.jsonl"
        path.write_text("\n".join(raw), encoding="utf-8", errors="surrogatepass")
        task, err = documented(load_task, str(path), on_error=on_error)
    if err is not None:
        assert isinstance(err, DataError) and str(path) in str(err), err
        return
    _check_task(task, None, on_error)


csv_cells = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8)


@fuzz(30)
@given(
    st.lists(st.lists(csv_cells, min_size=0, max_size=7), min_size=1, max_size=5),
    st.sampled_from(["raise", "skip"]),
)
def test_mmlu_csv(rows, on_error):
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "astronomy_test.csv"
        path.write_text(buf.getvalue(), encoding="utf-8")
        task, err = documented(load_task, f"mmlu:{path}", on_error=on_error)
    if err is not None:
        assert isinstance(err, DataError) and str(path) in str(err), err
        return
    _check_task(task, None, on_error)
