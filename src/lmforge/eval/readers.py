"""Task readers: MMLU CSVs, ARC / HellaSwag / GSM8K JSONL, user task specs, and a built-in task.

A task is named by a string, so configs and the CLI can list tasks:

    builtin                     sentence-ending cloze built from the run's validation text
    mmlu:PATH                   MMLU CSV file or folder of <subject>_<split>.csv (letters A-D, as
                                the harness scores it); mmlu_cloze:PATH scores the answer texts.
                                The standard dev/ + test/ layout evaluates test, shots = the first
                                k dev items of the subject
    arc:PATH                    ARC JSONL: HF's {question, choices: {text, label}, answerKey}, AI2's
                                {question: {stem, choices}, answerKey}, or {question, options:
                                [{label, text}], answer}
    hellaswag:PATH              HellaSwag JSONL (ctx or ctx_a/ctx_b, activity_label, endings, label)
    gsm8k:PATH                  GSM8K JSONL file, or a folder (test*.jsonl items, train.jsonl shots)

A missing field names the shapes a reader accepts in its error.
    PATH.yaml | PATH.json       a task spec (below)
    PATH.jsonl                  items only: multiple choice if they have `choices`, else generative

A task spec lets a user add a task without code (YAML or JSON)::

    name: capitals
    type: multiple_choice            # or: generate
    data: capitals.jsonl             # JSONL / JSON array / CSV, relative to the spec (or inline `examples:`)
    fewshot_data: capitals_dev.jsonl # optional; default: the other items
    prompt: "Q: What is the capital of {country}?\\nA:"   # str.format over the item's fields
    choices: options                 # field holding the list, or a list of templates ["{a}", "{b}"]
    answer: label                    # field: an index, a label (A, B, ... or `labels:`), else the text
                                     # of a choice (an index wins: numeric choices stay unambiguous)
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
from typing import Any

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


_SPLIT = re.compile(r"_(dev|val|test|train)$")


def _split_of(f: Path) -> str | None:
    m = _SPLIT.search(f.stem)
    return m.group(1) if m else None


def _mmlu_files(path: Path) -> tuple[list[Path], list[Path]]:
    """(files to evaluate, few-shot files). The standard layout (`dev/`, `val/`, `test/` folders of
    `<subject>_<split>.csv`, or those files side by side) evaluates `test` and takes the shots from
    `dev`, as the harness does; pointing at one split's folder or file takes the shots from the
    sibling `dev` files when they exist. Anything else is evaluated whole (shots: other items)."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(path.glob("*.csv"))
        if not files and (path / "test").is_dir():
            files = sorted((path / "test").glob("*.csv"))
        elif not files:
            files = sorted(path.glob("*/*.csv"))
        if not files:
            raise DataError(f"{path}: no MMLU *.csv files in this folder")
    else:
        raise DataError(f"{path}: no such file or folder")
    splits = {_split_of(f) for f in files}
    if "test" in splits and len(splits) > 1:  # test and dev (and val) files side by side
        files = [f for f in files if _split_of(f) == "test"]
    if {_split_of(f) for f in files} == {"dev"}:
        return files, []
    shots = []
    for f in files:
        subject = _SPLIT.sub("", f.stem)
        for cand in (f.parent / f"{subject}_dev.csv", f.parent.parent / "dev" / f"{subject}_dev.csv"):
            if cand.is_file() and cand != f:
                shots.append(cand)
                break
    return files, shots


def _mmlu_rows(f: Path, style: str, problems: Problems, split_tag: str = "") -> list[Doc]:
    """The items of one MMLU CSV: header question,choice0..3,answer (0-based index) or the original
    headerless rows (question, A, B, C, D, letter)."""
    subject = _SPLIT.sub("", f.stem)
    desc = (
        f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    )
    rows = list(csv.reader(io.StringIO(read_text(f))))
    start = 1 if rows and [c.strip().lower() for c in rows[0]] == MMLU_HEADER else 0
    docs = []
    for n, row in enumerate(rows[start:], start + 1):
        if not row or not any(c.strip() for c in row):
            continue
        try:
            if len(row) != 6:
                raise BadItem(
                    "wrong_column_count", f"expected 6 columns (question, 4 choices, answer), got {len(row)}"
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
            problems(f"{f}:{n}", b.reason, b.detail)
            continue
        if style == "letters":
            query = (
                q.strip() + "\n" + "".join(f"{LETTERS[j]}. {c}\n" for j, c in enumerate(choices)) + "Answer:"
            )
            shown = list(LETTERS[:4])
        else:
            query, shown = f"Question: {q.strip()}\nAnswer:", choices
        docs.append(Doc(query, shown, gold, id=f"{subject}/{split_tag}{n}", group=subject, description=desc))
    return docs


def read_mmlu(path: str | Path, *, style: str = "letters", on_error: str = "raise") -> Task:
    """MMLU (see `_mmlu_files` for the layouts). Few-shot examples come from the same subject: the
    first k of its dev items, in file order, when there are dev files (the standard protocol),
    else drawn from the subject's other items."""
    path = Path(path)
    problems = Problems(on_error)
    eval_files, shot_files = _mmlu_files(path)
    docs = [d for f in eval_files for d in _mmlu_rows(f, style, problems)]
    if not docs:
        raise DataError(f"{path}: no usable MMLU rows (skipped: {dict(problems.counts)})")
    shots = [d for f in shot_files for d in _mmlu_rows(f, style, Problems("skip"), "dev/")]
    return make_task(
        "mmlu" if style == "letters" else "mmlu_cloze",
        "multiple_choice",
        docs,
        problems,
        path,
        fewshot_docs=shots or None,
        fewshot_sampler="first_n" if shots else "random",
    )


# ----------------------------------------------------------------------------- ARC
ARC_SHAPES = (
    "ARC items look like {question, choices: {text: [...], label: [...]}, answerKey} (Hugging Face "
    "ai2_arc), {question: {stem, choices: [{label, text}, ...]}, answerKey} (AI2's JSONL), or "
    "{question, options: [{label, text}, ...] | [text, ...], answer: label | index}"
)


def _arc_choices(rec: dict) -> tuple[Any, Any, Any]:
    """(question text, choice texts, labels) from any of the ARC shapes."""
    q = need(rec, "question")
    if isinstance(q, dict):  # AI2's original JSONL: the choices sit inside the question
        q, ch = need(q, "stem", "question.stem"), q.get("choices")
    else:
        ch = rec.get("choices", rec.get("options"))
    if ch is None:
        raise BadItem("missing_choices", "field 'choices' (or 'options') is missing")
    if isinstance(ch, dict):
        return q, ch.get("text"), ch.get("label")
    if isinstance(ch, list) and ch and all(isinstance(c, dict) for c in ch):
        texts = [c.get("text", c.get("content")) for c in ch]
        labels = [c.get("label", c.get("key")) for c in ch]
        return q, texts, None if any(x is None for x in labels) else labels
    return q, ch, None


def _arc_doc(rec: dict, where: str) -> Doc:
    q, texts, labels = _arc_choices(rec)
    texts = check_choices(texts)
    labels = [str(x).strip() for x in (labels or LETTERS[: len(texts)])]
    if len(labels) != len(texts):
        raise BadItem("label_count", f"{len(labels)} labels for {len(texts)} choices")
    key = rec.get("answerKey", rec.get("answer", rec.get("label")))
    if key is None or str(key).strip() == "":
        raise BadItem("missing_answer", "field 'answerKey' (or 'answer') is missing")
    if str(key).strip() in labels:
        gold = labels.index(str(key).strip())
    elif isinstance(key, int) and not isinstance(key, bool):
        gold = check_index(key, len(texts))
    else:
        raise BadItem("answer_not_in_labels", f"answerKey {key!r} is not one of the labels {labels}")
    return Doc(f"Question: {str(q).strip()}\nAnswer:", texts, gold, id=str(rec.get("id", "")))


def read_arc(path: str | Path, *, on_error: str = "raise") -> Task:
    p = Problems(on_error)
    path = Path(path)
    return make_task("arc", "multiple_choice", read_items(path, p, _arc_doc, ARC_SHAPES), p, path)


# ----------------------------------------------------------------------------- HellaSwag
def hellaswag_preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


HELLASWAG_SHAPES = (
    "HellaSwag items look like {ctx (or ctx_a + ctx_b), activity_label (optional), endings: [4 "
    "strings], label: index} (Rowan Zellers' JSONL and Hugging Face hellaswag)"
)


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
    docs = read_items(path, p, _hellaswag_doc, HELLASWAG_SHAPES)
    return make_task("hellaswag", "multiple_choice", docs, p, path)


# ----------------------------------------------------------------------------- GSM8K
GSM8K_SHAPES = (
    "GSM8K items look like {question, answer: 'worked solution ... #### 72'} (OpenAI's JSONL and "
    "Hugging Face gsm8k), or {question, answer: 72} with a bare final number"
)
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def _gsm8k_doc(rec: dict, where: str) -> Doc:
    q = str(need(rec, "question")).strip()
    sol = str(need(rec, "answer")).strip()
    if "####" not in sol:
        if not _NUMBER.fullmatch(sol):
            raise BadItem("missing_answer", "answer has no '#### <number>' final answer and is not a number")
        return Doc(f"Question: {q}\nAnswer:", target=f"#### {sol}", answer=sol.replace(",", ""))
    final = sol.rsplit("####", 1)[1].strip().replace(",", "")
    if not final:
        raise BadItem("missing_answer", "nothing after '####'")
    return Doc(f"Question: {q}\nAnswer:", target=sol, answer=final)


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
        docs = [d for f in tests for d in read_items(f, p, _gsm8k_doc, GSM8K_SHAPES)]
        if (path / "train.jsonl").exists():
            shots = read_items(path / "train.jsonl", Problems("skip"), _gsm8k_doc, GSM8K_SHAPES)
    else:
        docs = read_items(path, p, _gsm8k_doc, GSM8K_SHAPES)
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
