"""Contamination tests: did the eval set leak into training?

1. **N-gram overlap** (you have the training data): the GPT-3 / Llama-2 style check. Text is
   normalised and split into words the way the data stage's decontamination step does
   (`data.steps.decontam.words_of`, shared so the two agree); an eval item's n-grams are hashed
   and every training document is streamed past them. Per item we report the fraction of its
   n-grams seen in training; an item is *contaminated* when that fraction reaches ``threshold``
   (default: any shared n-gram). Items shorter than n words are matched whole if they have at
   least ``min_words`` words, else counted as too short to judge.

2. **Permutation test** (you have only the model): Oren et al., "Proving Test Set Contamination
   in Black Box Language Models" (ICLR 2024). Benchmarks are published in a fixed order; a model
   that saw the benchmark verbatim assigns the *canonical order* of its examples a higher
   likelihood than shuffled orders, while for a model that never saw it every order is
   exchangeable. The sharded test: split the examples (in canonical order) into shards; for each
   shard compute the log-likelihood of the canonical concatenation and the mean over
   ``n_permutations`` random orders; a one-sided t-test of the per-shard differences against 0
   gives the p-value. Small p = evidence of contamination; a large p is *not* proof of
   cleanliness (the test only sees verbatim, ordered exposure).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..data.readers import iter_documents
from ..data.shards import load_shard
from ..data.steps.decontam import ngram_hashes, words_of
from ..errors import DataError
from ..tokenizer import LMTokenizer
from .loglik import Scorer
from .perplexity import shard_documents
from .tasks import Task


# ----------------------------------------------------------------------------- items of a task
def task_texts(task: Task) -> list[str]:
    """The text an eval item leaks through: its prompt and its correct answer."""
    out = []
    for d in task.docs:
        ans = (
            d.choices[d.gold]
            if d.choices is not None and d.gold is not None
            else (d.target or d.answer or "")
        )
        out.append(f"{d.query} {ans}".strip())
    return out


# ----------------------------------------------------------------------------- n-gram overlap
def ngram_overlap(
    train_texts: Iterable[str],
    eval_items: Sequence[str],
    *,
    n: int = 13,
    min_words: int = 8,
    threshold: float = 0.0,
    ids: Sequence[str] | None = None,
    max_examples: int = 20,
) -> dict:
    """Overlap of each eval item's word n-grams with a training corpus (streamed once)."""
    item_grams: list[set[int]] = []
    owners: dict[int, list[int]] = defaultdict(list)
    too_short = 0
    for i, text in enumerate(eval_items):
        words = words_of(text)
        if len(words) >= n:
            grams = set(ngram_hashes(words, n))
        elif len(words) >= min_words:
            grams = set(ngram_hashes(words, len(words)))
        else:
            grams = set()
            too_short += 1
        item_grams.append(grams)
        for h in grams:
            owners[h].append(i)
    lengths = sorted({min(n, len(words_of(t))) for t in eval_items if len(words_of(t)) >= min_words})
    seen: set[int] = set()
    first_doc: dict[int, int] = {}
    n_docs = 0
    for d, text in enumerate(train_texts):
        n_docs += 1
        words = words_of(text)
        for k in lengths:
            for h in ngram_hashes(words, k):
                if h in owners and h not in seen:
                    seen.add(h)
                    for i in owners[h]:
                        first_doc.setdefault(i, d)
    frac = [len(g & seen) / len(g) if g else 0.0 for g in item_grams]
    judged = [i for i, g in enumerate(item_grams) if g]
    flagged = [i for i in judged if frac[i] > 0 and frac[i] >= threshold]
    name = (lambda i: ids[i]) if ids is not None else (lambda i: str(i))
    examples = sorted(flagged, key=lambda i: -frac[i])[:max_examples]
    return {
        "n": n,
        "threshold": threshold,
        "items": len(eval_items),
        "judged": len(judged),
        "too_short": too_short,
        "contaminated": len(flagged),
        "contaminated_fraction": len(flagged) / len(judged) if judged else 0.0,
        "mean_overlap": float(np.mean([frac[i] for i in judged])) if judged else 0.0,
        "train_docs": n_docs,
        "examples": [
            {
                "item": name(i),
                "overlap": round(frac[i], 4),
                "first_train_doc": first_doc.get(i),
                "text": eval_items[i][:200],
            }
            for i in examples
        ],
        "per_item": [round(frac[i], 4) for i in range(len(eval_items))],
    }


def iter_corpus(spec: str | Path) -> Iterable[str]:
    """Training texts from a file/folder/glob the data readers understand, `builtin`, or a
    tokenizer-stage folder (token shards decoded back to text: works whatever the data format)."""
    p = Path(spec)
    if p.is_dir() and (p / "train.json").exists() and (p / "tokenizer.json").exists():
        return shard_documents(load_shard(p, "train"), LMTokenizer.load(p), max_docs=10**12)
    return (d.text for d in iter_documents([str(spec)]))


# ----------------------------------------------------------------------------- permutation test
def permutation_test(
    scorer: Scorer,
    examples: Sequence[str],
    *,
    shard_size: int | None = None,
    n_shards: int | None = None,
    n_permutations: int = 20,
    separator: str = "\n",
    seed: int = 0,
    context_len: int = 1,
) -> dict:
    """Oren et al.'s sharded likelihood comparison: p-value of "the canonical order is more likely
    than random orders" (one-sided t-test over shards)."""
    from scipy import stats

    ex = [e for e in examples if e and e.strip()]
    if len(ex) < 4:
        raise DataError(f"permutation test: {len(ex)} non-empty examples; need at least 4 (2 shards of 2)")
    if shard_size is None:
        n_shards = n_shards or max(2, min(50, len(ex) // 4))
        shard_size = max(2, len(ex) // n_shards)
    if shard_size < 2:
        raise DataError("permutation test: shard_size must be >= 2 (one example has only one order)")
    shards = [ex[i : i + shard_size] for i in range(0, len(ex) - shard_size + 1, shard_size)]
    if len(shards) < 2:
        raise DataError(
            f"permutation test: {len(ex)} examples make {len(shards)} shard(s) of {shard_size}; "
            f"need >= 2 shards for a t-test (lower shard_size)"
        )
    rng = random.Random(seed)
    docs, owner = [], []
    for s, shard in enumerate(shards):
        docs.append(separator.join(shard))
        owner.append((s, True))
        for _ in range(n_permutations):
            perm = shard[:]
            for _ in range(100):  # a shard of identical examples has only one order
                rng.shuffle(perm)
                if perm != shard:
                    break
            docs.append(separator.join(perm))
            owner.append((s, False))
    lls = scorer.loglikelihood_rolling(docs, context_len)
    canon = np.zeros(len(shards))
    perms: list[list[float]] = [[] for _ in shards]
    for (s, is_canon), ll in zip(owner, lls):
        if is_canon:
            canon[s] = ll
        else:
            perms[s].append(ll)
    diffs = canon - np.array([np.mean(p) for p in perms])
    quantile = np.array([np.mean(np.array(p) < c) for p, c in zip(perms, canon)])
    t = stats.ttest_1samp(diffs, 0.0, alternative="greater")
    p = float(t.pvalue) if np.isfinite(t.pvalue) else 1.0
    return {
        "p_value": p,
        "t_statistic": float(t.statistic) if np.isfinite(t.statistic) else 0.0,
        "shards": len(shards),
        "shard_size": shard_size,
        "n_permutations": n_permutations,
        "examples_used": len(shards) * shard_size,
        "mean_logprob_gain": float(diffs.mean()),
        "canonical_rank_mean": float(quantile.mean()),
        "per_shard_gain": [round(float(d), 4) for d in diffs],
    }
