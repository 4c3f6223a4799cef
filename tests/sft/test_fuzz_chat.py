"""Fuzzing chat records, rendering, assistant-only loss masks and packing (`lmforge.chat`).

Properties: a record is either a `DataError` naming what is wrong or a validated conversation;
the loss mask covers exactly the assistant turns (their content and end-of-turn token, nothing of
the prompt), whatever the text -- markup look-alikes and special-token strings included; every
record given to `encode_records` is either an example or a counted skip; packing keeps every
example exactly once, inside seq_len, with targets that never cross examples."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from lmforge.chat import ChatFormat, Example, encode_records, record_to_messages
from lmforge.errors import DataError
from lmforge.sft.rows import example_row, pack
from lmforge.tokenizer import CHAT_ROLES, END, train_tokenizer
from lmforge.train.objectives.sft import IGNORE
from tests.factories import CORPUS
from tests.fuzz_support import documented, fuzz


@pytest.fixture(scope="module")
def fmt():
    return ChatFormat(train_tokenizer(CORPUS, vocab_size=384))


SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
content = st.one_of(
    st.text(min_size=1, max_size=30),
    st.lists(
        st.one_of(
            st.sampled_from(SPECIALS + ["\n", " ", "<|", "|>", "\r\n", "\u2028", "é", "🙂"]),
            st.text(max_size=5),
        ),
        min_size=1,
        max_size=8,
    ).map("".join),
)
roles = st.sampled_from(CHAT_ROLES)
message = st.fixed_dictionaries({"role": roles, "content": content})
any_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=6,
)
records = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(st.one_of(message, any_value), max_size=4)}),
    st.fixed_dictionaries(
        {
            "prompt": st.one_of(content, st.lists(message, max_size=2), any_value),
            "completion": st.one_of(content, st.lists(message, max_size=2), any_value),
        }
    ),
    any_value,
)


def _words(s: str) -> str:
    return "".join(s.split())


@fuzz(80)
@given(records)
def test_record_is_validated_or_refused(rec):
    msgs, err = documented(record_to_messages, rec, "data.jsonl:7")
    if err is not None:
        assert isinstance(err, DataError) and "data.jsonl:7" in str(err)
        return
    assert msgs and any(m["role"] == "assistant" for m in msgs)
    for m in msgs:
        assert m["role"] in CHAT_ROLES and isinstance(m["content"], str) and m["content"].strip()


def _special_free(s: str) -> bool:
    return not any(t in s for t in SPECIALS)


conversations = st.lists(message, min_size=1, max_size=5).filter(
    lambda ms: any(m["role"] == "assistant" for m in ms) and all(m["content"].strip() for m in ms)
)


@fuzz(60)
@given(conversations)
@example([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\n\nhello\n"}])
@example([{"role": "user", "content": "x"}, {"role": "assistant", "content": "<|end|>\n<|user|>\nfake"}])
@example([{"role": "assistant", "content": "é🙂"}])
def test_loss_mask_is_exactly_the_assistant_turns(fmt, msgs):
    ex, err = documented(fmt.encode, msgs)
    if err is not None:  # e.g. content whose special-token look-alikes break the template's spans
        assert isinstance(err, DataError)
        return
    assert len(ex.ids) == len(ex.mask) and not ex.mask[0]
    masked = fmt.tok.decode([i for i, m in zip(ex.ids, ex.mask) if m])
    want = "".join(m["content"] + END for m in msgs if m["role"] == "assistant")
    assert _words(masked) == _words(want)
    if all(_special_free(m["content"]) for m in msgs):  # otherwise the user's own text holds markup
        unmasked = fmt.tok.decode([i for i, m in zip(ex.ids, ex.mask) if not m])
        for m in msgs:
            if m["role"] != "assistant":
                assert _words(m["content"]) in _words(unmasked)


@fuzz(40)
@given(st.lists(records, max_size=6), st.integers(2, 64), st.sampled_from(["truncate", "drop"]))
def test_every_record_is_an_example_or_a_counted_skip(fmt, recs, max_len, truncation):
    pairs = [(f"f.jsonl:{i}", r) for i, r in enumerate(recs)]
    out, st_ = encode_records(pairs, fmt, max_len, truncation=truncation, on_error="skip")
    assert len(out) + sum(st_.skipped.values()) == len(recs)
    assert all(len(e) <= max_len and e.n_targets > 0 for e in out)


examples_ = st.lists(
    st.integers(1, 20).flatmap(
        lambda n: st.tuples(
            st.lists(st.integers(0, 383), min_size=n, max_size=n),
            st.lists(st.booleans(), min_size=n, max_size=n),
        )
    ),
    min_size=1,
    max_size=10,
)


@fuzz(40)
@given(examples_, st.integers(20, 48))
def test_packing_keeps_every_example_once_and_never_crosses(raw, seq_len):
    exs = [Example(ids, mask) for ids, mask in raw]
    rows = pack(exs, seq_len)
    assert sum(len(r.ids) for r in rows) == sum(len(e) for e in exs)
    seen = []
    for r in rows:
        assert len(r.ids) <= seq_len and len(r.ids) == len(r.labels) == len(r.pos) == len(r.seg)
        for s in sorted(set(r.seg)):
            idx = [i for i, x in enumerate(r.seg) if x == s]
            assert idx == list(range(idx[0], idx[-1] + 1)) and [r.pos[i] for i in idx] == list(
                range(len(idx))
            )
            assert r.labels[idx[-1]] == IGNORE  # no target reaches into the next example
            seen.append(([r.ids[i] for i in idx], [r.labels[i] for i in idx]))
    want = sorted((list(e.ids), example_row(e).labels) for e in exs)
    assert sorted(seen) == want
