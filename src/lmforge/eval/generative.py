"""Generative tasks: few-shot prompts, greedy or sampled completions, answer extraction,
exact match, and pass@k from n samples per problem.

Generation runs through the serving engine (`serve.batch.generate_batch`: continuous batching,
at most ``batch_size`` sequences in flight, each prompt's samples sharing one prefill, a seed
per sequence derived from ``seed`` and its index) and stops a sequence at the first stop
*string* (e.g. "\n\n" or "Question:", which are not single tokens) or at EOS / ``<|end|>``; the
completion is cut before the stop string. A prompt that does not leave room for ``max_new_tokens`` in the model's
context is cut from the left and counted as ``truncated``.

Answer extraction (``Task.extract``):

- ``number`` (GSM8K): the number after ``####`` if the model wrote one (``exact_match_strict``),
  else the last number in the completion (``exact_match``, the flexible match); commas, ``$``
  and a trailing period are ignored and numbers compare by value (``18.0 == 18``);
- ``text``: the first line, stripped and lower-cased;
- ``regex:PATTERN``: the first capture group (or the whole match) of the first match.

pass@k uses the unbiased estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)`` per problem
averaged over problems, from n >= k samples drawn at ``temperature`` > 0.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError
from ..serve.batch import generate_batch, mix_seed
from ..serve.request import GenParams
from ..stats import mean_stderr, pass_at_k, wilson
from .tasks import Task

_NUM = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_STRICT = re.compile(r"####\s*(-?\$?\d[\d,]*(?:\.\d+)?)")
MAX_STOPS = 8  # stop strings the engine watches (GenParams); the rest are cut afterwards


# ----------------------------------------------------------------------------- generation
def generate_texts(
    model,
    tok,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    until: Sequence[str] = (),
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    add_bos: bool = True,
) -> tuple[list[str], dict]:
    """Completions of `prompts` (cut at the first stop string) and counts (truncated prompts)."""
    ctx = model.cfg.max_seq_len
    if max_new_tokens >= ctx:
        raise ConfigError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
            f"{ctx}-token context; lower it"
        )
    budget = ctx - max_new_tokens
    bos = [tok.bos_id] if add_bos and tok.bos_id is not None else []
    encoded, truncated = [], 0
    for p in prompts:
        ids = bos + tok.encode(p)
        if len(ids) > budget:
            ids, truncated = ids[-budget:], truncated + 1
        encoded.append(ids or bos or [tok.eos_id or 0])
    stops = [t for t in (tok.eos_id, tok.end_id) if t is not None]
    until = [u for u in until if u]
    params = [
        GenParams(
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p or 1.0,
            stop=until[:MAX_STOPS],
            stop_token_ids=stops,
            seed=mix_seed(seed, i),
        )
        for i in range(len(prompts))
    ]
    comps = generate_batch(model, encoded, params, tokenizer=tok, stop_token_ids=stops, max_batch=batch_size)
    # the text is decoded again from the ids, special tokens kept, and cut at the first stop string
    out = [cut_at_stop(tok.decode(c.token_ids), until) for c in comps]
    return out, {"truncated": truncated}


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    cut = len(text)
    for u in until:
        j = text.find(u)
        if j != -1:
            cut = min(cut, j)
    return text[:cut]


# ----------------------------------------------------------------------------- answers
def _norm_number(s: str) -> float | None:
    s = s.replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(s)
    except ValueError:
        return None


def extract_answer(text: str, mode: str = "text") -> str | None:
    """The answer a completion commits to (None when it gives none)."""
    if mode == "number":
        m = _STRICT.search(text)
        if m:
            return m.group(1)
        nums = _NUM.findall(text)
        return nums[-1] if nums else None
    if mode.startswith("regex:"):
        m = re.search(mode[len("regex:") :], text)
        if not m:
            return None
        return m.group(1) if m.groups() else m.group(0)
    line = text.strip().split("\n", 1)[0]
    return line or None


def strict_number(text: str) -> str | None:
    m = _STRICT.search(text)
    return m.group(1) if m else None


def answers_match(pred: str | None, gold: str | None, mode: str = "text") -> bool:
    if pred is None or gold is None:
        return False
    if mode == "number":
        a, b = _norm_number(pred.strip()), _norm_number(gold.strip())
        return a is not None and b is not None and math.isclose(a, b, rel_tol=0, abs_tol=1e-6)
    return pred.strip().rstrip(".").lower() == gold.strip().rstrip(".").lower()


# ----------------------------------------------------------------------------- evaluation
def evaluate_generative(
    model,
    tok,
    task: Task,
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    n_samples: int = 1,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    ks: Sequence[int] = (1,),
    seed: int = 0,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    keep_predictions: bool = False,
) -> dict:
    """exact_match (first sample; greedy at temperature 0) with a 95% interval, and pass@k for
    each k <= n_samples when sampling."""
    if n_samples < 1:
        raise ConfigError(f"n_samples must be >= 1, got {n_samples}")
    if temperature == 0 and n_samples > 1:
        raise ConfigError(
            "n_samples > 1 with temperature 0 draws the same greedy answer n times; "
            "set a temperature > 0 for pass@k"
        )
    bad = [k for k in ks if k > n_samples]
    if bad:
        raise ConfigError(f"pass@{bad[0]} needs n_samples >= {bad[0]} (n_samples={n_samples})")
    t0 = time.time()
    n_docs = len(task.docs) if limit is None else min(limit, len(task.docs))
    docs = task.docs[:n_docs]
    prompts = [task.prompt(i, num_fewshot) for i in range(n_docs)]
    flat = [p for p in prompts for _ in range(n_samples)]
    texts, gstats = generate_texts(
        model,
        tok,
        flat,
        max_new_tokens=max_new_tokens or task.max_new_tokens,
        until=task.until,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
    )
    correct, strict, per_problem, preds = [], [], [], []
    for i, doc in enumerate(docs):
        outs = texts[i * n_samples : (i + 1) * n_samples]
        answers = [extract_answer(o, task.extract) for o in outs]
        hits = [answers_match(a, doc.answer, task.extract) for a in answers]
        correct.append(float(hits[0]))
        if task.extract == "number":
            strict.append(float(answers_match(strict_number(outs[0]), doc.answer, "number")))
        per_problem.append(sum(hits))
        if keep_predictions:
            preds.append(
                {
                    "id": doc.id,
                    "answer": doc.answer,
                    "completions": outs,
                    "extracted": answers,
                    "correct": hits,
                }
            )
    n = len(docs)
    out = {
        "task": task.name,
        "kind": "generate",
        "n": n,
        "num_fewshot": task.num_fewshot if num_fewshot is None else num_fewshot,
        "n_samples": n_samples,
        "temperature": temperature,
        "exact_match": _prop(correct),
    }
    if strict:
        out["exact_match_strict"] = _prop(strict)
    if n_samples > 1:
        for k in ks:
            vals = [pass_at_k(n_samples, c, k) for c in per_problem]
            m, se = mean_stderr(vals)
            half = 1.959963984540054 * se if se == se else float("nan")
            out[f"pass@{k}"] = {"value": m, "ci95": [max(0.0, m - half), min(1.0, m + half)]}
    seconds = time.time() - t0
    out.update(
        {
            "skipped": dict(Counter(task.skipped)),
            "truncated": gstats["truncated"],
            "seconds": round(seconds, 3),
            "source": task.source,
        }
    )
    if keep_predictions:
        out["predictions"] = preds
    return out


def _prop(hits: list[float]) -> dict:
    k, n = float(np.sum(hits)) if hits else 0.0, len(hits)
    lo, hi = wilson(k, n)
    return {"value": k / n if n else float("nan"), "ci95": [lo, hi]}
