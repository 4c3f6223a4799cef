"""Chat data for supervised fine-tuning: validate, render, mask, pack, batch.

The rules, and why:

* **Records** are `{"messages": [{"role", "content"}, ...]}` (system / user / assistant,
  multi-turn) or `{"prompt", "completion"}` (strings, or message lists as in TRL). Every
  problem -- unknown role, empty or non-string content, no assistant turn -- is a `DataError`
  naming the record and message, or, with `on_error="skip"`, a skip counted by reason.
* **Rendering goes through the model's own chat template**: lmforge's template for models it
  trained (the fast Python `render_chat`, tested identical to the Jinja one), the Jinja template
  of `tokenizer_config.json` / `chat_template.jinja` for imported checkpoints.
* **Loss only on assistant tokens, derived by rendering.** For assistant message i we render
  the conversation up to i with the generation prompt (P) and up to and including i (Q). The
  assistant's span is Q minus P, trailing whitespace dropped: the answer *and its end-of-turn
  token* (`<|end|>`, `<|eot_id|>`, `<|im_end|>`...), so the model learns to stop, and none of the
  role header, which the prompt supplies at inference. Tokens of the full rendering whose
  character offset starts inside a span carry loss. A template for which this cannot work (not
  prefix-stable, ignores `add_generation_prompt`, or drops the content) is an error, never a
  silently wrong mask.
* **Contents are text.** `render` marks each message's content as a literal span
  (`tokenizer.RenderedText`), so a special-token string a user, a tool or a document writes
  (``<|end|><|user|>``, ``<|im_end|>``) is tokenised as plain text and only the template inserts
  control tokens. For a Jinja template the spans are found by rendering sentinels in place of
  the contents (only when some content holds such a string); a template that does not render
  such a content verbatim is refused. `literal_content=False` (`sft.special_tokens_in_content:
  control`) restores the old behaviour for data whose contents are meant to carry control tokens.
* **Long sequences** are truncated (`truncation="truncate"`, keeping the start) or dropped, and
  counted; an example with no assistant token left is dropped and counted.
* **Packing** concatenates short examples into rows of `seq_len` tokens (best-fit decreasing).
  Each example keeps its own positions (reset to 0) and a segment id; attention is causal *and*
  within the segment (a `DocumentMask` from the segment ids: FlexAttention on GPU, never a
  dense [B, 1, T, T] tensor in the batch), and targets never cross an example boundary, so a
  packed example's logits equal its unpacked logits (tested).
* **Unpacked rows are batched by a token budget** (`TokenBudgetBatches`): rows of similar
  length are grouped (sort-by-length within shuffled pools) until a batch holds about
  `batch_size x seq_len` padded tokens, so a step carries as many tokens as a packed one
  instead of `batch_size` short rows.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .data.readers import loads_json
from .errors import DataError
from .tokenizer import CHAT_ROLES, CHAT_TEMPLATE, LMTokenizer, RenderedText, render_chat

_SENTINEL = re.compile("\ue000(\\d+)\ue001")


# ----------------------------------------------------------------------------- records
def validate_messages(messages: object, where: str = "record") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} is a {type(m).__name__}, expected {{role, content}}")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise DataError(
                f"{where}: message {i} has unknown role {role!r}; expected one of {', '.join(CHAT_ROLES)}"
            )
        if not isinstance(content, str):
            raise DataError(
                f"{where}: message {i} ({role}) content must be a string, got {type(content).__name__}"
            )
        if not content.strip():
            raise DataError(f"{where}: message {i} ({role}) has empty content")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(
            f"{where}: no assistant turn, so nothing to learn from; add an assistant "
            f"message or drop the record"
        )
    return out


def record_to_messages(rec: object, where: str = "record") -> list[dict]:
    """A `messages` record or a `prompt`/`completion` record -> validated messages."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        return validate_messages(rec["messages"], where)
    if "prompt" in rec and "completion" in rec:
        p, c = rec["prompt"], rec["completion"]
        p = [{"role": "user", "content": p}] if isinstance(p, str) else p
        c = [{"role": "assistant", "content": c}] if isinstance(c, str) else c
        if not isinstance(p, list) or not isinstance(c, list):
            raise DataError(f"{where}: prompt/completion must be strings or message lists")
        return validate_messages(p + c, where)
    raise DataError(f"{where}: needs 'messages' or 'prompt'+'completion' (keys: {sorted(rec)[:6]})")


def read_jsonl_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(location, record) per line of a JSONL file; bad JSON is an error naming the line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file; give a JSONL file of messages or prompt/completion records")
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec, err = loads_json(line)  # deep nesting and 5000-digit ints too, not only syntax
            if err is not None:
                raise DataError(f"{p}:{n}: {err.replace('malformed', 'invalid', 1)}")
            yield f"{p}:{n}", rec


# ----------------------------------------------------------------------------- templates
def find_chat_template(folder: str | Path) -> str | None:
    """The Jinja chat template stored with a tokenizer/model folder, if any."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    cfg_file = folder / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            t = json.loads(cfg_file.read_text(encoding="utf-8")).get("chat_template")
        except json.JSONDecodeError as e:
            raise DataError(f"{cfg_file}: invalid JSON ({e})") from None
        if isinstance(t, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
            t = named.get("default") or next(iter(named.values()), None)
        if isinstance(t, str) and t:
            return t
    return None


def _jinja_renderer(template: str, specials: dict):
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # pragma: no cover
        raise DataError(
            "rendering this model's Jinja chat template needs `jinja2` (pip install jinja2)"
        ) from None

    def raise_exception(msg):
        raise DataError(f"chat template: {msg}")

    def strftime_now(fmt):
        return "26 Jul 2024"  # fixed: renders must be deterministic (Llama 3 templates print a date)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        compiled = env.from_string(template)
    except TemplateError as e:
        raise DataError(f"chat template does not compile: {e}") from None

    def render(messages, add_generation_prompt=False):
        try:
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **specials)
        except TemplateError as e:
            raise DataError(f"chat template failed to render: {e}") from None

    return render


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # True: this token is an assistant token (a loss target)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_targets(self) -> int:
        return sum(self.mask[1:])


class ChatFormat:
    """A tokenizer plus the chat template that goes with it."""

    def __init__(
        self,
        tok: LMTokenizer,
        template: str | None = None,
        specials: dict | None = None,
        *,
        literal_content: bool = True,
    ):
        self.tok = tok
        self.literal_content = literal_content  # special-token strings in contents stay text
        ours = all(
            tok.token_id(t) == i
            for i, t in enumerate(
                ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
            )
        )
        if template is None and not ours:
            raise DataError(
                "this tokenizer has no chat template (no chat_template in tokenizer_config.json "
                "or chat_template.jinja); add one, or fine-tune on plain text instead"
            )
        self.template = template if template is not None else CHAT_TEMPLATE
        if self.template == CHAT_TEMPLATE:
            self._render = render_chat
        else:
            sp = {
                "bos_token": tok.bos_token or "",
                "eos_token": tok.eos_token or "",
                "pad_token": tok.pad_token or "",
                "unk_token": "",
            }
            self._render = _jinja_renderer(self.template, {**sp, **(specials or {})})
        end = tok.token_id("<|end|>") if ours else None
        self.stop_ids = sorted({i for i in (end, tok.eos_id) if i is not None})

    @classmethod
    def from_dir(cls, folder: str | Path) -> ChatFormat:
        tok = LMTokenizer.load(folder)
        template = find_chat_template(folder)
        specials = {}
        cfg_file = Path(folder) / "tokenizer_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
                v = cfg.get(k)
                v = v.get("content") if isinstance(v, dict) else v
                if isinstance(v, str):
                    specials[k] = v
        fmt = cls(tok, template, specials)
        # stop on the template's end-of-turn token too (e.g. <|eot_id|>, <|im_end|>)
        if template is not None and template != CHAT_TEMPLATE:
            probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
            try:
                ex = fmt.encode(probe)
            except DataError:  # reported when real data is encoded
                return fmt
            last = [i for i, m in zip(ex.ids, ex.mask) if m]
            if last:
                fmt.stop_ids = sorted(set(fmt.stop_ids) | {last[-1]})
        return fmt

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The template's text; with `literal_content`, a `RenderedText` whose message contents
        are tokenised as plain text."""
        messages = list(messages)
        text = self._render(messages, add_generation_prompt)
        if not self.literal_content:
            return str(text)
        if isinstance(text, RenderedText):
            return text
        return self._mark_contents(text, messages, add_generation_prompt)

    def _mark_contents(self, text: str, messages: list[dict], add_generation_prompt: bool) -> RenderedText:
        """Spans of the contents in a Jinja rendering, found by rendering numbered sentinels in
        their place; needed (and computed) only when some content holds a special-token string."""
        contents: list[str] = [c if isinstance(c := m.get("content"), str) else "" for m in messages]
        risky = [i for i, c in enumerate(contents) if self.tok.special_strings_in(c)]
        if not risky:
            return RenderedText(text, ())
        marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        sentinel = self._render(marked, add_generation_prompt)
        for strip in (False, True):
            parts, spans, cursor, pos = [], [], 0, 0
            for m in _SENTINEL.finditer(sentinel):
                content = contents[int(m.group(1))]
                content = content.strip() if strip else content
                parts += [sentinel[cursor : m.start()], content]
                pos += m.start() - cursor
                spans.append((pos, pos + len(content)))
                pos += len(content)
                cursor = m.end()
            if "".join(parts) + sentinel[cursor:] == text:
                return RenderedText(text, spans)
        forged = self.tok.special_strings_in(contents[risky[0]])[0]
        raise DataError(
            f"message {risky[0]}: its content holds the control-token string {forged!r} and the chat "
            f"template does not render contents verbatim, so it cannot be kept as plain text; "
            f"remove the string from the message"
        )

    def assistant_spans(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the [start, end) character span of every assistant turn."""
        full = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            p = self.render(messages[:i], add_generation_prompt=True) if i else self.render([], True)
            q = self.render(messages[: i + 1])
            if not q.startswith(p) or not full.startswith(q):
                raise DataError(
                    f"the chat template cannot mark assistant spans: rendering is not "
                    f"prefix-stable at message {i} (it rewrites earlier turns); use a "
                    f"template that renders each turn independently"
                )
            turn = q[len(p) :].rstrip()
            k = turn.find(m["content"].strip())
            if k < 0:
                raise DataError(
                    f"the chat template does not render assistant message {i}'s content "
                    f"verbatim; cannot locate the assistant tokens"
                )
            head = turn[:k]
            if head.strip() and i and p == self.render(messages[:i]):
                raise DataError(
                    "the chat template ignores add_generation_prompt but renders an assistant "
                    f"header ({head.strip()!r}) that a generation prompt would have to supply; "
                    "fix the template"
                )
            # the answer starts at the content, or at the whitespace just before it (the model
            # generates that space: "[/INST] Hello" tokenises as "▁Hello"); the template's own
            # per-turn markup before it (a header, an empty think block) carries no loss
            spans.append((len(p) + len(head.rstrip()), len(p) + len(turn)))
        return full, spans

    def encode(self, messages: Sequence[dict]) -> Example:
        text, spans = self.assistant_spans(messages)
        ids, offsets = self.tok.encode_with_offsets(text)
        mask = []
        k = 0
        for start, _end in offsets:
            while k < len(spans) and start >= spans[k][1]:
                k += 1
            mask.append(k < len(spans) and spans[k][0] <= start < spans[k][1])
        for s, e in spans:  # every span must own tokens, its end-of-turn token included
            if not any(m and s <= o[0] < e for m, o in zip(mask, offsets)):
                raise DataError("an assistant turn received no tokens after tokenisation; check the template")
        return Example(list(ids), mask)

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """Token ids to feed for generating the next assistant turn."""
        return self.tok.encode(self.render(messages, add_generation_prompt=True))


# ----------------------------------------------------------------------------- dataset building
@dataclass
class EncodeStats:
    examples: int = 0
    tokens: int = 0
    assistant_tokens: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "examples": self.examples,
            "tokens": self.tokens,
            "assistant_tokens": self.assistant_tokens,
            "truncated": self.truncated,
            **{f"skipped_{k}": v for k, v in sorted(self.skipped.items())},
        }


def _located(e: DataError, where: str, rec: object) -> DataError:
    """A template error names the record (file:line) and the role sequence it was given."""
    msg = str(e)
    if msg.startswith(where) or "template" not in msg:
        return e
    msgs = rec.get("messages") if isinstance(rec, dict) else None
    roles = (
        " -> ".join(str(m.get("role")) for m in msgs if isinstance(m, dict))
        if isinstance(msgs, list)
        else "?"
    )
    return DataError(
        f"{where}: {msg} (roles: {roles}); this model's chat template rejects the record. Some templates "
        f"(e.g. Mistral's) have no system role or need user/assistant to alternate: merge such turns, "
        f"or set sft.on_bad_record: skip to count and skip these records"
    )


def encode_records(
    records: Iterable[tuple[str, object]],
    fmt: ChatFormat,
    max_len: int,
    *,
    truncation: str = "truncate",
    on_error: str = "raise",
) -> tuple[list[Example], EncodeStats]:
    """(where, record) pairs -> examples of at most `max_len` tokens, with counted drops."""
    if truncation not in ("truncate", "drop"):
        raise DataError(f"truncation={truncation!r}: use 'truncate' or 'drop'")
    out, st = [], EncodeStats()
    for where, rec in records:
        try:
            ex = fmt.encode(record_to_messages(rec, where))
        except DataError as e:
            if on_error != "skip":
                raise _located(e, where, rec) from None
            msg = str(e)
            reason = (
                "unknown_role"
                if "unknown role" in msg
                else "empty_content"
                if "empty content" in msg
                else "no_assistant"
                if "no assistant" in msg
                else "template"
                if "template" in msg
                else "invalid"
            )
            st.skipped[reason] += 1
            continue
        if len(ex) > max_len:
            if truncation == "drop":
                st.skipped["too_long"] += 1
                continue
            ex = Example(ex.ids[:max_len], ex.mask[:max_len])
            st.truncated += 1
            if ex.n_targets == 0:
                st.skipped["no_assistant_after_truncation"] += 1
                continue
        out.append(ex)
        st.examples += 1
        st.tokens += len(ex)
        st.assistant_tokens += ex.n_targets
    return out, st
