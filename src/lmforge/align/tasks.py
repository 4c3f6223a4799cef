"""Prompts with verifiable answers for RL: built-in arithmetic word problems, GSM8K, JSONL.

RL needs prompts, not demonstrations; with a checkable answer the reward is exact, so "did RL
help?" is answered by held-out exact-match accuracy rather than by another model's opinion.

* **Built-in arithmetic** (`builtin`, `arithmetic`): one-step word problems ("Tom has 3 apples
  and buys 4 more. How many apples does Tom have now?") with operands 1..`max_operand`, made
  deterministically from a fixed seed (not the run seed: the problem set is the same for every
  run, so held-out accuracy is comparable across runs). Small numbers keep them within reach
  of the tiny CPU model after a short SFT; `arithmetic_sft_records` gives worked answers in
  the style GRPO then rewards ("3 + 4 = 7. The answer is 7.").
  Split: a problem is held out when a hash of its text says so (`split_train_val`), so the two
  sets never share a question.
* **Built-in questions** (`questions`): the stdlib questions of the built-in preference pairs,
  no answers; open-ended prompts for PPO against the reward model (the default pipeline's `rl`).
* **JSONL** records, one per line, in any of these shapes (the answer may be omitted when the
  rewards do not need one, e.g. a reward model):
  `{"prompt": str | messages, "answer": ...}` (lmforge/TRL), `{"question", "answer"}` (GSM8K:
  the reference is the number after `####`), `{"messages": [...], "answer": ...}` (prompt = the
  messages up to the last user turn). A record that fits none is a `DataError` naming file:line.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..chat import CHAT_ROLES
from ..data.builtin import split_by_key, split_train_val
from ..errors import DataError

BUILTIN_SOURCES = ("builtin", "arithmetic")
TASK_SEED = 20261122  # fixed: the built-in problem set does not change with the run seed


@dataclass(frozen=True)
class PromptItem:
    """One RL prompt: the conversation to continue, and the reference answer if there is one."""

    messages: tuple[tuple[str, str], ...]  # ((role, content), ...), hashable
    answer: str | None
    where: str  # file:line or builtin:index, for error messages

    @property
    def chat(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.messages]

    @property
    def text(self) -> str:
        """The last user message: what reward functions see as `prompt`."""
        return next((c for r, c in reversed(self.messages) if r == "user"), self.messages[-1][1])


def _item(messages: Sequence[dict], answer, where: str) -> PromptItem:
    return PromptItem(
        tuple((m["role"], m["content"]) for m in messages), None if answer is None else str(answer), where
    )


# ----------------------------------------------------------------------------- arithmetic
NAMES = ("Tom", "Ana", "Sam", "Mia", "Leo", "Eva", "Ben", "Zoe", "Max", "Ivy")
ITEMS = ("apples", "pens", "books", "coins", "cards", "shells", "stamps", "eggs")


def _problem(rng: random.Random, max_operand: int, ops: Sequence[str]) -> tuple[str, int, str]:
    """(question, answer, worked solution) for one random problem."""
    name, item, op = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(list(ops))
    if op == "add":
        a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
        q = rng.choice(
            (
                f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
                f"{name} finds {a} {item} in the morning and {b} {item} in the afternoon. "
                f"How many {item} did {name} find?",
            )
        )
        return q, a + b, f"{a} + {b} = {a + b}"
    if op == "sub":
        a = rng.randint(2, max_operand)
        b = rng.randint(1, a - 1)
        q = rng.choice(
            (
                f"{name} has {a} {item} and gives {b} to a friend. How many {item} does {name} have left?",
                f"There are {a} {item} on a table. {name} takes {b}. How many {item} are still on the table?",
            )
        )
        return q, a - b, f"{a} - {b} = {a - b}"
    if op == "mul":
        a, b = rng.randint(2, max(2, min(max_operand, 5))), rng.randint(2, max(2, min(max_operand, 5)))
        q = f"{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} have?"
        return q, a * b, f"{a} * {b} = {a * b}"
    raise DataError(f"arithmetic: unknown operation {op!r}; use add, sub, mul")


def arithmetic_problems(
    n: int = 2000, *, max_operand: int = 9, ops: Sequence[str] = ("add", "sub"), seed: int = TASK_SEED
) -> list[dict]:
    """`n` distinct problems `{"question", "answer", "solution"}`, the same on every call."""
    rng = random.Random(seed)
    seen: set = set()
    out: list[dict] = []
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        q, a, work = _problem(rng, max_operand, ops)
        if q in seen:
            continue
        seen.add(q)
        out.append({"question": q, "answer": str(a), "solution": f"{work}. The answer is {a}."})
    return out


def arithmetic_split(n: int = 2000, val_fraction: float = 0.1, **kw) -> tuple[list[dict], list[dict]]:
    """(train, held-out) problems; membership depends only on the question text."""
    probs = arithmetic_problems(n, **kw)
    by_q = {p["question"]: p for p in probs}
    tr, va = split_train_val([p["question"] for p in probs], val_fraction, TASK_SEED)
    return [by_q[q] for q in tr], [by_q[q] for q in va]


def arithmetic_sft_records(problems: Iterable[dict]) -> list[dict]:
    """prompt/completion records (for `sft.data=FILE`) teaching the answer format GRPO rewards."""
    return [{"prompt": p["question"], "completion": p["solution"]} for p in problems]


def builtin_prompts(split: str, val_fraction: float = 0.1, n: int = 2000) -> list[PromptItem]:
    tr, va = arithmetic_split(n, val_fraction)
    probs = tr if split == "train" else va
    return [
        _item([{"role": "user", "content": p["question"]}], p["answer"], f"builtin:arithmetic:{split}:{i}")
        for i, p in enumerate(probs)
    ]


# ----------------------------------------------------------------------------- JSONL / GSM8K
def gsm8k_answer(answer: str) -> str:
    """The reference number of a GSM8K answer ("... #### 72" -> "72")."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "") if "####" in answer else answer.strip()


def record_to_prompt(rec: object, where: str) -> PromptItem:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    answer = rec.get("answer", rec.get("solution"))
    if "question" in rec and "prompt" not in rec:  # GSM8K
        q = rec["question"]
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{where}: 'question' must be a non-empty string")
        if isinstance(answer, str):
            answer = gsm8k_answer(answer)
        return _item([{"role": "user", "content": q}], answer, where)
    if "prompt" in rec:
        p = rec["prompt"]
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p
    elif "messages" in rec:
        msgs = rec["messages"]
        if (
            isinstance(msgs, list)
            and msgs
            and isinstance(msgs[-1], dict)
            and msgs[-1].get("role") == "assistant"
        ):
            if answer is None:
                answer = msgs[-1].get("content")
            msgs = msgs[:-1]
    else:
        raise DataError(
            f"{where}: an RL prompt record needs 'prompt', 'question' or 'messages' (keys: {sorted(rec)[:6]})"
        )
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: the prompt must be a string or a non-empty list of messages")
    for i, m in enumerate(msgs):
        if (
            not isinstance(m, dict)
            or m.get("role") not in CHAT_ROLES
            or not isinstance(m.get("content"), str)
            or not m["content"].strip()
        ):
            raise DataError(f"{where}: prompt message {i} needs a role in {CHAT_ROLES} and non-empty content")
    if msgs[-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt ends with an assistant turn; RL continues after a user turn")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise DataError(f"{where}: 'answer' must be a string or number")
    return _item(msgs, answer, where)


def read_prompt_file(path: str | Path) -> list[PromptItem]:
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"{p}: no such file; give a JSONL file of prompt/answer (or GSM8K question/answer) "
            f"records, 'builtin' (arithmetic) or 'questions' (stdlib questions)"
        )
    out = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
            out.append(record_to_prompt(rec, f"{p}:{n}"))
    if not out:
        raise DataError(f"{p}: no records")
    return out


def question_prompts(max_examples: int | None = None) -> list[PromptItem]:
    """The built-in stdlib questions (the prompts of the built-in preference pairs), without
    answers: open-ended prompts for PPO against a reward model."""
    from .preference import builtin_preferences

    return [
        _item(p["prompt"], None, f"builtin:questions:{p['source']}")
        for p in builtin_preferences(max_examples=max_examples)
    ]


def _source(src: str, split: str, val_fraction: float, seed: int) -> list[PromptItem]:
    """Prompts of one source; split = train | val (a hashed split of the source) | all."""
    if src in BUILTIN_SOURCES:
        return builtin_prompts("val" if split == "val" else "train", val_fraction)
    recs = question_prompts() if src == "questions" else read_prompt_file(src)
    if split == "all":
        return recs
    train, val = split_by_key(recs, [json.dumps([r.messages, r.answer]) for r in recs], val_fraction, seed)
    return val if split == "val" else train


def load_prompt_sets(
    data: Sequence[str], val_data: Sequence[str] | None, val_fraction: float, seed: int
) -> tuple[list[PromptItem], list[PromptItem]]:
    """(train, held-out) prompts from the config's `data` / `val_data` sources. Without
    `val_data` every source is split by hashing; with it, files are used whole on their side
    (built-in arithmetic always keeps its own split, so `data` and `val_data` can both say
    `builtin`)."""
    if val_data:
        train = [
            p
            for s in data
            for p in _source(s, "train" if s in BUILTIN_SOURCES else "all", val_fraction, seed)
        ]
        val = [
            p
            for s in val_data
            for p in _source(s, "val" if s in BUILTIN_SOURCES else "all", val_fraction, seed)
        ]
    else:
        train = [p for s in data for p in _source(s, "train", val_fraction, seed)]
        val = [p for s in data for p in _source(s, "val", val_fraction, seed)]
    return train, val
