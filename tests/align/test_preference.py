"""Preference data: every accepted record shape, the HH-RLHF reader, tokenisation through the chat
template (shared prompt tokens, completion-only labels), truncation, and each bad-input reason
counted with its file:line."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.align.pair_batches import PairLoader, collate_pairs
from lmforge.align.preference import (
    PairError,
    builtin_preferences,
    encode_pairs,
    encode_preference,
    hh_to_messages,
    load_preference_records,
    record_to_preference,
)
from lmforge.chat import ChatFormat, read_jsonl_records
from lmforge.errors import DataError
from lmforge.tokenizer import train_tokenizer
from lmforge.train.objectives.sft import IGNORE

TEXTS = [
    "The sky is blue and the grass is green.",
    "I cannot help with that request, sorry.",
    "Paris is the capital of France.",
    "What is the capital of France?",
    "Hello there, how are you?",
    "A pen can be used to write letters and draw pictures.",
] * 20


@pytest.fixture(scope="module")
def fmt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, vocab_size=320).save(d)
    return ChatFormat.from_dir(d)


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def test_explicit_string_and_message_forms_agree():
    a = record_to_preference(
        {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Rome."}
    )
    b = record_to_preference(
        {"prompt": [U("What is the capital of France?")], "chosen": [A("Paris.")], "rejected": [A("Rome.")]}
    )
    c = record_to_preference(
        {"messages": [U("What is the capital of France?")], "chosen": "Paris.", "rejected": "Rome."}
    )
    d = record_to_preference(
        {
            "chosen": [U("What is the capital of France?"), A("Paris.")],  # implicit
            "rejected": [U("What is the capital of France?"), A("Rome.")],
        }
    )
    e = record_to_preference(
        {
            "prompt": [U("What is the capital of France?")],  # chosen repeats prompt
            "chosen": [U("What is the capital of France?"), A("Paris.")],
            "rejected": "Rome.",
        }
    )
    assert a == b == c == d == e
    assert a.prompt == [U("What is the capital of France?")] and (a.chosen, a.rejected) == ("Paris.", "Rome.")
    assert record_to_preference({**a.__dict__, "margin": 2}).margin == 2.0


def test_hh_reader_and_implicit_split_at_last_assistant():
    text = (
        "\n\nHuman: hi there\n\nAssistant: Hello!\n\nHuman: capital of France?\n\nHuman: please\n\nAssistant:"
    )
    msgs = hh_to_messages(text)
    assert msgs == [U("hi there"), A("Hello!"), U("capital of France?\n\nplease"), A("")]
    base = "\n\nHuman: hi there\n\nAssistant: Hello!\n\nHuman: capital of France?"
    r = record_to_preference(
        {"chosen": base + "\n\nAssistant: Paris.", "rejected": base + "\n\nAssistant: No idea."}
    )
    assert r.prompt == [U("hi there"), A("Hello!"), U("capital of France?")]
    assert (r.chosen, r.rejected) == ("Paris.", "No idea.")
    # TRL's explicit HH form: the prompt ends with an empty Assistant turn, answers are plain strings
    r2 = record_to_preference(
        {"prompt": base + "\n\nAssistant:", "chosen": " Paris.", "rejected": " No idea."}
    )
    assert r2 == r
    with pytest.raises(PairError, match="before the first"):
        hh_to_messages("preamble\n\nHuman: x\n\nAssistant: y")


def test_pair_tokens_share_the_prompt_and_label_only_completions(fmt):
    pr = record_to_preference(
        {
            "prompt": "What is the capital of France?",
            "chosen": "Paris is the capital.",
            "rejected": "The sky is blue.",
        }
    )
    p = encode_preference(fmt, pr, 256)
    # the prompt is exactly what generation feeds the model; completions end with <|end|>
    assert p.prompt == fmt.prompt_ids([U("What is the capital of France?")])
    end = fmt.tok.token_id("<|end|>")
    assert p.chosen[-1] == end and p.rejected[-1] == end
    assert fmt.tok.decode(p.chosen[:-1]) == "Paris is the capital."
    b = collate_pairs([p], fmt.tok.pad_id)
    ids, labels = b["input_ids"], b["labels"]
    assert ids.shape[0] == 2 and b["lengths"].tolist() == [
        len(p.prompt) + len(p.chosen),
        len(p.prompt) + len(p.rejected),
    ]
    n = len(p.prompt)
    assert (labels[0, : n - 1] == IGNORE).all()
    assert labels[0, n - 1 : n - 1 + len(p.chosen)].tolist() == p.chosen
    assert (labels[0] != IGNORE).sum() == len(p.chosen) and (labels[1] != IGNORE).sum() == len(p.rejected)
    assert ids[1, n : n + len(p.rejected)].tolist() == p.rejected


def test_truncation_keeps_prompt_end_and_cuts_completions(fmt):
    pr = record_to_preference(
        {
            "prompt": "What is the capital of France? " * 3,
            "chosen": "Paris is the capital of France. " * 4,
            "rejected": "The sky is blue. " * 4,
        }
    )
    full = encode_preference(fmt, pr, 10_000)
    p = encode_preference(fmt, pr, len(full.prompt) + 5)
    assert (
        p.truncated
        and p.prompt == full.prompt
        and p.chosen == full.chosen[:5]
        and p.rejected == full.rejected[:5]
    )
    q = encode_preference(fmt, pr, 20, max_prompt_len=8)
    assert q.prompt == full.prompt[-8:] and len(q.chosen) == 12
    with pytest.raises(PairError) as e:
        encode_preference(fmt, pr, len(full.prompt))
    assert e.value.reason == "prompt_too_long"
    with pytest.raises(PairError) as e:
        encode_preference(fmt, pr, 50, truncation="drop")
    assert e.value.reason == "too_long"


def test_bad_records_are_counted_by_reason_with_file_and_line(fmt, tmp_path):
    good = {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Rome."}
    lines = [
        good,
        {"prompt": "Hello?", "chosen": "Same answer.", "rejected": "Same answer. "},  # identical
        {"chosen": [U("Hi"), A("Hello")], "rejected": [U("Hi"), A("Hello")]},  # identical
        {"prompt": "Hello?", "chosen": "   ", "rejected": "No."},  # empty
        {"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: hey"},  # empty
        {
            "prompt": "What is the capital of France? " * 40,
            "chosen": "Paris.",
            "rejected": "Rome.",
        },  # too long
        {"prompt": "Hello?", "chosen": "Paris."},  # malformed
        {"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"},  # malformed
        ["not", "an", "object"],  # malformed
        {"prompt": "Hello?", "chosen": "a", "rejected": "b", "margin": "big"},  # malformed
        {"chosen": "Paris.", "rejected": "Rome."},  # malformed (no prompt)
        {
            "chosen": [U("a"), A("b"), U("c"), A("d")],
            "rejected": [U("a"), A("x"), U("c"), A("e")],
        },  # malformed
    ]
    f = tmp_path / "prefs.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    pairs, st = encode_pairs(read_jsonl_records(f), fmt, 64, max_notes=20)
    assert len(pairs) == 1 and pairs[0].where == f"{f}:1"
    assert dict(st.dropped) == {"identical": 2, "empty_completion": 2, "prompt_too_long": 1, "malformed": 6}
    assert st.as_dict()["dropped"] == 11 and st.records == 12
    assert any(n.startswith(f"malformed: {f}:7:") and "rejected" in n for n in st.notes)
    assert any(f"{f}:8:" in n and "'prompt' message 0" in n for n in st.notes)
    assert any(f"{f}:10:" in n and "margin" in n for n in st.notes)


def test_pair_loader_resumes_exactly(fmt):
    recs = [
        (f"r{i}", {"prompt": f"Question {i}?", "chosen": f"Yes {i}.", "rejected": f"No {i}."})
        for i in range(7)
    ]
    pairs, _ = encode_pairs(recs, fmt, 64)
    ref = {p.key(): (-1.0 * i, -2.0 * i) for i, p in enumerate(pairs)}
    a = PairLoader(pairs, 3, fmt.tok.pad_id, seed=1, ref=ref)
    it = iter(a)
    for _ in range(2):
        next(it)
    state = a.state_dict()
    want = [next(it) for _ in range(3)]
    b = PairLoader(pairs, 3, fmt.tok.pad_id, seed=1, ref=ref)
    b.load_state_dict(state)
    got = [x for _, x in zip(range(3), iter(b))]
    for x, y in zip(want, got):
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
    assert want[0]["ref_logps"].shape == (6,)


def test_builtin_preferences_are_deterministic_and_plausible(tmp_path):
    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "pkg" / "__init__.py").write_text('"""Tools for counting apples in baskets."""\n')
    (lib / "pkg" / "fruit.py").write_text(
        '"""Fruit helpers for the basket module."""\n'
        'def count(x):\n    """Count the apples in a basket."""\n'
        'def weigh(x):\n    """Weigh the whole basket of apples."""\n'
        'def peel(x):\n    """Peel one apple with a small knife."""\n'
        'class Basket:\n    """A basket that holds some apples."""\n'
    )
    a = builtin_preferences(stdlib_dir=str(lib))
    assert a == builtin_preferences(stdlib_dir=str(lib)) and len(a) == 6
    summaries = {
        "Count the apples in a basket.",
        "Weigh the whole basket of apples.",
        "Peel one apple with a small knife.",
        "A basket that holds some apples.",
        "Fruit helpers for the basket module.",
        "Tools for counting apples in baskets.",
    }
    for r in a:
        name = r["source"].split(":", 1)[1]
        assert r["chosen"] in summaries and r["chosen"] != r["rejected"]
        assert r["prompt"][-1]["role"] == "user" and name in r["prompt"][-1]["content"]
        if r["kind"] == "swap":
            assert r["rejected"] in summaries
        elif r["kind"] == "truncated":
            assert r["chosen"].startswith(r["rejected"]) and not r["rejected"].endswith(".")
        else:
            assert r["kind"] == "evasive" and f"`{name}`" in r["rejected"]
    assert {r["kind"] for r in a} >= {"swap", "evasive"}
    with pytest.raises(DataError, match="no such preference file"):
        load_preference_records([str(tmp_path / "missing.jsonl")])
