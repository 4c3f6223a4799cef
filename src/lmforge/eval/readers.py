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
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import DataError
from .items import (
    LETTERS,
    BadItem,
    Problems,
    check_choices,
    check_index,
    make_task,
    need,
    read_items,
    read_text,
)
from .specs import read_items_file, read_spec
from .tasks import Doc, Task

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
    problems = Problems(on_error)
    docs: list[Doc] = []
    for f in _mmlu_files(path):
        subject = re.sub(r"_(dev|val|test|train)$", "", f.stem)
        rows = list(csv.reader(io.StringIO(read_text(f))))
        start = 1 if rows and [c.strip().lower() for c in rows[0]] == MMLU_HEADER else 0
        for n, row in enumerate(rows[start:], start + 1):
            where = f"{f}:{n}"
            if not row or not any(c.strip() for c in row):
                continue
            try:
                if len(row) != 6:
                    raise BadItem(
                        "wrong_column_count",
                        f"expected 6 columns (question, 4 choices, answer), got {len(row)}",
                    )
                q, choices, ans = row[0], check_choices(row[1:5]), row[5].strip()
                if not ans:
                    raise BadItem("missing_answer", "the answer column is empty")
                if ans.upper() in LETTERS[:4] and not ans.isdigit():
                    gold = LETTERS.index(ans.upper())
                elif ans.lstrip("-").isdigit():
                    gold = check_index(int(ans), len(choices))
                else:
                    raise BadItem("bad_answer", f"answer {ans!r} is neither an index 0-3 nor a letter A-D")
            except BadItem as b:
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
    return make_task("mmlu" if style == "letters" else "mmlu_cloze", "multiple_choice", docs, problems, path)


# ----------------------------------------------------------------------------- ARC
def _arc_doc(rec: dict, where: str) -> Doc:
    q = need(rec, "question")
    ch = need(rec, "choices")
    if isinstance(ch, dict):
        texts, labels = ch.get("text"), ch.get("label")
    else:
        texts, labels = ch, None
    texts = check_choices(texts)
    labels = [str(x) for x in (labels or LETTERS[: len(texts)])]
    if len(labels) != len(texts):
        raise BadItem("label_count", f"{len(labels)} labels for {len(texts)} choices")
    key = rec.get("answerKey", rec.get("answer"))
    if key is None or str(key).strip() == "":
        raise BadItem("missing_answer", "field 'answerKey' is missing")
    if str(key) not in labels:
        raise BadItem("answer_not_in_labels", f"answerKey {key!r} is not one of the labels {labels}")
    return Doc(
        f"Question: {str(q).strip()}\nAnswer:", texts, labels.index(str(key)), id=str(rec.get("id", ""))
    )


def read_arc(path: str | Path, *, on_error: str = "raise") -> Task:
    p = Problems(on_error)
    path = Path(path)
    return make_task("arc", "multiple_choice", read_items(path, p, _arc_doc), p, path)


# ----------------------------------------------------------------------------- HellaSwag
def hellaswag_preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_doc(rec: dict, where: str) -> Doc:
    if "ctx_a" in rec:
        ctx = str(rec["ctx_a"]) + " " + str(rec.get("ctx_b", "")).capitalize()
    else:
        ctx = str(need(rec, "ctx"))
    label = rec.get("activity_label", "")
    query = hellaswag_preprocess(f"{label}: {ctx}" if label else ctx)
    endings = check_choices(need(rec, "endings"))
    gold = need(rec, "label", "label")
    if isinstance(gold, str) and gold.strip().lstrip("-").isdigit():
        gold = int(gold)
    gold = check_index(gold, len(endings))
    return Doc(
        query, [hellaswag_preprocess(e) for e in endings], gold, id=str(rec.get("idx", rec.get("ind", "")))
    )


def read_hellaswag(path: str | Path, *, on_error: str = "raise") -> Task:
    p = Problems(on_error)
    path = Path(path)
    return make_task("hellaswag", "multiple_choice", read_items(path, p, _hellaswag_doc), p, path)


# ----------------------------------------------------------------------------- GSM8K
def _gsm8k_doc(rec: dict, where: str) -> Doc:
    q = str(need(rec, "question")).strip()
    sol = str(need(rec, "answer"))
    if "####" not in sol:
        raise BadItem("missing_answer", "answer has no '#### <number>' final answer")
    final = sol.rsplit("####", 1)[1].strip().replace(",", "")
    if not final:
        raise BadItem("missing_answer", "nothing after '####'")
    return Doc(f"Question: {q}\nAnswer:", target=sol.strip(), answer=final)


def read_gsm8k(path: str | Path, *, on_error: str = "raise") -> Task:
    """GSM8K: 'Question: ...\\nAnswer:' prompts, shots show the worked solution ending in
    '#### N'; greedy until a blank line or the next 'Question:'; numeric exact match."""
    path = Path(path)
    p = Problems(on_error)
    shots = None
    if path.is_dir():
        tests = sorted(path.glob("test*.jsonl"))
        if not tests:
            raise DataError(f"{path}: no test*.jsonl in this GSM8K folder")
        docs = [d for f in tests for d in read_items(f, p, _gsm8k_doc)]
        if (path / "train.jsonl").exists():
            shots = read_items(path / "train.jsonl", Problems("skip"), _gsm8k_doc)
    else:
        docs = read_items(path, p, _gsm8k_doc)
    return make_task(
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
            suffix == ".json" and path.is_file() and read_text(path).lstrip().startswith("{")
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
