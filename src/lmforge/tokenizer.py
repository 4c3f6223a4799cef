"""Tokenizer: byte-level BPE trained with HF `tokenizers`, saved so `transformers` loads it as-is.

Choices, and why:

* **Byte-level BPE** with all 256 byte symbols in the initial alphabet: any string -- emoji,
  CJK, control characters, the U+FFFD left by a bad decode -- encodes and decodes back exactly;
  there is no unknown token and no normalisation.
* **GPT-4 (cl100k) pre-tokenisation**: text is first split by the cl100k regex (case-insensitive
  English contractions, letters with one leading non-letter, numbers in groups of at most three
  digits, punctuation runs, newlines, spaces) and BPE merges never cross those pieces. Short
  digit groups make arithmetic learnable and keep the vocabulary from filling with numbers.
* **Seven special tokens with fixed ids 0..6** (`SPECIAL_TOKENS`): ``<|bos|>`` starts every
  document in the token shards (so each training row can begin at a document start),
  ``<|eos|>`` ends generation for plain LMs, ``<|pad|>`` pads batches, and ``<|system|>``,
  ``<|user|>``, ``<|assistant|>``, ``<|end|>`` frame chat turns. Fixed ids mean every tokenizer
  lmforge trains agrees on them, whatever the corpus.
* **One chat template, two implementations**: `render_chat` in Python and `CHAT_TEMPLATE` in
  Jinja (written into tokenizer_config.json for `apply_chat_template`, vLLM, llama.cpp...).
  The format: ``<|bos|>`` then per message ``<|{role}|>\\n{content}<|end|>\\n``; a generation
  prompt appends ``<|assistant|>\\n``. The tests check both give identical strings.
* Saved as tokenizer.json + tokenizer_config.json + special_tokens_map.json (written
  atomically), the layout `PreTrainedTokenizerFast.from_pretrained` expects, so an exported
  model works in the HF ecosystem with the same ids.

* **Only the template inserts control tokens.** A user message, a tool result or a retrieved
  document containing the string ``<|end|><|user|>`` must not close the assistant's turn and open
  a forged one. Rendering returns a `RenderedText`: the string plus the character spans that
  came from message contents (or whole documents, `literal_text`). `LMTokenizer.encode` of a
  `RenderedText` turns special-token strings into control tokens only outside those spans;
  inside them they are ordinary text (a second copy of the tokenizer with
  ``encode_special_tokens`` on). When no content holds such a string -- every real
  conversation -- the ids are exactly those of a plain encode. Every path that encodes a
  conversation (the server, the chat CLI, RAG, SFT and preference data, the judge) renders
  through `render_chat` or `ChatFormat.render`, so all of them get this.

`LMTokenizer.load` also reads foreign tokenizers: any HF tokenizer.json (bos/eos from its
tokenizer_config.json when present) and the original GPT-2 encoder.json + vocab.bpe pair.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import cast

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.artifacts import verify_path
from lmforge.errors import ConfigError, DataError
from lmforge.runs import atomic_write_json, atomic_write_text

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END)  # ids 0..6, in this order
BOS_ID, EOS_ID, PAD_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID, END_ID = range(len(SPECIAL_TOKENS))
CHAT_ROLES = ("system", "user", "assistant")

# cl100k_base (GPT-4) pre-tokenisation pattern.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Must render exactly what `render_chat` does (tested). HF renders with trim_blocks/lstrip_blocks,
# so the template is one line with every newline inside a string literal.
CHAT_TEMPLATE = (
    "{{ '" + BOS + "' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role'] + '; expected system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '" + END + "\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + "\\n' }}{% endif %}"
)
UNLIMITED_LENGTH = int(1e30)  # transformers' VERY_LARGE_INTEGER: "no model_max_length set"
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


# ----------------------------------------------------------------------------- literal spans
Span = tuple[int, int]


class RenderedText(str):
    """A rendered prompt plus the [start, end) character spans that must be tokenised as plain
    text (message contents, documents): special-token strings inside them are not control
    tokens. Slicing keeps the spans that fall inside the slice; any other str operation gives
    a plain str (no protection), so encode the rendered text itself or a slice of it."""

    spans: tuple[Span, ...]

    def __new__(cls, text: str, spans: Iterable[Span] = ()) -> RenderedText:
        obj = super().__new__(cls, text)
        obj.spans = tuple((int(a), int(b)) for a, b in spans if b > a)
        return obj

    def __getitem__(self, key):
        out = str.__getitem__(self, key)
        if not isinstance(key, slice) or key.step not in (None, 1):
            return out
        start, stop, _ = key.indices(len(self))
        spans = [
            (max(a, start) - start, min(b, stop) - start) for a, b in self.spans if a < stop and b > start
        ]
        return RenderedText(out, spans)


def literal_text(text: str) -> RenderedText:
    """`text` (a retrieved document, a tool result, a completion prompt built from them) to be
    tokenised entirely as plain text."""
    return RenderedText(text, [(0, len(text))])


# ----------------------------------------------------------------------------- chat template
def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> RenderedText:
    """The chat transcript as text, exactly as CHAT_TEMPLATE renders it, with each message's
    content marked literal (see `RenderedText`)."""
    parts = [BOS]
    spans: list[Span] = []
    pos = len(BOS)
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise DataError(
                f"message {i}: unknown chat role {role!r}; expected one of {', '.join(CHAT_ROLES)}"
            )
        if not isinstance(content, str):
            raise DataError(f"message {i}: 'content' must be a string, got {type(content).__name__}")
        head = f"<|{role}|>\n"
        spans.append((pos + len(head), pos + len(head) + len(content)))
        parts.append(f"{head}{content}{END}\n")
        pos += len(parts[-1])
    if add_generation_prompt:
        parts.append(f"{ASSISTANT}\n")
    return RenderedText("".join(parts), spans)


# ----------------------------------------------------------------------------- the wrapper
class LMTokenizer:
    """A `tokenizers.Tokenizer` plus the special-token roles lmforge needs (bos/eos/pad)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        bos_token: str | None = BOS,
        eos_token: str | None = EOS,
        pad_token: str | None = PAD,
        model_max_length: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.model_max_length = model_max_length

    # -- ids
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        """The id of `token` (e.g. "<|end|>"), or None if it is not in the vocabulary."""
        return self.tokenizer.token_to_id(token)

    def _role_id(self, token: str | None) -> int | None:
        return None if token is None else self.token_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._role_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._role_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self._role_id(self.pad_token)

    @property
    def end_id(self) -> int | None:
        """``<|end|>``, where an assistant turn stops (None for foreign tokenizers)."""
        return self.token_id(END)

    # -- encode / decode
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids; special-token strings inside the literal spans of a `RenderedText` are
        encoded as plain text."""
        if isinstance(text, RenderedText) and text.spans:
            ids = self.encode_with_offsets(text)[0]
        else:
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids) if add_bos else ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[Span]]:
        """(ids, character offsets) of `text`, honouring the literal spans of a `RenderedText`."""
        spans = text.spans if isinstance(text, RenderedText) else ()
        plain = str(text)
        hits = list(self._special_re().finditer(plain)) if spans else []
        if not any(_overlaps(m.span(), spans) for m in hits):  # the common case: one plain encode
            enc = self.tokenizer.encode(plain, add_special_tokens=False)
            return list(enc.ids), [(o[0], o[1]) for o in enc.offsets]
        ids: list[int] = []
        offsets: list[Span] = []
        cursor = 0
        for m in hits:
            if _overlaps(m.span(), spans):
                continue  # inside a message / document: stays text
            self._encode_literal(plain, cursor, m.start(), ids, offsets)
            special = self.tokenizer.token_to_id(m.group())
            assert special is not None  # `_special_re` matches only the vocabulary's added tokens
            ids.append(special)
            offsets.append(m.span())
            cursor = m.end()
        self._encode_literal(plain, cursor, len(plain), ids, offsets)
        return ids, offsets

    def _encode_literal(self, text: str, start: int, end: int, ids: list, offsets: list) -> None:
        """Append the tokens of text[start:end], special-token strings included as plain text."""
        if end <= start:
            return
        if getattr(self, "_literal", None) is None:
            self._literal = Tokenizer.from_str(self.tokenizer.to_str())
            self._literal.encode_special_tokens = True
        enc = self._literal.encode(text[start:end], add_special_tokens=False)
        ids.extend(enc.ids)
        offsets.extend((a + start, b + start) for a, b in enc.offsets)

    def _special_re(self) -> re.Pattern:
        if getattr(self, "_specials", None) is None:
            names = sorted(
                {t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special},
                key=len,
                reverse=True,
            )
            self._specials = re.compile("|".join(map(re.escape, names)) if names else r"(?!)")
        return self._specials

    def special_strings_in(self, text: str) -> list[str]:
        """The special-token strings that occur in `text` (e.g. a message's content)."""
        return [m.group() for m in self._special_re().finditer(text)]

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """Encode many texts at once in Rust, in parallel across cores (no offsets computed)."""
        if any(isinstance(t, RenderedText) for t in texts):
            return [self.encode(t, add_bos=add_bos) for t in texts]
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        batch = [e.ids for e in encode(list(texts), add_special_tokens=False)]
        return [self._with_bos(ids) for ids in batch] if add_bos else batch

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.bos_id is None:
            raise DataError(
                "this tokenizer has no BOS token (none set in its tokenizer_config.json); "
                "encode without add_bos or use a tokenizer trained by lmforge"
            )
        return [self.bos_id, *ids]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    # -- persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json atomically."""
        d = Path(directory)
        atomic_write_text(d / "tokenizer.json", self.tokenizer.to_str(pretty=False))
        roles = {
            k: v
            for k, v in (
                ("bos_token", self.bos_token),
                ("eos_token", self.eos_token),
                ("pad_token", self.pad_token),
            )
            if v is not None
        }
        extra = [t for t in (SYSTEM, USER, ASSISTANT, END) if self.token_id(t) is not None]
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **roles,
            "model_max_length": self.model_max_length or UNLIMITED_LENGTH,
            "clean_up_tokenization_spaces": False,  # decode must not touch spaces
            "add_bos_token": False,
            "add_eos_token": False,
        }
        if all(self.token_id(t) == i for i, t in enumerate(SPECIAL_TOKENS)):  # ours: template applies
            config["chat_template"] = CHAT_TEMPLATE
        atomic_write_json(d / "tokenizer_config.json", config)
        atomic_write_json(
            d / "special_tokens_map.json",
            {**roles, **({"additional_special_tokens": extra} if extra else {})},
        )
        return d

    @classmethod
    def load(cls, path: str | os.PathLike) -> LMTokenizer:
        """Load a saved tokenizer dir, a tokenizer.json file, or a GPT-2 encoder.json/vocab.bpe dir."""
        p = Path(path)
        if p.is_dir() and not (p / "tokenizer.json").is_file():
            if (p / "encoder.json").is_file() and (p / "vocab.bpe").is_file():
                return _load_gpt2_files(p / "encoder.json", p / "vocab.bpe")
            raise DataError(
                f"{p}: no tokenizer.json (nor GPT-2 encoder.json + vocab.bpe) in this folder; "
                f"train one with `lmforge tokenizer` or point at a tokenizer folder"
            )
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise DataError(f"{file}: no such tokenizer file; train one or fix the path")
        for name in (file.name, "tokenizer_config.json", "special_tokens_map.json"):
            verify_path(file.parent / name)  # written by a stage: unchanged since (size + hash)
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises plain Exception on bad JSON / unknown model
            raise DataError(f"{file}: not a valid tokenizer.json ({e}); re-save or re-train it") from e
        config = _read_config(file.parent / "tokenizer_config.json")
        if config is None:  # bare tokenizer.json: ours if it carries our special tokens at 0..6
            ours = all(tok.token_to_id(t) == i for i, t in enumerate(SPECIAL_TOKENS))
            return cls(tok, *((BOS, EOS, PAD) if ours else (None, None, None)))
        roles = [_token_content(config.get(k)) for k in ("bos_token", "eos_token", "pad_token")]
        bos, eos, pad = [t if t is not None and tok.token_to_id(t) is not None else None for t in roles]
        max_len = config.get("model_max_length")
        max_len = max_len if isinstance(max_len, int) and max_len < UNLIMITED_LENGTH else None
        return cls(tok, bos, eos, pad, model_max_length=max_len)


def _overlaps(span: Span, spans: Sequence[Span]) -> bool:
    return any(span[0] < b and a < span[1] for a, b in spans)


def _read_config(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: corrupt tokenizer config ({e}); delete or fix it") from e
    if not isinstance(config, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _token_content(value: object) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _load_gpt2_files(encoder: Path, merges: Path) -> LMTokenizer:
    """The original OpenAI GPT-2 files: byte-level BPE with GPT-2's own regex, <|endoftext|>."""
    try:
        vocab = json.loads(encoder.read_text(encoding="utf-8"))
        lines = merges.read_text(encoding="utf-8").splitlines()
        merge_pairs = [
            cast(tuple[str, str], tuple(line.split(" ")))
            for line in lines
            if line and not line.startswith("#version")
        ]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs))
    except Exception as e:
        raise DataError(f"{encoder.parent}: cannot read GPT-2 encoder.json/vocab.bpe ({e})") from e
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    eot = "<|endoftext|>" if "<|endoftext|>" in vocab else None
    if eot:
        tok.add_special_tokens([eot])
    return LMTokenizer(tok, bos_token=eot, eos_token=eot, pad_token=None)


# ----------------------------------------------------------------------------- training
def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with lmforge's pre-tokenizer and decoder."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> LMTokenizer:
    """Train byte-level BPE on `texts`; the same texts give the same tokenizer."""
    if vocab_size < MIN_VOCAB:
        raise ConfigError(
            f"vocab_size={vocab_size}: must be at least {MIN_VOCAB} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_nonempty(texts), trainer=trainer)
    if tok.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise DataError("tokenizer training saw no text; check the training data spec")
    return LMTokenizer(tok)


def _nonempty(texts: Iterable[str]) -> Iterable[str]:
    return (t for t in texts if t)


def bytes_per_token(tok: LMTokenizer, texts: Sequence[str]) -> float:
    """UTF-8 bytes per token over `texts`: the tokenizer's compression (higher is better)."""
    texts = list(texts)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    if n_tokens == 0:
        raise DataError("bytes_per_token: the texts produced no tokens (are they all empty?)")
    return sum(len(t.encode("utf-8")) for t in texts) / n_tokens
