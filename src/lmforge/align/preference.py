"""Preference data: read, normalise, render through the chat template, tokenise, batch.

Accepted records (one JSON object per line, the TRL shapes):

* explicit: ``{"prompt": ..., "chosen": ..., "rejected": ...}`` -- prompt a string (one user
  turn) or a message list; chosen / rejected a string (the assistant's answer) or a message
  list holding one assistant turn (a chosen that repeats the prompt turns is accepted too);
* ``{"messages": [...conversation so far...], "chosen": ..., "rejected": ...}``;
* implicit prompt: ``{"chosen": ..., "rejected": ...}`` as two whole conversations (message
  lists, or Anthropic HH-RLHF strings ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) that share
  their opening; the prompt is their longest common prefix of turns (for HH strings this is the
  split at the last ``"\\n\\nAssistant:"``);
* optional ``"margin"`` (a number): how much better chosen is, used by the reward model's
  Bradley-Terry loss.

HH-RLHF reader (`hh_to_messages`): the text is split at ``"\\n\\nHuman:"`` / ``"\\n\\nAssistant:"``
markers; Human becomes `user`, Assistant `assistant`; each turn is stripped; consecutive turns
of the same role (a few HH dialogues have them) are joined with a blank line; a trailing empty
Assistant turn (HH's explicit-prompt form ends with one) ends the prompt.

Rendering goes through the model's chat template (`ChatFormat`), exactly as SFT and generation
do: the prompt is everything up to the start of the last assistant turn's content, the
completion is that content *and its end-of-turn token*. Prompt and completions are tokenised
separately, so the prompt tokens are identical for chosen and rejected and the log-prob mask is
the completion tokens only.

Bad pairs never stop a run and never reach the update: each is dropped and counted by reason --
`malformed` (not parseable; the message names file:line and field), `identical` (chosen equals
rejected, before or after truncation), `empty_completion`, `prompt_too_long` (no room left for
a completion token in `seq_len`), `too_long` (with truncation="drop"). Otherwise an over-long
pair is truncated: the prompt from the left down to `max_prompt_len` (when set), then the
completions from the right to fit `seq_len`.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..chat import ChatFormat, read_jsonl_records
from ..errors import DataError
from ..tokenizer import CHAT_ROLES

REASONS = ("malformed", "identical", "empty_completion", "prompt_too_long", "too_long")


class PairError(DataError):
    """A preference record that cannot become a training pair; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------- HH-RLHF
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def is_hh(text: object) -> bool:
    """Does this string look like an HH-RLHF dialogue?"""
    return (
        isinstance(text, str) and ("\n\nHuman:" in text or text.startswith("Human:")) and "Assistant:" in text
    )


def hh_to_messages(text: str, where: str = "record") -> list[dict]:
    """An HH-RLHF dialogue string -> [{"role", "content"}...]. A final empty Assistant turn is
    kept (as empty content) so callers can tell "prompt awaiting an answer" from a full dialogue."""
    t = text if text.startswith("\n\n") else "\n\n" + text
    parts = _HH_TURN.split(t)
    if parts[0].strip():
        raise PairError(
            "malformed", f"{where}: text before the first '\\n\\nHuman:' marker: {parts[0][:40]!r}"
        )
    msgs: list[dict] = []
    for role, content in zip(parts[1::2], parts[2::2]):
        r, c = _HH_ROLE[role], content.strip()
        if msgs and msgs[-1]["role"] == r:
            msgs[-1]["content"] = (msgs[-1]["content"] + "\n\n" + c).strip()
        else:
            msgs.append({"role": r, "content": c})
    if not msgs:
        raise PairError("malformed", f"{where}: no Human/Assistant turns found")
    return msgs


# ----------------------------------------------------------------------------- records
@dataclass
class PrefRecord:
    """A normalised preference: the conversation so far and two candidate assistant answers."""

    prompt: list[dict]
    chosen: str
    rejected: str
    margin: float = 0.0


def _messages(x: object, where: str, key: str, str_role: str) -> list[dict]:
    if isinstance(x, str):
        return hh_to_messages(x, f"{where}: {key}") if is_hh(x) else [{"role": str_role, "content": x}]
    if isinstance(x, dict) and "role" in x:
        x = [x]
    if not isinstance(x, list) or not x:
        raise PairError(
            "malformed",
            f"{where}: field '{key}' must be a string or a non-empty list of "
            f"{{role, content}} messages, got {type(x).__name__}",
        )
    out = []
    for i, m in enumerate(x):
        if (
            not isinstance(m, dict)
            or m.get("role") not in CHAT_ROLES
            or not isinstance(m.get("content"), str)
        ):
            raise PairError(
                "malformed",
                f"{where}: field '{key}' message {i} must be {{role: "
                f"{'|'.join(CHAT_ROLES)}, content: string}}, got {str(m)[:60]}",
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _same(a: dict, b: dict) -> bool:
    return a["role"] == b["role"] and a["content"].strip() == b["content"].strip()


def _completion(rest: list[dict], where: str, key: str) -> str:
    if not rest:
        raise PairError("empty_completion", f"{where}: '{key}' has no answer after the prompt")
    if len(rest) > 1 or rest[0]["role"] != "assistant":
        raise PairError(
            "malformed",
            f"{where}: '{key}' must continue the prompt with exactly one assistant turn "
            f"(got roles {[m['role'] for m in rest]}); chosen and rejected may only "
            f"differ in their last assistant turn",
        )
    c = rest[0]["content"].strip()
    if not c:
        raise PairError("empty_completion", f"{where}: '{key}' is empty")
    return c


def record_to_preference(rec: object, where: str = "record") -> PrefRecord:
    """Any accepted record shape -> PrefRecord, or PairError naming the reason and field."""
    if not isinstance(rec, dict):
        raise PairError("malformed", f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in rec]
    if missing:
        raise PairError(
            "malformed",
            f"{where}: missing field(s) {missing}; a preference record needs "
            f"'chosen' and 'rejected' (and optionally 'prompt' or 'messages')",
        )
    margin = rec.get("margin", 0.0)
    if margin is None:
        margin = 0.0
    try:  # JSON integers can exceed a float (10**400): that is bad data, not a crash
        ok = (
            not isinstance(margin, bool) and isinstance(margin, (int, float)) and math.isfinite(float(margin))
        )
    except OverflowError:
        ok = False
    if not ok:
        raise PairError(
            "malformed", f"{where}: field 'margin' must be a finite number, got {str(margin)[:40]}"
        )
    prompt_key = "prompt" if "prompt" in rec else "messages" if "messages" in rec else None
    chosen = _messages(rec["chosen"], where, "chosen", "assistant")
    rejected = _messages(rec["rejected"], where, "rejected", "assistant")
    if prompt_key is not None:
        prompt = _messages(rec[prompt_key], where, prompt_key, "user")
        if prompt and prompt[-1]["role"] == "assistant" and not prompt[-1]["content"].strip():
            prompt = prompt[:-1]  # HH explicit form: "...\n\nAssistant:" awaiting the answer
        # completions that repeat the prompt's turns
        for _name, msgs in (("chosen", chosen), ("rejected", rejected)):
            if len(msgs) > len(prompt) and all(_same(a, b) for a, b in zip(prompt, msgs)):
                msgs[:] = msgs[len(prompt) :]
    else:
        k = 0
        while k < min(len(chosen), len(rejected)) and _same(chosen[k], rejected[k]):
            k += 1
        if k == len(chosen) == len(rejected):
            raise PairError("identical", f"{where}: chosen and rejected are the same conversation")
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    if not prompt:
        raise PairError(
            "malformed",
            f"{where}: no prompt: give 'prompt' (or 'messages'), or chosen/rejected "
            f"conversations that share their opening turns",
        )
    if prompt[-1]["role"] == "assistant":
        raise PairError(
            "malformed",
            f"{where}: the prompt ends with an assistant turn; the answer must follow a "
            f"user (or system) turn",
        )
    for i, m in enumerate(prompt):
        if not m["content"].strip():
            raise PairError(
                "malformed",
                f"{where}: field '{prompt_key or 'chosen'}' message {i} ({m['role']}) has empty content",
            )
    c, r = _completion(chosen, where, "chosen"), _completion(rejected, where, "rejected")
    if c == r:
        raise PairError("identical", f"{where}: chosen and rejected answers are identical")
    return PrefRecord(prompt, c, r, float(margin))


# ----------------------------------------------------------------------------- tokenised pairs
@dataclass
class Pair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0
    where: str = ""
    truncated: bool = False

    def key(self) -> bytes:
        """16-byte hash of the tokenised pair: the reference cache's key."""
        h = hashlib.blake2b(digest_size=16)
        for part in (self.prompt, self.chosen, self.rejected):
            h.update(np.asarray(part, dtype=np.int64).tobytes())
            h.update(b"|")
        return h.digest()


def _split(fmt: ChatFormat, prompt: list[dict], answer: str) -> tuple[str, str]:
    """(prompt text, completion text) of the conversation prompt + answer, cut where the
    answer's content starts; the completion runs to the end of its end-of-turn token."""
    full, spans = fmt.assistant_spans(prompt + [{"role": "assistant", "content": answer}])
    s, e = spans[-1]
    return full[:s], full[s:e]


def encode_preference(
    fmt: ChatFormat,
    pr: PrefRecord,
    seq_len: int,
    *,
    max_prompt_len: int | None = None,
    truncation: str = "truncate",
    where: str = "record",
) -> Pair:
    try:
        p_text, c_text = _split(fmt, pr.prompt, pr.chosen)
        p_text_r, r_text = _split(fmt, pr.prompt, pr.rejected)
    except DataError as e:
        raise PairError("malformed", f"{where}: {e}") from None
    if p_text != p_text_r:  # e.g. a template that renders the answer into the header
        raise PairError(
            "malformed",
            f"{where}: the chat template renders the prompt differently for chosen and "
            f"rejected; cannot share prompt tokens",
        )
    tok = fmt.tok
    p, c, r = tok.encode(p_text), tok.encode(c_text), tok.encode(r_text)
    if not c or not r:
        raise PairError("empty_completion", f"{where}: a completion tokenises to nothing")
    truncated = False
    if len(p) + max(len(c), len(r)) > seq_len:
        if truncation == "drop":
            raise PairError(
                "too_long",
                f"{where}: {len(p)} prompt + {max(len(c), len(r))} completion tokens > seq_len {seq_len}",
            )
        truncated = True
        if max_prompt_len is not None and len(p) > max_prompt_len:
            p = p[-max_prompt_len:]
        room = seq_len - len(p)
        if room < 1:
            raise PairError(
                "prompt_too_long",
                f"{where}: prompt of {len(p)} tokens leaves no room for an answer in seq_len {seq_len}",
            )
        c, r = c[:room], r[:room]
        if c == r:
            raise PairError(
                "identical",
                f"{where}: chosen and rejected are identical after truncation to {room} completion tokens",
            )
    return Pair(p, c, r, pr.margin, where, truncated)


@dataclass
class PairStats:
    records: int = 0
    pairs: int = 0
    truncated: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    dropped: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)  # the first few drop messages, for the log

    def as_dict(self) -> dict:
        return {
            "records": self.records,
            "pairs": self.pairs,
            "truncated": self.truncated,
            "dropped": sum(self.dropped.values()),
            **{f"dropped_{k}": self.dropped.get(k, 0) for k in REASONS if self.dropped.get(k)},
        }

    def line(self) -> str:
        d = sum(self.dropped.values())
        s = (
            f"{self.pairs} pairs from {self.records} records ({self.prompt_tokens:,} prompt + "
            f"{self.completion_tokens:,} completion tokens); {self.truncated} truncated, {d} dropped"
        )
        return s + (f" {dict(self.dropped)}" if d else "")


def encode_pairs(
    records: Iterable[tuple[str, object]],
    fmt: ChatFormat,
    seq_len: int,
    *,
    max_prompt_len: int | None = None,
    truncation: str = "truncate",
    max_notes: int = 5,
) -> tuple[list[Pair], PairStats]:
    """(where, record) -> tokenised pairs; every record that cannot be used is counted by reason."""
    if truncation not in ("truncate", "drop"):
        raise DataError(f"truncation={truncation!r}: use 'truncate' or 'drop'")
    out, st = [], PairStats()
    for where, rec in records:
        st.records += 1
        try:
            pair = encode_preference(
                fmt,
                record_to_preference(rec, where),
                seq_len,
                max_prompt_len=max_prompt_len,
                truncation=truncation,
                where=where,
            )
        except PairError as e:
            st.dropped[e.reason] += 1
            if len(st.notes) < max_notes:
                st.notes.append(f"{e.reason}: {e}")
            continue
        out.append(pair)
        st.pairs += 1
        st.truncated += pair.truncated
        st.prompt_tokens += len(pair.prompt)
        st.completion_tokens += len(pair.chosen) + len(pair.rejected)
    return out, st


# ----------------------------------------------------------------------------- sources
EVASIVE = (
    "I am not sure what `{name}` does.",
    "Sorry, I cannot say anything about `{name}`.",
    "That is a good question; `{name}` is hard to explain.",
)


def builtin_preferences(max_examples: int | None = None, stdlib_dir: str | None = None) -> list[dict]:
    """Offline preference pairs from the standard library, deterministic.

    The prompt is the first question of each built-in instruction conversation (with its system
    prompt when it has one); chosen is the right answer (the name's docstring summary). The
    rejected answer is, by a hash of the name (field `kind`):

    * `swap` (half): a plausible wrong answer -- the summary of another documented name of the
      same module and kind (else the same module, else the same kind). Telling these apart needs
      knowledge of which name does what; the default pipeline's tiny model is at chance here;
    * `truncated` (a quarter): the right answer cut off after half its words -- incomplete;
    * `evasive` (a quarter): a non-answer ("I am not sure what `json.dumps` does.").

    The last two are the helpfulness preferences a small model can learn and generalise from a
    few dozen pairs, so the default pipeline can show held-out accuracy move; a benchmark reports
    each kind separately."""
    import sysconfig

    from ..data.instruct import _items, builtin_instructions

    root = stdlib_dir or sysconfig.get_paths()["stdlib"]
    items = {name: (module, kind, summary) for module, name, kind, summary in _items(str(root))}
    by_mod_kind, by_mod, by_kind = defaultdict(list), defaultdict(list), defaultdict(list)
    for name, (module, kind, summary) in items.items():
        by_mod_kind[module, kind].append(summary)
        by_mod[module].append(summary)
        by_kind[kind].append(summary)
    out = []
    for rec in builtin_instructions(stdlib_dir=stdlib_dir, max_examples=max_examples):
        name = rec["source"].split(":", 1)[1]
        module, kind, summary = items[name]
        first = next(i for i, m in enumerate(rec["messages"]) if m["role"] == "assistant")
        chosen = rec["messages"][first]["content"]
        h = int.from_bytes(hashlib.sha1(("rejected:" + name).encode()).digest()[:4], "big")
        rejected, how = None, ("swap", "swap", "truncated", "evasive")[h % 4]
        if how == "swap":
            for pool in (by_mod_kind[module, kind], by_mod[module], by_kind[kind]):
                wrong = [s for s in pool if s != chosen]
                if wrong:
                    rejected = wrong[(h >> 2) % len(wrong)]
                    break
            else:
                how = "truncated"
        if how == "truncated":
            words = chosen.rstrip(".").split()
            rejected = " ".join(words[: max(2, len(words) // 2)])
        elif how == "evasive":
            rejected = EVASIVE[(h >> 2) % len(EVASIVE)].format(name=name)
        if rejected and rejected.strip() != chosen.strip():
            out.append(
                {
                    "prompt": rec["messages"][:first],
                    "chosen": chosen,
                    "rejected": rejected,
                    "kind": how,
                    "source": rec["source"],
                }
            )
    return out


def load_preference_records(
    sources: Sequence[str], max_examples: int | None = None
) -> list[tuple[str, object]]:
    """'builtin' and/or JSONL files -> (where, record) with file:line locations."""
    out: list[tuple[str, object]] = []
    for src in sources:
        if src == "builtin":
            out += [(f"builtin:{r['source']}", r) for r in builtin_preferences(max_examples=max_examples)]
        else:
            if not Path(src).is_file():
                raise DataError(
                    f"{src}: no such preference file; give a JSONL file of prompt/chosen/rejected "
                    f"records, or 'builtin'"
                )
            out += list(read_jsonl_records(src))
    return out
