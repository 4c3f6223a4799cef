"""Pairwise judging: is model A's answer better than model B's, on a set of prompts?

Judges (anything with ``prefer_many([(prompt, first, second), ...]) -> [P(first is better)]``):

- `RewardModelJudge`: scores each answer alone with a reward model -- through
  `align.reward_scoring.RewardScorer`, which renders (prompt, answer) as chat turns exactly as the
  reward stage trains on them (or any Python function) -- and returns sigmoid(r_first - r_second).
- `LMJudge`: asks a judge language model which response is better and compares the likelihood
  of " A" against " B" after the question (no free-text parsing, no refusals to handle).

LM judges prefer whichever answer they read first (or second); `compare` therefore asks twice,
once in each order, and averages P(A better) over the two orders, which cancels a constant
position bias exactly. The bias itself is reported (``first_position_bias``: how much more often
the first-shown answer wins than it should) so a badly biased judge is visible.

The win rate counts a tie as half a win; its 95% interval is Wilson's. For human raters,
`export_sheet` writes the prompts with both answers side by side to CSV or a self-contained HTML
page (answers shown in a random order per item, the key kept in a separate file so raters are
blind to which model is which) and `import_verdicts` reads their verdicts back into the same
summary.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..align.reward_scoring import RewardScorer
from ..errors import DataError
from ..runs import atomic_write_json, atomic_write_text
from ..stats import wilson
from ..tokenizer import render_chat
from .generative import generate_texts
from .loglik import Scorer


class Judge(Protocol):
    def prefer_many(self, items: Sequence[tuple[str, str, str]]) -> list[float]:
        """P(first answer is better) for each (prompt, first, second)."""


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0


class RewardModelJudge:
    """P(first better) = sigmoid(r_first - r_second), each answer scored alone with its prompt.
    `score_many(prompts, answers) -> rewards` is normally a reward model's
    `align.reward_scoring.RewardScorer.score_answers` (the turns rendered as the model was
    trained); `score(prompt, answer) -> float` wraps any Python function."""

    def __init__(
        self,
        score: Callable[[str, str], float] | None = None,
        *,
        score_many: Callable[[list[str], list[str]], list[float]] | None = None,
        mode: str = "function",
    ):
        if (score is None) == (score_many is None):
            raise ValueError("RewardModelJudge needs exactly one of score or score_many")
        if score_many is None:
            assert score is not None
            one = score

            def each(ps: list[str], ans: list[str]) -> list[float]:
                return [float(one(p, a)) for p, a in zip(ps, ans)]

            score_many = each

        self.score_many = score_many
        self.mode = mode

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> RewardModelJudge:
        """A reward model folder (lmforge's or any HF sequence-classification model, num_labels=1)."""
        scorer = RewardScorer.from_dir(path, device)
        return cls(score_many=scorer.score_answers, mode=scorer.mode)

    def prefer_many(self, items):
        pairs = list(dict.fromkeys((p, x) for p, a, b in items for x in (a, b)))
        rewards = self.score_many([p for p, _ in pairs], [x for _, x in pairs])
        r = dict(zip(pairs, rewards))
        return [_sigmoid(r[(p, a)] - r[(p, b)]) for p, a, b in items]


JUDGE_TEMPLATE = (
    "Which response answers the prompt better: more correct, more helpful, clearer?\n\n"
    "Prompt: {prompt}\n\nResponse A: {first}\n\nResponse B: {second}\n\n"
    "The better response is Response"
)


class LMJudge:
    def __init__(
        self,
        model,
        tok,
        *,
        template: str = JUDGE_TEMPLATE,
        labels: tuple[str, str] = (" A", " B"),
        batch_tokens: int = 8192,
    ):
        self.scorer = Scorer(model, tok, batch_tokens=batch_tokens)
        self.template, self.labels = template, labels

    def prefer_many(self, items):
        reqs = []
        for p, a, b in items:
            ctx = self.template.format(prompt=p, first=a, second=b)
            reqs += [(ctx, self.labels[0]), (ctx, self.labels[1])]
        lls = [x[0] for x in self.scorer.loglikelihood(reqs)]
        return [_sigmoid(lls[2 * i] - lls[2 * i + 1]) for i in range(len(items))]


# ----------------------------------------------------------------------------- comparing
def summarize(verdicts: Sequence[str], names: tuple[str, str] = ("A", "B")) -> dict:
    """Win rate of A over B (ties count half) with a 95% Wilson interval."""
    n = len(verdicts)
    wins, losses = verdicts.count("a"), verdicts.count("b")
    ties = n - wins - losses
    lo, hi = wilson(wins + 0.5 * ties, n)
    return {
        "model_a": names[0],
        "model_b": names[1],
        "n": n,
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "win_rate": (wins + 0.5 * ties) / n if n else float("nan"),
        "ci95": [lo, hi],
    }


def compare(
    prompts: Sequence[str],
    answers_a: Sequence[str],
    answers_b: Sequence[str],
    judge: Judge,
    *,
    swap: bool = True,
    tie_margin: float = 0.05,
    names: tuple[str, str] = ("A", "B"),
) -> dict:
    """Judge A against B on every prompt; with `swap`, in both orders to cancel position bias.
    Each item keeps the two answers it judged, so a verdict can be read next to what it judged."""
    if not (len(prompts) == len(answers_a) == len(answers_b)):
        raise DataError(
            f"{len(prompts)} prompts, {len(answers_a)} answers of A, {len(answers_b)} of B: "
            f"one answer per prompt is needed from each model"
        )
    ab = judge.prefer_many(list(zip(prompts, answers_a, answers_b)))
    ba = judge.prefer_many(list(zip(prompts, answers_b, answers_a))) if swap else None
    items: list[dict[str, Any]] = []
    verdicts: list[str] = []
    for i, p in enumerate(prompts):
        pa = (ab[i] + (1.0 - ba[i])) / 2 if ba is not None else ab[i]
        v = "a" if pa > 0.5 + tie_margin else "b" if pa < 0.5 - tie_margin else "tie"
        verdicts.append(v)
        items.append(
            {
                "prompt": p,
                "answer_a": answers_a[i],
                "answer_b": answers_b[i],
                "p_a_better": round(pa, 4),
                "verdict": v,
                "a_first": round(ab[i], 4),
                **({"b_first": round(ba[i], 4)} if ba is not None else {}),
            }
        )
    out = summarize(verdicts, names)
    out["mean_p_a_better"] = sum(x["p_a_better"] for x in items) / len(items) if items else float("nan")
    if ba is not None:
        # P(first wins) averaged over both orders: 0.5 for an unbiased judge
        out["first_position_bias"] = sum((ab[i] + ba[i]) / 2 - 0.5 for i in range(len(items))) / max(
            len(items), 1
        )
    out["swap"] = swap
    out["items"] = items
    return out


def generate_answers(
    model,
    tok,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    chat: bool | None = None,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """Greedy (or sampled) answers; chat-formatted when the tokenizer has lmforge's chat tokens."""
    use_chat = chat if chat is not None else tok.end_id is not None
    if use_chat:
        texts = [render_chat([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
        outs, _ = generate_texts(
            model,
            tok,
            texts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            add_bos=False,
        )
    else:
        outs, _ = generate_texts(
            model, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
        )
    return [o.strip() for o in outs]


# ----------------------------------------------------------------------------- human raters
SHEET_COLUMNS = ["id", "prompt", "response_1", "response_2", "verdict", "comment"]
VERDICTS = {"1": "first", "2": "second", "tie": "tie", "t": "tie", "=": "tie", "": None}


def export_sheet(
    prompts: Sequence[str],
    answers_a: Sequence[str],
    answers_b: Sequence[str],
    out: str | Path,
    *,
    names: tuple[str, str] = ("A", "B"),
    seed: int = 0,
) -> dict:
    """Write a rating sheet (.csv or .html) and its key (`<out>.key.json`). Raters fill `verdict`
    with 1, 2 or tie; the HTML page has buttons and downloads the filled CSV."""
    out = Path(out)
    if not (len(prompts) == len(answers_a) == len(answers_b)):
        raise DataError("export_sheet: need one answer per prompt from each model")
    rng = random.Random(seed)
    rows, key = [], {}
    for i, (p, a, b) in enumerate(zip(prompts, answers_a, answers_b)):
        a_first = rng.random() < 0.5
        rid = f"q{i:04d}"
        key[rid] = "a_first" if a_first else "b_first"
        rows.append(
            {
                "id": rid,
                "prompt": p,
                "response_1": a if a_first else b,
                "response_2": b if a_first else a,
                "verdict": "",
                "comment": "",
            }
        )
    key_path = out.with_name(out.name + ".key.json")
    atomic_write_json(key_path, {"model_a": names[0], "model_b": names[1], "order": key})
    if out.suffix.lower() == ".html":
        atomic_write_text(out, _sheet_html(rows))
    else:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=SHEET_COLUMNS)
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(out, buf.getvalue())
    return {"sheet": str(out), "key": str(key_path), "items": len(rows)}


def import_verdicts(sheet: str | Path, key: str | Path | None = None) -> dict:
    """Read raters' verdicts (a CSV with id + verdict columns) and the key; win rate of A over B.
    Unrated rows are counted, not guessed."""
    sheet = Path(sheet)
    key = Path(key) if key else sheet.with_name(sheet.name + ".key.json")
    if not key.exists():
        raise DataError(f"{key}: the key file written by `judge export` is missing; pass --key PATH")
    try:
        k = json.loads(key.read_text(encoding="utf-8"))
        order = k["order"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{key}: not a judge key file ({e})") from None
    try:
        reader = csv.DictReader(io.StringIO(sheet.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{sheet}: cannot read ({e})") from None
    if not reader.fieldnames or "id" not in reader.fieldnames or "verdict" not in reader.fieldnames:
        raise DataError(f"{sheet}: needs columns 'id' and 'verdict' (got {reader.fieldnames})")
    verdicts, unrated, seen = [], 0, set()
    for row in reader:
        where = f"{sheet}:{reader.line_num}"
        rid = (row.get("id") or "").strip()
        if rid not in order:
            raise DataError(f"{where}: id {rid!r} is not in the key {key.name}; was the sheet edited?")
        if rid in seen:
            raise DataError(f"{where}: id {rid!r} rated twice")
        seen.add(rid)
        raw = (row.get("verdict") or "").strip().lower()
        if raw not in VERDICTS:
            raise DataError(f"{where}: verdict {raw!r} not understood; write 1, 2 or tie (or leave empty)")
        v = VERDICTS[raw]
        if v is None:
            unrated += 1
            continue
        if v == "tie":
            verdicts.append("tie")
        else:
            a_first = order[rid] == "a_first"
            verdicts.append("a" if (v == "first") == a_first else "b")
    out = summarize(verdicts, (k.get("model_a", "A"), k.get("model_b", "B")))
    out["unrated"] = unrated + len(set(order) - seen)
    return out


def _sheet_html(rows: list[dict]) -> str:
    css = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em}"
        ".item{border:1px solid #ccc;border-radius:6px;margin:1em 0;padding:.6em}.pair{display:flex;gap:1em}"
        ".pair div{flex:1;background:#f7f7f9;padding:.5em;white-space:pre-wrap;border-radius:4px}"
        "label{margin-right:1.2em}button{font-size:1em;padding:.4em 1em}"
    )
    items = []
    for r in rows:
        rid = html.escape(r["id"])
        items.append(
            f"<div class='item' data-id='{rid}'><b>{rid}</b><p style='white-space:pre-wrap'>{html.escape(r['prompt'])}</p>"
            f"<div class='pair'><div><b>Response 1</b>\n{html.escape(r['response_1'])}</div>"
            f"<div><b>Response 2</b>\n{html.escape(r['response_2'])}</div></div><p>"
            + "".join(
                f"<label><input type='radio' name='{rid}' value='{v}'> {lab}</label>"
                for v, lab in (("1", "1 is better"), ("2", "2 is better"), ("tie", "tie"))
            )
            + f"<input type='text' name='c_{rid}' placeholder='comment' size='40'></p></div>"
        )
    script = (
        "function dl(){var L=['id,verdict,comment'];document.querySelectorAll('.item').forEach(function(d){"
        "var id=d.dataset.id;var c=d.querySelector('input[name=\"'+id+'\"]:checked');"
        "var t=d.querySelector('input[name=\"c_'+id+'\"]').value.replace(/\"/g,'\"\"');"
        "L.push(id+','+(c?c.value:'')+',\"'+t+'\"')});var a=document.createElement('a');"
        "a.href='data:text/csv;charset=utf-8,'+encodeURIComponent(L.join('\\n')+'\\n');"
        "a.download='verdicts.csv';a.click()}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Pairwise rating</title>"
        f"<style>{css}</style></head><body><h1>Which response is better?</h1>"
        "<p>For each prompt, pick the better response (or tie), then download your verdicts and send "
        "the file back. The two responses come from different models, in a random order.</p>"
        + "\n".join(items)
        + f"<p><button onclick='dl()'>Download verdicts (CSV)</button></p>"
        f"<script>{script}</script></body></html>"
    )
