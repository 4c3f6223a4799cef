"""Reward-hacking signals: numbers that move when a policy games its reward instead of getting
better, and the warning that fires when they do.

A reward model (or any learned score) can be pushed up by output that is worse: repeated
phrases, answers that never stop, text the starting model finds unlikely. A rising reward alone
says nothing about which happened, so every rollout and every held-out evaluation also reports
* **diversity**: distinct-n (Li et al. 2016), distinct n-grams / all n-grams over the
  completions; it falls towards 0 as samples repeat themselves or each other;
* **truncation**: the share of completions that hit max_new_tokens without stopping;
* **held-out likelihood**: the per-token NLL, under the current policy, of the starting model's
  own greedy answers to the held-out prompts (what SFT taught it to say); it rises as the policy
  forgets how it used to answer.

`hacking_warning` compares two such records: the reward rose while diversity fell below
`DIVERSITY_FLOOR` of its starting value or the NLL rose by more than `NLL_RISE` nats per token
(ln 2: the old answers' tokens are half as likely on average).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

DIVERSITY_FLOOR = 0.5
NLL_RISE = math.log(2.0)


def distinct_n(seqs: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams / all n-grams over every sequence (token ids); NaN when none has n tokens."""
    seen: set[tuple[int, ...]] = set()
    total = 0
    for s in seqs:
        s = list(s)
        for i in range(len(s) - n + 1):
            seen.add(tuple(s[i : i + n]))
            total += 1
    return len(seen) / total if total else float("nan")


def _finite(*xs: object) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def hacking_warning(
    start: dict, now: dict, *, reward: str, distinct: str, nll: str | None = None, where: str = ""
) -> str | None:
    """A warning when `now[reward]` exceeds `start[reward]` while `now[distinct]` fell below
    DIVERSITY_FLOOR x its start or `now[nll]` rose by more than NLL_RISE; else None."""
    r0: Any = start.get(reward)
    r1: Any = now.get(reward)
    if not _finite(r0, r1) or r1 <= r0:
        return None
    reasons = []
    d0: Any = start.get(distinct)
    d1: Any = now.get(distinct)
    if _finite(d0, d1) and d0 > 0 and d1 < DIVERSITY_FLOOR * d0:
        reasons.append(f"diversity {distinct} fell {d0:.3f} -> {d1:.3f}")
    if nll is not None:
        n0: Any = start.get(nll)
        n1: Any = now.get(nll)
        if _finite(n0, n1) and n1 - n0 > NLL_RISE:
            reasons.append(
                f"held-out NLL of the starting model's answers rose {n0:.3f} -> {n1:.3f} nats/token"
            )
    if not reasons:
        return None
    return (
        f"warning: possible reward hacking{' (' + where + ')' if where else ''}: {reward} rose "
        f"{r0:.3f} -> {r1:.3f} while {' and '.join(reasons)}; read the samples before trusting the "
        f"reward (lower the learning rate or target_kl, raise kl_coef, or fix the reward)"
    )
