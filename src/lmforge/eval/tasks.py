"""Benchmark tasks: items, few-shot prompts, and multiple-choice scoring by log-likelihood.

A `Task` is a list of `Doc`s plus how to prompt them. Readers (`readers.py`) turn MMLU CSVs,
ARC/HellaSwag/GSM8K JSONL and user task specs into Tasks; this module scores multiple-choice
tasks, `generative.py` generative ones, and `evaluate.py` runs a task of either kind.

Multiple choice, as lm-evaluation-harness does it: for each item the prompt is

    description + shot_1 + fewshot_delimiter + ... + shot_k + fewshot_delimiter + query

where a shot is ``query + target_delimiter + answer``, and each choice is scored as the
continuation ``target_delimiter + choice``. Three accuracies come out of the same scores:

- ``acc``: the choice with the highest total log-likelihood;
- ``acc_norm``: highest log-likelihood per *character* of the choice (removes the bias towards
  short answers; the harness's definition);
- ``acc_bytes``: per UTF-8 byte (the same for ASCII; fairer for other scripts).

Few-shot examples are drawn per item from a seeded RNG keyed by (seed, item id), never the item
itself, from the same group when items have one (MMLU subjects) -- so the prompt of an item does
not depend on which other items are evaluated or in what order. With `fewshot_sampler="first_n"`
(MMLU with its dev split, as the harness does) they are the first k of the group's few-shot pool.

Items that cannot be scored are counted, never silently dropped: a choice longer than the whole
context is a skip ("continuation_too_long"); a prompt longer than the context is cut from the
left and counted as ``truncated``.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..stats import proportion_summary
from .loglik import Pair, Scorer


@dataclass
class Doc:
    query: str
    choices: list[str] | None = None  # multiple choice: the continuations (without delimiter)
    gold: int | None = None  # index of the correct choice
    target: str | None = None  # text after the query in a few-shot example (generative: reference)
    answer: str | None = None  # generative: the final answer exact match compares
    id: str = ""
    group: str | None = None  # few-shot examples come from the same group
    description: str | None = None  # per-item preamble (overrides the task's)

    @property
    def shot_target(self) -> str:
        if self.target is not None:
            return self.target
        if self.choices is not None and self.gold is not None:
            return self.choices[self.gold]
        return self.answer or ""


@dataclass
class Task:
    name: str
    kind: Literal["multiple_choice", "generate"]
    docs: list[Doc]
    fewshot_docs: list[Doc] | None = None  # None: draw shots from `docs` (never the item itself)
    fewshot_sampler: Literal["random", "first_n"] = "random"  # first_n: the pool's first k, in order
    num_fewshot: int = 0
    seed: int = 1234
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    # generation
    until: list[str] = field(default_factory=lambda: ["\n\n"])
    max_new_tokens: int = 128
    extract: str = "text"  # text | number | regex:<pattern>
    source: str = ""
    skipped: Counter = field(default_factory=Counter)  # items the reader could not use, by reason

    def prompt(self, i: int, num_fewshot: int | None = None) -> str:
        doc = self.docs[i]
        k = self.num_fewshot if num_fewshot is None else num_fewshot
        desc = doc.description if doc.description is not None else self.description
        shots = self.fewshot(i, k)
        parts = [s.query + self.target_delimiter + s.shot_target for s in shots]
        return desc + "".join(p + self.fewshot_delimiter for p in parts) + doc.query

    def fewshot(self, i: int, k: int) -> list[Doc]:
        if k <= 0:
            return []
        doc = self.docs[i]
        pool = self.fewshot_docs if self.fewshot_docs is not None else self.docs
        cand = [
            d
            for d in pool
            if d is not doc and (not doc.id or d.id != doc.id) and (doc.group is None or d.group == doc.group)
        ]
        if self.fewshot_sampler == "first_n":
            return cand[:k]
        rng = random.Random(f"{self.seed}:{self.name}:{doc.id or i}")
        return rng.sample(cand, min(k, len(cand)))

    @property
    def chance(self) -> float:
        n = [len(d.choices) for d in self.docs if d.choices]
        return float(np.mean([1.0 / c for c in n])) if n else float("nan")


def _choices(doc: Doc) -> list[str]:
    """A multiple-choice item's continuations (the readers never build one without them)."""
    assert doc.choices is not None, f"multiple-choice item {doc.id!r} has no choices"
    return doc.choices


def evaluate_multiple_choice(
    scorer: Scorer,
    task: Task,
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    keep_predictions: bool = False,
) -> dict:
    """acc / acc_norm / acc_bytes (each with a 95% Wilson interval), chance level, counts."""
    t0 = time.time()
    n_docs = len(task.docs) if limit is None else min(limit, len(task.docs))
    skipped: Counter = Counter(task.skipped)
    pairs: list[Pair] = []
    spans: list[tuple[int, int]] = []
    kept: list[int] = []
    truncated = 0
    for i in range(n_docs):
        doc = task.docs[i]
        prompt = task.prompt(i, num_fewshot)
        ps = [scorer.encode_pair(prompt, task.target_delimiter + c) for c in _choices(doc)]
        if not all(scorer.fits(p) for p in ps):
            skipped["empty_choice" if any(not p[1] for p in ps) else "continuation_too_long"] += 1
            continue
        if any(len(c) + len(x) > scorer.max_len + 1 for c, x in ps):
            truncated += 1
        spans.append((len(pairs), len(ps)))
        pairs += ps
        kept.append(i)
    scores = scorer.score(pairs)
    acc, acc_norm, acc_bytes, preds = [], [], [], []
    for i, (start, n) in zip(kept, spans):
        doc = task.docs[i]
        lls = np.array([s[0] for s in scores[start : start + n]])
        chars = np.array([float(len(c)) for c in _choices(doc)])
        nbytes = np.array([float(len(c.encode("utf-8"))) for c in _choices(doc)])
        p, pn, pb = int(np.argmax(lls)), int(np.argmax(lls / chars)), int(np.argmax(lls / nbytes))
        acc.append(float(p == doc.gold))
        acc_norm.append(float(pn == doc.gold))
        acc_bytes.append(float(pb == doc.gold))
        if keep_predictions:
            preds.append(
                {
                    "id": doc.id,
                    "gold": doc.gold,
                    "pred": p,
                    "pred_norm": pn,
                    "loglikelihoods": [round(float(x), 5) for x in lls],
                }
            )
    seconds = time.time() - t0
    out = {
        "task": task.name,
        "kind": "multiple_choice",
        "n": len(kept),
        "num_fewshot": task.num_fewshot if num_fewshot is None else num_fewshot,
        "acc": proportion_summary(sum(acc), len(acc)),
        "acc_norm": proportion_summary(sum(acc_norm), len(acc_norm)),
        "acc_bytes": proportion_summary(sum(acc_bytes), len(acc_bytes)),
        "chance": float(np.mean([1.0 / len(_choices(task.docs[i])) for i in kept])) if kept else float("nan"),
        "skipped": dict(skipped),
        "truncated": truncated,
        "requests": len(pairs),
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(pairs) / max(seconds, 1e-9), 1),
        "source": task.source,
    }
    if keep_predictions:
        out["predictions"] = preds
    return out
