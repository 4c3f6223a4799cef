"""User task specs (YAML/JSON, see `readers.py`'s docstring for the keys) and bare item files.

A spec maps an item's fields onto a prompt, choices and a gold answer. The gold answer is
resolved in a fixed order: an integer index, then a label (`labels:`, default A, B, C...), then
a numeric string as an index, and only then the text of a choice -- so numeric choices (MMLU's
abstract algebra: choices `[8, 2, 24, 120]`, answer `2`) mean index 2, not the choice "2".
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from ..config import parse_yaml
from ..errors import DataError
from .items import (
    LETTERS,
    BadItem,
    Problems,
    check_choices,
    check_index,
    iter_records,
    make_task,
    read_items,
    read_text,
)
from .tasks import Doc, Task


class _Template(string.Formatter):
    """str.format over an item's fields; no attribute access, clear error on a missing field."""

    def get_field(self, field_name, args, kwargs):
        if "." in field_name:
            raise BadItem("bad_template", f"template field {field_name!r}: attribute access is not allowed")
        return super().get_field(field_name, args, kwargs)

    def get_value(self, key, args, kwargs):
        if isinstance(key, int) or key not in kwargs:
            raise BadItem("missing_field", f"the template needs field {key!r}, which the item lacks")
        return kwargs[key]


_FMT = _Template()


def _fill(template: str, rec: dict) -> str:
    try:
        return _FMT.format(template, **rec)
    except (IndexError, KeyError, ValueError, TypeError) as e:
        raise BadItem("bad_template", f"template {template!r}: {e}") from None


SPEC_KEYS = {
    "name",
    "type",
    "data",
    "examples",
    "fewshot_data",
    "prompt",
    "choices",
    "answer",
    "labels",
    "target",
    "num_fewshot",
    "seed",
    "description",
    "target_delimiter",
    "fewshot_delimiter",
    "until",
    "max_new_tokens",
    "extract",
}


def _default_prompt(rec: dict) -> str:
    for k in ("query", "context", "prompt"):
        if k in rec:
            return str(rec[k])
    if "question" in rec:
        return f"Question: {rec['question']}\nAnswer:"
    raise BadItem(
        "missing_prompt", "the item has no query/context/prompt/question field and the spec no `prompt:`"
    )


def _spec_builder(spec: dict, kind: str) -> Callable[[dict, str], Doc]:
    prompt_t = spec.get("prompt")
    choices_spec = spec.get("choices", "choices")
    answer_key = spec.get("answer")
    labels = spec.get("labels")
    target_t = spec.get("target")

    def build(rec: dict, where: str) -> Doc:
        query = _fill(prompt_t, rec) if prompt_t else _default_prompt(rec)
        target = _fill(target_t, rec) if target_t else None
        keys = [answer_key] if answer_key else ["answer", "gold", "label"]
        key = next((k for k in keys if k in rec and rec[k] is not None and str(rec[k]).strip() != ""), None)
        if kind == "generate":
            if key is None:
                raise BadItem("missing_answer", f"field {keys[0]!r} (the reference answer) is missing")
            return Doc(query, target=target, answer=str(rec[key]), id=str(rec.get("id", "")))
        if isinstance(choices_spec, list):
            raw: Any = [_fill(str(c), rec) for c in choices_spec]
        else:
            raw = rec.get(choices_spec)
            if isinstance(raw, dict) and "text" in raw:
                raw = raw["text"]
            if raw is None:
                raise BadItem("no_choices", f"field {choices_spec!r} (the choices) is missing")
        choices = check_choices(raw)
        if key is None:
            raise BadItem("missing_answer", f"field {keys[0]!r} (the answer) is missing")
        gold = _resolve_answer(rec[key], choices, labels)
        return Doc(query, choices, gold, target=target, id=str(rec.get("id", "")))

    return build


def _resolve_answer(ans: Any, choices: list[str], labels: list[str] | None) -> int:
    """The gold index: an int index, a label, a numeric string as an index, then a choice's text."""
    if isinstance(ans, bool):
        raise BadItem("bad_answer", f"answer {ans!r} is not an index, label or choice")
    if isinstance(ans, int):
        return check_index(ans, len(choices))
    s = str(ans).strip()
    labs = [str(x) for x in (labels or LETTERS[: len(choices)])]
    if s in labs:
        j = labs.index(s)
        if j >= len(choices):
            raise BadItem(
                "answer_out_of_range", f"answer label {s!r} is out of range for {len(choices)} choices"
            )
        return j
    numeric = s.lstrip("-").isdigit()
    if numeric and 0 <= int(s) < len(choices):  # an index before a choice's text: "2" of [8, 2, 24, 120]
        return int(s)
    if s in choices:
        return choices.index(s)
    if numeric:
        return check_index(int(s), len(choices))
    raise BadItem(
        "answer_not_a_choice",
        f"answer {s!r} is not an index, a label ({', '.join(labs)}) or one of the choices",
    )


def read_spec(path: str | Path, *, on_error: str = "raise") -> Task:
    """A YAML/JSON task spec (see the module docstring)."""
    path = Path(path)
    spec = parse_yaml(read_text(path), str(path), DataError)
    if not isinstance(spec, dict):
        raise DataError(f"{path}: a task spec must be a mapping (name:, data:, prompt:, ...)")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise DataError(f"{path}: unknown key(s) {unknown}; known: {', '.join(sorted(SPEC_KEYS))}")
    kind = spec.get("type", "multiple_choice")
    if kind not in ("multiple_choice", "generate"):
        raise DataError(f"{path}: type must be multiple_choice or generate, got {kind!r}")
    kw = _spec_settings(path, spec)
    for key in ("prompt", "target"):
        if key in spec and not isinstance(spec[key], str):
            raise DataError(f"{path}: `{key}` must be a template string, got {type(spec[key]).__name__}")
    p = Problems(on_error)
    build = _spec_builder(spec, kind)
    docs = _spec_items(path, spec, "data", "examples", p, build, required=True)
    assert docs is not None  # required=True: an empty or absent `data` raised
    shots = _spec_items(path, spec, "fewshot_data", None, Problems("skip"), build, required=False)
    return make_task(str(spec.get("name") or path.stem), kind, docs, p, path, fewshot_docs=shots, **kw)


def _spec_settings(path: Path, spec: dict) -> dict:
    """The prompting / generation settings of a spec, type-checked here so that a wrong value
    is an error naming the file and key now, not a TypeError in the middle of an evaluation."""
    kw: dict = {}

    def bad(key: str, rule: str):
        raise DataError(f"{path}: `{key}` {rule}, got {spec[key]!r}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if "num_fewshot" in spec:
        if not is_int(spec["num_fewshot"]) or spec["num_fewshot"] < 0:
            bad("num_fewshot", "must be an integer >= 0")
        kw["num_fewshot"] = spec["num_fewshot"]
    if "seed" in spec:
        if not is_int(spec["seed"]):
            bad("seed", "must be an integer")
        kw["seed"] = spec["seed"]
    for key in ("description", "target_delimiter", "fewshot_delimiter"):
        if key in spec:
            if not isinstance(spec[key], str):
                bad(key, "must be a string")
            kw[key] = spec[key]
    if "until" in spec:
        until = [spec["until"]] if isinstance(spec["until"], str) else spec["until"]
        if not isinstance(until, list) or not all(isinstance(u, str) and u for u in until):
            bad("until", "must be a non-empty string or a list of them")
        kw["until"] = until
    if "max_new_tokens" in spec:
        if not is_int(spec["max_new_tokens"]) or spec["max_new_tokens"] < 1:
            bad("max_new_tokens", "must be an integer >= 1")
        kw["max_new_tokens"] = spec["max_new_tokens"]
    if "extract" in spec:
        ex = spec["extract"]
        if not isinstance(ex, str) or not (ex in ("text", "number") or ex.startswith("regex:")):
            bad("extract", "must be text, number or regex:PATTERN")
        if ex.startswith("regex:"):
            try:
                re.compile(ex[len("regex:") :])
            except re.error as e:
                raise DataError(f"{path}: `extract` {ex!r}: invalid regular expression ({e})") from None
        kw["extract"] = ex
    return kw


def _spec_items(
    path: Path, spec: dict, key: str, inline: str | None, p: Problems, build, required: bool
) -> list[Doc] | None:
    if inline and inline in spec:
        items = spec[inline]
        if not isinstance(items, list):
            raise DataError(f"{path}: `{inline}` must be a list of items")
        docs = []
        for i, rec in enumerate(items):
            where = f"{path}:{inline}[{i}]"
            try:
                d = build(rec if isinstance(rec, dict) else {}, where)
                d.id = d.id or f"{inline}[{i}]"
                docs.append(d)
            except BadItem as b:
                p(where, b.reason, b.detail)
        if not docs:
            raise DataError(f"{path}: no usable items in `{inline}`")
        return docs
    if key not in spec:
        if required:
            raise DataError(f"{path}: the spec needs `data: FILE` (JSONL/JSON/CSV) or inline `examples:`")
        return None
    return read_items((path.parent / str(spec[key])).resolve(), p, build)


def read_items_file(path: str | Path, *, on_error: str = "raise") -> Task:
    """A bare JSONL/JSON/CSV of items: multiple choice when the first has `choices`."""
    path = Path(path)
    first = next(iter_records(path, Problems("skip")), None)
    if first is None:
        raise DataError(f"{path}: no items")
    kind: Literal["multiple_choice", "generate"] = "multiple_choice" if "choices" in first[1] else "generate"
    p = Problems(on_error)
    docs = read_items(path, p, _spec_builder({}, kind))
    return make_task(path.stem, kind, docs, p, path)
