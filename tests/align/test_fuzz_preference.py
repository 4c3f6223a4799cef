"""Fuzzing preference records (`lmforge.align.preference`): explicit, messages and implicit-prompt
shapes, HH-RLHF strings, margins, truncation.

Properties: `record_to_preference` gives a `PairError` whose reason is one of `REASONS` and whose
message names the record, or a usable `PrefRecord`; `encode_pairs` turns every record into a pair
or a counted drop (pairs + drops == records), and every pair fits `seq_len` with chosen != rejected."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from lmforge.align import preference
from lmforge.chat import ChatFormat
from lmforge.tokenizer import CHAT_ROLES, train_tokenizer
from tests.factories import CORPUS
from tests.fuzz_support import documented, fuzz


@pytest.fixture(scope="module")
def fmt():
    return ChatFormat(train_tokenizer(CORPUS, vocab_size=384))


text = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", " ", "<|end|>", "<|assistant|>\nx", "\n\nHuman:", "Assistant:"]),
)
hh = st.lists(st.tuples(st.sampled_from(["Human", "Assistant", "System"]), text), max_size=4).map(
    lambda turns: "".join(f"\n\n{r}: {c}" for r, c in turns)
)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(list(CHAT_ROLES) + ["tool", ""]) | st.integers(),
        "content": text | st.none() | st.integers(),
    }
)
side = st.one_of(
    text,
    hh,
    st.lists(message, max_size=4),
    message,
    st.none(),
    st.integers(),
    st.dictionaries(text, text, max_size=2),
)
margin = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**300), 10**300), st.floats(), st.text(max_size=3)
)
record = st.one_of(
    st.fixed_dictionaries(
        {"chosen": side, "rejected": side}, optional={"prompt": side, "messages": side, "margin": margin}
    ),
    st.dictionaries(
        st.sampled_from(["prompt", "chosen", "rejected", "messages", "margin"]), side, max_size=4
    ),
    side,
)


@fuzz(80)
@given(record)
@example({"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"})
@example(
    {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": {"role": "assistant", "content": "a"},
        "rejected": [{"role": "assistant", "content": "a "}],
    }
)
def test_record_to_preference(rec):
    pr, err = documented(preference.record_to_preference, rec, "prefs.jsonl:3")
    if err is not None:
        assert isinstance(err, preference.PairError) and err.reason in preference.REASONS
        assert "prefs.jsonl:3" in str(err)
        return
    assert pr.prompt and pr.prompt[-1]["role"] != "assistant"
    assert all(m["role"] in CHAT_ROLES and isinstance(m["content"], str) for m in pr.prompt)
    assert pr.chosen.strip() and pr.rejected.strip() and pr.chosen != pr.rejected
    assert isinstance(pr.margin, float) and math.isfinite(pr.margin)


@fuzz(40)
@given(
    st.lists(record, max_size=5),
    st.integers(4, 48),
    st.none() | st.integers(1, 16),
    st.sampled_from(["truncate", "drop"]),
)
def test_encode_pairs_counts_every_record(fmt, recs, seq_len, max_prompt_len, truncation):
    pairs, stats = preference.encode_pairs(
        [(f"p.jsonl:{i}", r) for i, r in enumerate(recs)],
        fmt,
        seq_len,
        max_prompt_len=max_prompt_len,
        truncation=truncation,
    )
    assert stats.records == len(recs) and len(pairs) == stats.pairs
    assert stats.pairs + sum(stats.dropped.values()) == len(recs)
    for p in pairs:
        assert p.chosen and p.rejected and p.chosen != p.rejected
        assert len(p.prompt) + max(len(p.chosen), len(p.rejected)) <= seq_len


def test_huge_integer_margin_is_a_pair_error():
    """Found by fuzzing: a JSON integer too large for a float (10**400) as the margin."""
    with pytest.raises(preference.PairError):
        preference.record_to_preference({"prompt": "q", "chosen": "a", "rejected": "b", "margin": 10**400})
