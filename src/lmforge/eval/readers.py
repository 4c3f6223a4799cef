"""Task readers: MMLU CSVs, ARC / HellaSwag / GSM8K JSONL, user task specs, and a built-in task.

A task is named by a string, so configs and the CLI can list tasks:

    builtin                     sentence-ending cloze built from the run's validation text
    mmlu:PATH                   MMLU CSV file or folder of <subject>_<split>.csv (letters A-D, as
                                the harness scores it); mmlu_cloze:PATH scores the answer texts
    arc:PATH                    ARC JSONL ({question, choices: {text, label}, answerKey})
    hellaswag:PATH              HellaSwag JSONL (ctx or ctx_a/ctx_b, activity_label, endings, label)
    gsm8k:PATH                  GSM8K JSONL file, or a folder (test*.jsonl items, train.jsonl shots)
    PATH.yaml | PATH.json       a task spec (below)
    PATH.jsonl                  items only: multiple choice if they have `choices`, else generative

A task spec lets a user add a task without code (YAML or JSON)::

    name: capitals
    type: multiple_choice            # or: generate
    data: capitals.jsonl             # JSONL / JSON array / CSV, relative to the spec (or inline `examples:`)
    fewshot_data: capitals_dev.jsonl # optional; default: the other items
    prompt: "Q: What is the capital of {country}?\\nA:"   # str.format over the item's fields
    choices: options                 # field holding the list, or a list of templates ["{a}", "{b}"]
    answer: label                    # field: an index, a label (A, B, ... or `labels:`) or the text of a choice
    target: "{answer_text}"          # optional: what follows the prompt in few-shot examples
    num_fewshot: 2
    seed: 1234
    description: ""                  # text before the first example
    target_delimiter: " "
    fewshot_delimiter: "\\n\\n"
    # generate only: until: ["\\n"], max_new_tokens: 64, extract: text | number | regex:PATTERN

Malformed items -- a missing answer, an answer index out of range, an answer that is not one of
the choices, no choices or an empty choice, invalid JSON -- raise a `DataError` naming the file,
line and field (``on_error="raise"``, the default), or are skipped and counted by reason in the
results (``on_error="skip"``).
"""

from __future__ import annotations

import csv
import io
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..config import parse_yaml
from ..data.readers import loads_json
from ..errors import DataError
from .tasks import Doc, Task

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class _Problems:
    """Raise on the first malformed item, or count it and go on."""

    def __init__(self, on_error: str):
        if on_error not in ("raise", "skip"):
            raise DataError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.counts: Counter = Counter()

    def __call__(self, where: str, reason: str, detail: str) -> None:
        if self.on_error == "raise":
            raise DataError(
                f"{where}: {detail} [{reason}]; fix the item, or evaluate with on_error=skip "
                f"to skip and count such items"
            )
        self.counts[reason] += 1


class _Bad(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _need(rec: dict, key: str, where_key: str | None = None) -> Any:
    if not isinstance(rec, dict) or key not in rec or rec[key] is None:
        raise _Bad("missing_" + (where_key or key), f"field {where_key or key!r} is missing")
    return rec[key]


def _check_choices(choices: Any) -> list[str]:
    if not isinstance(choices, list) or not choices:
        raise _Bad("no_choices", "the item has no choices")
    out = []
    for j, c in enumerate(choices):
        if not isinstance(c, (str, int, float)) or not str(c).strip():
            raise _Bad("empty_choice", f"choice {j} is empty")
        out.append(str(c))
    return out


def _check_index(gold: Any, n: int) -> int:
    if isinstance(gold, bool) or not isinstance(gold, int):
        raise _Bad("bad_answer", f"answer {gold!r} is not an index")
    if not 0 <= gold < n:
        raise _Bad("answer_out_of_range", f"answer index {gold} is out of range for {n} choices")
    return gold


# ----------------------------------------------------------------------------- file access
def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def iter_records(path: Path, problems: _Problems) -> Iterator[tuple[str, dict]]:
    """(where, record) from JSONL, a JSON array or a CSV with a header."""
    text = _read_text(path)
    name = path.name.lower()
    if name.endswith(".csv") or name.endswith(".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if name.endswith(".tsv") else ",")
        for row in reader:
            yield f"{path}:{reader.line_num}", dict(row)
        return
    if name.endswith(".json") and text.lstrip().startswith("["):
        items, err = loads_json(text)
        if err is not None:
            raise DataError(f"{path}: {err}")
        for i, rec in enumerate(items):
            yield f"{path}[{i}]", rec
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        rec, err = loads_json(line)
        if err is not None:
            problems(f"{path}:{n}", "invalid_json", err)
            continue
        if not isinstance(rec, dict):
            problems(f"{path}:{n}", "not_an_object", "each line must be a JSON object")
            continue
        yield f"{path}:{n}", rec


def _read_items(path: Path, problems: _Problems, build: Callable[[dict, str], Doc | None]) -> list[Doc]:
    docs = []
    for where, rec in iter_records(path, problems):
        try:
            doc = build(rec, where)
        except _Bad as b:
            problems(where, b.reason, b.detail)
            continue
        if doc is not None:
            if not doc.id:
                doc.id = where.rsplit("/", 1)[-1]
            docs.append(doc)
    if not docs:
        raise DataError(
            f"{path}: no usable items" + (f" (skipped: {dict(problems.counts)})" if problems.counts else "")
        )
    return docs


def _task(name: str, kind: str, docs: list[Doc], problems: _Problems, source: Path, **kw) -> Task:
    t = Task(name=name, kind=kind, docs=docs, source=str(source), **kw)
    t.skipped = Counter(problems.counts)
    return t


# ----------------------------------------------------------------------------- MMLU
MMLU_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]


def _mmlu_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.csv")) or sorted(path.glob("*/*.csv"))
        if files:
            return files
        raise DataError(f"{path}: no MMLU *.csv files in this folder")
    raise DataError(f"{path}: no such file or folder")


def read_mmlu(path: str | Path, *, style: str = "letters", on_error: str = "raise") -> Task:
    """MMLU: CSV with header question,choice0..3,answer (0-based index) or the original headerless
    files (question, A, B, C, D, letter). Few-shot examples come from the same subject."""
    path = Path(path)
    problems = _Problems(on_error)
    docs: list[Doc] = []
    for f in _mmlu_files(path):
        subject = re.sub(r"_(dev|val|test|train)$", "", f.stem)
        rows = list(csv.reader(io.StringIO(_read_text(f))))
        start = 1 if rows and [c.strip().lower() for c in rows[0]] == MMLU_HEADER else 0
        for n, row in enumerate(rows[start:], start + 1):
            where = f"{f}:{n}"
            if not row or not any(c.strip() for c in row):
                continue
            try:
                if len(row) != 6:
                    raise _Bad(
                        "wrong_column_count",
                        f"expected 6 columns (question, 4 choices, answer), got {len(row)}",
                    )
                q, choices, ans = row[0], _check_choices(row[1:5]), row[5].strip()
                if not ans:
                    raise _Bad("missing_answer", "the answer column is empty")
                if ans.upper() in LETTERS[:4] and not ans.isdigit():
                    gold = LETTERS.index(ans.upper())
                elif ans.lstrip("-").isdigit():
                    gold = _check_index(int(ans), len(choices))
                else:
                    raise _Bad("bad_answer", f"answer {ans!r} is neither an index 0-3 nor a letter A-D")
            except _Bad as b:
                problems(where, b.reason, b.detail)
                continue
            desc = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
            if style == "letters":
                query = (
                    q.strip()
                    + "\n"
                    + "".join(f"{LETTERS[j]}. {c}\n" for j, c in enumerate(choices))
                    + "Answer:"
                )
                docs.append(
                    Doc(query, list(LETTERS[:4]), gold, id=f"{subject}/{n}", group=subject, description=desc)
                )
            else:
                docs.append(
                    Doc(
                        f"Question: {q.strip()}\nAnswer:",
                        choices,
                        gold,
                        id=f"{subject}/{n}",
                        group=subject,
                        description=desc,
                    )
                )
    if not docs:
        raise DataError(f"{path}: no usable MMLU rows (skipped: {dict(problems.counts)})")
    return _task("mmlu" if style == "letters" else "mmlu_cloze", "multiple_choice", docs, problems, path)


# ----------------------------------------------------------------------------- ARC
def _arc_doc(rec: dict, where: str) -> Doc:
    q = _need(rec, "question")
    ch = _need(rec, "choices")
    if isinstance(ch, dict):
        texts, labels = ch.get("text"), ch.get("label")
    else:
        texts, labels = ch, None
    texts = _check_choices(texts)
    labels = [str(x) for x in (labels or LETTERS[: len(texts)])]
    if len(labels) != len(texts):
        raise _Bad("label_count", f"{len(labels)} labels for {len(texts)} choices")
    key = rec.get("answerKey", rec.get("answer"))
    if key is None or str(key).strip() == "":
        raise _Bad("missing_answer", "field 'answerKey' is missing")
    if str(key) not in labels:
        raise _Bad("answer_not_in_labels", f"answerKey {key!r} is not one of the labels {labels}")
    return Doc(
        f"Question: {str(q).strip()}\nAnswer:", texts, labels.index(str(key)), id=str(rec.get("id", ""))
    )


def read_arc(path: str | Path, *, on_error: str = "raise") -> Task:
    p = _Problems(on_error)
    path = Path(path)
    return _task("arc", "multiple_choice", _read_items(path, p, _arc_doc), p, path)


# ----------------------------------------------------------------------------- HellaSwag
def hellaswag_preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_doc(rec: dict, where: str) -> Doc:
    if "ctx_a" in rec:
        ctx = str(rec["ctx_a"]) + " " + str(rec.get("ctx_b", "")).capitalize()
    else:
        ctx = str(_need(rec, "ctx"))
    label = rec.get("activity_label", "")
    query = hellaswag_preprocess(f"{label}: {ctx}" if label else ctx)
    endings = _check_choices(_need(rec, "endings"))
    gold = _need(rec, "label", "label")
    if isinstance(gold, str) and gold.strip().lstrip("-").isdigit():
        gold = int(gold)
    gold = _check_index(gold, len(endings))
    return Doc(
        query, [hellaswag_preprocess(e) for e in endings], gold, id=str(rec.get("idx", rec.get("ind", "")))
    )


def read_hellaswag(path: str | Path, *, on_error: str = "raise") -> Task:
    p = _Problems(on_error)
    path = Path(path)
    return _task("hellaswag", "multiple_choice", _read_items(path, p, _hellaswag_doc), p, path)


# ----------------------------------------------------------------------------- GSM8K
def _gsm8k_doc(rec: dict, where: str) -> Doc:
    q = str(_need(rec, "question")).strip()
    sol = str(_need(rec, "answer"))
    if "####" not in sol:
        raise _Bad("missing_answer", "answer has no '#### <number>' final answer")
    final = sol.rsplit("####", 1)[1].strip().replace(",", "")
    if not final:
        raise _Bad("missing_answer", "nothing after '####'")
    return Doc(f"Question: {q}\nAnswer:", target=sol.strip(), answer=final)


def read_gsm8k(path: str | Path, *, on_error: str = "raise") -> Task:
    """GSM8K: 'Question: ...\\nAnswer:' prompts, shots show the worked solution ending in
    '#### N'; greedy until a blank line or the next 'Question:'; numeric exact match."""
    path = Path(path)
    p = _Problems(on_error)
    shots = None
    if path.is_dir():
        tests = sorted(path.glob("test*.jsonl"))
        if not tests:
            raise DataError(f"{path}: no test*.jsonl in this GSM8K folder")
        docs = [d for f in tests for d in _read_items(f, p, _gsm8k_doc)]
        if (path / "train.jsonl").exists():
            shots = _read_items(path / "train.jsonl", _Problems("skip"), _gsm8k_doc)
    else:
        docs = _read_items(path, p, _gsm8k_doc)
    return _task(
        "gsm8k",
        "generate",
        docs,
        p,
        path,
        fewshot_docs=shots,
        num_fewshot=0,
        until=["Question:", "\n\n"],
        max_new_tokens=256,
        extract="number",
    )


# ----------------------------------------------------------------------------- task specs
class _Template(string.Formatter):
    """str.format over an item's fields; no attribute access, clear error on a missing field."""

    def get_field(self, field_name, args, kwargs):
        if "." in field_name:
            raise _Bad("bad_template", f"template field {field_name!r}: attribute access is not allowed")
        return super().get_field(field_name, args, kwargs)

    def get_value(self, key, args, kwargs):
        if isinstance(key, int) or key not in kwargs:
            raise _Bad("missing_field", f"the template needs field {key!r}, which the item lacks")
        return kwargs[key]


_FMT = _Template()


def _fill(template: str, rec: dict) -> str:
    try:
        return _FMT.format(template, **rec)
    except (IndexError, KeyError, ValueError, TypeError) as e:
        raise _Bad("bad_template", f"template {template!r}: {e}") from None


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
    raise _Bad(
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
                raise _Bad("missing_answer", f"field {keys[0]!r} (the reference answer) is missing")
            return Doc(query, target=target, answer=str(rec[key]), id=str(rec.get("id", "")))
        if isinstance(choices_spec, list):
            raw = [_fill(str(c), rec) for c in choices_spec]
        else:
            raw = rec.get(choices_spec)
            if isinstance(raw, dict) and "text" in raw:
                raw = raw["text"]
            if raw is None:
                raise _Bad("no_choices", f"field {choices_spec!r} (the choices) is missing")
        choices = _check_choices(raw)
        if key is None:
            raise _Bad("missing_answer", f"field {keys[0]!r} (the answer) is missing")
        gold = _resolve_answer(rec[key], choices, labels)
        return Doc(query, choices, gold, target=target, id=str(rec.get("id", "")))

    return build


def _resolve_answer(ans: Any, choices: list[str], labels: list[str] | None) -> int:
    if isinstance(ans, bool):
        raise _Bad("bad_answer", f"answer {ans!r} is not an index, label or choice")
    if isinstance(ans, int):
        return _check_index(ans, len(choices))
    s = str(ans).strip()
    labs = [str(x) for x in (labels or LETTERS[: len(choices)])]
    if s in labs:
        j = labs.index(s)
        if j >= len(choices):
            raise _Bad(
                "answer_out_of_range", f"answer label {s!r} is out of range for {len(choices)} choices"
            )
        return j
    if s in choices:
        return choices.index(s)
    if s.lstrip("-").isdigit():
        return _check_index(int(s), len(choices))
    raise _Bad(
        "answer_not_a_choice",
        f"answer {s!r} is not an index, a label ({', '.join(labs)}) or one of the choices",
    )


def read_spec(path: str | Path, *, on_error: str = "raise") -> Task:
    """A YAML/JSON task spec (see the module docstring)."""
    path = Path(path)
    spec = parse_yaml(_read_text(path), str(path), DataError)
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
    p = _Problems(on_error)
    build = _spec_builder(spec, kind)
    docs = _spec_items(path, spec, "data", "examples", p, build, required=True)
    shots = _spec_items(path, spec, "fewshot_data", None, _Problems("skip"), build, required=False)
    return _task(str(spec.get("name") or path.stem), kind, docs, p, path, fewshot_docs=shots, **kw)


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
    path: Path, spec: dict, key: str, inline: str | None, p: _Problems, build, required: bool
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
            except _Bad as b:
                p(where, b.reason, b.detail)
        if not docs:
            raise DataError(f"{path}: no usable items in `{inline}`")
        return docs
    if key not in spec:
        if required:
            raise DataError(f"{path}: the spec needs `data: FILE` (JSONL/JSON/CSV) or inline `examples:`")
        return None
    return _read_items((path.parent / str(spec[key])).resolve(), p, build)


def read_items_file(path: str | Path, *, on_error: str = "raise") -> Task:
    """A bare JSONL/JSON/CSV of items: multiple choice when the first has `choices`."""
    path = Path(path)
    first = next(iter_records(path, _Problems("skip")), None)
    if first is None:
        raise DataError(f"{path}: no items")
    kind = "multiple_choice" if "choices" in first[1] else "generate"
    p = _Problems(on_error)
    docs = _read_items(path, p, _spec_builder({}, kind))
    return _task(path.stem, kind, docs, p, path)


# ----------------------------------------------------------------------------- built-in task
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def builtin_cloze_task(texts: Iterable[str], *, n: int = 200, n_choices: int = 4, seed: int = 1234) -> Task:
    """Pick the true ending of a sentence among endings of other sentences (HellaSwag-like),
    built from held-out text -- by default the run's validation split, so the default pipeline
    has a downstream task with no downloads. A model that learned nothing sits at 1/n_choices."""
    sents: list[tuple[str, str]] = []  # (preceding sentence, sentence)
    seen: set[str] = set()
    for text in texts:
        prev = ""
        for s in _SENT.split(" ".join(text.split())):
            words = s.split()
            alpha = sum(w.strip(".,;:()'\"").isalpha() for w in words)
            if 8 <= len(words) <= 40 and alpha >= 0.8 * len(words) and s not in seen:
                seen.add(s)
                sents.append((prev, s))
            prev = s
    if len(sents) < n_choices:
        raise DataError(f"builtin task: only {len(sents)} usable sentences in the text; need >= {n_choices}")
    rng = random.Random(seed)
    order = list(range(len(sents)))
    rng.shuffle(order)
    endings = []
    for prev, s in sents:
        w = s.split()
        n_end = min(max(3, len(w) // 3), 8)  # short endings: they must fit small contexts
        endings.append((" ".join(w[:-n_end]), " ".join(w[-n_end:])))
    docs = []
    for k in order[:n]:
        prev, _ = sents[k]
        head, gold = endings[k]
        pool = [j for j in rng.sample(order, min(len(order), 50)) if j != k and endings[j][1] != gold]
        pool.sort(key=lambda j: abs(len(endings[j][1].split()) - len(gold.split())))
        distract = list(dict.fromkeys(endings[j][1] for j in pool))[: n_choices - 1]
        if len(distract) < n_choices - 1:
            continue
        pos = rng.randrange(n_choices)
        choices = distract[:pos] + [gold] + distract[pos:]
        ctx = (prev[-200:] + " " if prev else "") + head
        docs.append(Doc(ctx, choices, pos, id=f"builtin/{k}"))
    return Task("builtin_cloze", "multiple_choice", docs, source="validation split (built-in)", seed=seed)


# ----------------------------------------------------------------------------- resolver
READERS: dict[str, Callable[..., Task]] = {
    "mmlu": lambda p, **kw: read_mmlu(p, style="letters", **kw),
    "mmlu_cloze": lambda p, **kw: read_mmlu(p, style="cloze", **kw),
    "arc": read_arc,
    "hellaswag": read_hellaswag,
    "gsm8k": read_gsm8k,
    "spec": read_spec,
    "jsonl": read_items_file,
}


def load_task(
    spec: str,
    *,
    on_error: str = "raise",
    builtin_texts: Iterable[str] | None = None,
    builtin_n: int = 200,
    seed: int | None = None,
) -> Task:
    """A Task from its name (see the module docstring)."""
    spec = spec.strip()
    if spec in ("builtin", "builtin_cloze"):
        if builtin_texts is None:
            raise DataError(
                "task 'builtin' is built from a run's validation text; run it inside the eval "
                "stage, or name a task file (mmlu:PATH, arc:PATH, my_task.yaml, ...)"
            )
        return builtin_cloze_task(builtin_texts, n=builtin_n, seed=seed if seed is not None else 1234)
    name, sep, rest = spec.partition(":")
    if sep and name in READERS and rest:
        task = READERS[name](rest, on_error=on_error)
    else:
        path = Path(spec)
        suffix = path.suffix.lower()
        if suffix in (".yaml", ".yml") or (
            suffix == ".json" and path.is_file() and _read_text(path).lstrip().startswith("{")
        ):
            task = read_spec(path, on_error=on_error)
        elif suffix in (".jsonl", ".json", ".csv", ".tsv"):
            task = read_items_file(path, on_error=on_error)
        else:
            raise DataError(
                f"task {spec!r}: not understood; use builtin, one of "
                f"{', '.join(k + ':PATH' for k in READERS if k not in ('spec', 'jsonl'))}, "
                f"a task spec .yaml/.json or an items .jsonl"
            )
    if seed is not None:
        task.seed = seed
    return task
