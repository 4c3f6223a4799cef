"""Chat data: assistant-only loss masks via the model's template, bad records, packing without
leakage, exact-resume loader."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer

from lmforge.chat import ChatFormat, encode_records, record_to_messages
from lmforge.data.batches import TokenBudgetBatches
from lmforge.errors import DataError
from lmforge.model.attention import DocumentMask
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.sft.rows import RowLoader, collate, example_row, pack, row_loader
from lmforge.tokenizer import LMTokenizer, train_tokenizer
from lmforge.train.objectives.sft import IGNORE, SFTObjective

TEXTS = [
    "What does the json module do? It encodes and decodes JSON documents.",
    "You are a helpful assistant. Explain lists, tuples and dicts in Python.",
    "Answer briefly: the os module offers operating system interfaces.",
] * 20
CONVO = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What does json do?"},
    {"role": "assistant", "content": "It encodes JSON."},
    {"role": "user", "content": "And os?"},
    {"role": "assistant", "content": " Operating system\ninterfaces. "},
]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def tok() -> LMTokenizer:
    return train_tokenizer(TEXTS, vocab_size=320)


@pytest.fixture(scope="module")
def chatml_dir(tok, tmp_path_factory):
    """A foreign tokenizer (no lmforge specials) with a ChatML Jinja template, as Qwen ships."""
    d = tmp_path_factory.mktemp("chatml")
    raw = Tokenizer.from_str(tok.tokenizer.to_str())
    raw.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    raw.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "chat_template": CHATML,
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )
    return d


def _assistant_text(fmt, ex):
    return [fmt.tok.decode([i for i, m in zip(ex.ids, ex.mask) if m])]


def _check_mask(fmt, ex, end_token):
    """Split the masked tokens into contiguous runs: one per assistant turn, each exactly the
    content followed by the end-of-turn token; nothing else masked."""
    runs, cur = [], []
    for i, m in zip(ex.ids, ex.mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    answers = [m["content"] for m in CONVO if m["role"] == "assistant"]
    assert [fmt.tok.decode(r) for r in runs] == [a + end_token for a in answers]
    end_id = fmt.tok.token_id(end_token)
    assert all(r[-1] == end_id for r in runs)  # the model learns to stop
    # every unmasked token decodes to template/system/user text only
    unmasked = fmt.tok.decode([i for i, m in zip(ex.ids, ex.mask) if not m])
    for m in CONVO:
        if m["role"] != "assistant":
            assert m["content"] in unmasked
    assert "It encodes" not in unmasked and "interfaces" not in unmasked


def test_lmforge_template_masks_only_assistant_tokens(tok):
    fmt = ChatFormat(tok)
    ex = fmt.encode(CONVO)
    assert fmt.tok.decode(ex.ids) == fmt.render(CONVO)
    _check_mask(fmt, ex, "<|end|>")
    assert fmt.stop_ids == [tok.eos_id, tok.end_id]
    # labels: targets exactly at the positions preceding assistant tokens
    row = example_row(ex)
    assert [t for t in row.labels if t != IGNORE] == [i for i, m in zip(ex.ids[1:], ex.mask[1:]) if m]
    assert row.labels[-1] == IGNORE


def test_jinja_template_masks_only_assistant_tokens(chatml_dir):
    fmt = ChatFormat.from_dir(chatml_dir)
    ex = fmt.encode(CONVO)
    _check_mask(fmt, ex, "<|im_end|>")
    assert fmt.tok.token_id("<|im_end|>") in fmt.stop_ids
    assert fmt.render(CONVO[:2], add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(chatml_dir)
    assert hf.apply_chat_template(CONVO, tokenize=False) == fmt.render(CONVO)


LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_llama3_style_template(tok, tmp_path):
    raw = Tokenizer.from_str(tok.tokenizer.to_str())
    raw.add_special_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3})
    )
    fmt = ChatFormat.from_dir(tmp_path)
    ex = fmt.encode(CONVO)
    assert ex.ids[0] == fmt.tok.token_id("<|begin_of_text|>")
    runs = fmt.tok.decode([i for i, m in zip(ex.ids, ex.mask) if m])
    assert runs == "It encodes JSON.<|eot_id|>Operating system\ninterfaces.<|eot_id|>"  # template trims
    assert fmt.tok.token_id("<|eot_id|>") in fmt.stop_ids
    assert "assistant" not in runs and "You are terse" not in runs


def test_headerless_template_like_llama2(tok):
    """[INST] style: no assistant header and no generation prompt; the answer (with the space
    the model generates before it) and the EOS carry loss."""
    tpl = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
    )
    fmt = ChatFormat(tok, tpl)
    msgs = [
        {"role": "user", "content": "What does json do?"},
        {"role": "assistant", "content": "It encodes JSON."},
    ]
    ex = fmt.encode(msgs)
    assert tok.decode([i for i, m in zip(ex.ids, ex.mask) if m]) == " It encodes JSON. <|eos|>"
    assert "INST" not in tok.decode([i for i, m in zip(ex.ids, ex.mask) if m])


def test_prompt_completion_records(tok):
    msgs = record_to_messages({"prompt": "What does json do?", "completion": "It encodes JSON."})
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    ex = ChatFormat(tok).encode(msgs)
    assert tok.decode([i for i, m in zip(ex.ids, ex.mask) if m]) == "It encodes JSON.<|end|>"


@pytest.mark.parametrize(
    "rec,match",
    [
        (
            {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "unknown role 'robot'",
        ),
        (
            {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]},
            "empty content",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        (
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
            "must be a string",
        ),
        ({"text": "plain"}, "needs 'messages'"),
    ],
)
def test_bad_records_are_errors_or_counted_skips(tok, rec, match):
    fmt = ChatFormat(tok)
    with pytest.raises(DataError, match=match):
        encode_records([("data.jsonl:7", rec)], fmt, 64)
    with pytest.raises(DataError, match="data.jsonl:7"):
        encode_records([("data.jsonl:7", rec)], fmt, 64)
    good = {"messages": CONVO}
    exs, st = encode_records([("a", good), ("b", rec), ("c", good)], fmt, 256, on_error="skip")
    assert len(exs) == 2 and sum(st.skipped.values()) == 1


def test_templates_that_cannot_mark_spans_are_refused(tok):
    no_gen = "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    with pytest.raises(DataError, match="add_generation_prompt"):
        ChatFormat(tok, no_gen).encode(CONVO)
    rewrites = (
        "{% for m in messages %}{% if loop.last %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
        "{% else %}{{ '<|' + m['role'] + '|>' + m['content'][:2] }}{% endif %}{{ '<|end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    with pytest.raises(DataError, match="prefix-stable"):
        ChatFormat(tok, rewrites).encode(CONVO)
    bare = LMTokenizer(
        Tokenizer.from_str('{"version":"1.0","model":{"type":"BPE","vocab":{"a":0},"merges":[]}}')
    )
    with pytest.raises(DataError, match="no chat template"):
        ChatFormat(bare)


def test_truncation_is_counted(tok):
    fmt = ChatFormat(tok)
    n = len(fmt.encode(CONVO))
    exs, st = encode_records([("a", {"messages": CONVO})], fmt, n - 3)
    assert st.truncated == 1 and len(exs[0]) == n - 3
    exs, st = encode_records([("a", {"messages": CONVO})], fmt, n - 3, truncation="drop")
    assert exs == [] and st.skipped["too_long"] == 1
    exs, st = encode_records([("a", {"messages": CONVO})], fmt, 12)  # cut before any answer
    assert exs == [] and st.skipped["no_assistant_after_truncation"] == 1


def test_packing_has_no_leakage(tok):
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128
        )
    ).eval()
    fmt = ChatFormat(tok)
    recs = [
        {"prompt": f"Question {i}: " + "word " * (i % 5), "completion": "answer " * (1 + i % 4)}
        for i in range(9)
    ]
    exs, _ = encode_records([(str(i), r) for i, r in enumerate(recs)], fmt, 128)
    rows = pack(exs, 128)
    assert len(rows) < len(exs)  # it did pack
    assert sorted(n for r in rows for n in [r.seg.count(s) for s in set(r.seg)]) == sorted(
        len(e) for e in exs
    )
    batch = collate(rows, tok.pad_id, packed=True)
    with torch.no_grad():
        packed_logits = model(
            batch["input_ids"], position_ids=batch["position_ids"], attn_mask=DocumentMask(batch["doc_ids"])
        )
        leaky = model(batch["input_ids"])  # plain causal attention over the packed row
    checked = leaked = 0
    for b, r in enumerate(rows):
        for s in sorted(set(r.seg)):
            idx = [i for i, x in enumerate(r.seg) if x == s]
            ids = torch.tensor([r.ids[i] for i in idx])[None]
            with torch.no_grad():
                alone = model(ids)[0]
            torch.testing.assert_close(packed_logits[b, idx], alone, atol=1e-5, rtol=1e-5)
            assert r.labels[idx[-1]] == IGNORE  # no target crosses into the next example
            checked += 1
            leaked += not torch.allclose(leaky[b, idx], alone, atol=1e-5)
    assert checked == len(exs) and leaked > 0  # without the document mask the test would fail
    # the SFT loss over the packed batch equals the sum over unpacked examples
    obj = SFTObjective()
    with torch.no_grad():
        lp, n, _ = obj(model, batch)
        unp = collate([example_row(e) for e in exs], tok.pad_id, packed=False)
        lu, m, _ = obj(model, unp)
    assert n == m == sum(e.n_targets for e in exs)
    torch.testing.assert_close(lp, lu, atol=1e-3, rtol=1e-5)


def test_row_loader_resumes_exactly(tok):
    fmt = ChatFormat(tok)
    exs, _ = encode_records(
        [(str(i), {"prompt": "q" * (i + 1), "completion": "a"}) for i in range(7)], fmt, 64
    )
    rows = [example_row(e) for e in exs]
    a = RowLoader(rows, 3, tok.pad_id, packed=False, seed=1)
    it = iter(a)
    first = [next(it)["input_ids"] for _ in range(4)]
    state = a.state_dict()
    rest = [next(it)["input_ids"] for _ in range(3)]
    b = RowLoader(rows, 3, tok.pad_id, packed=False, seed=1)
    b.load_state_dict(state)
    it2 = iter(b)
    assert all(torch.equal(x, next(it2)["input_ids"]) for x in rest)
    assert len(first) == 4


def test_unpacked_rows_are_batched_by_token_budget(tok):
    """packing=false: batches of similar-length rows under batch_size x seq_len padded tokens;
    every row once per epoch, the same summed loss and target counts as fixed-size batches, and
    an exact resume."""
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4, max_seq_len=128)
    ).eval()
    fmt = ChatFormat(tok)
    recs = [{"prompt": "word " * (1 + i % 9), "completion": "answer " * (1 + i % 5)} for i in range(23)]
    exs, _ = encode_records([(str(i), r) for i, r in enumerate(recs)], fmt, 64)
    rows = [example_row(e) for e in exs]
    loader = row_loader(rows, 2, 32, tok.pad_id, packed=False, seed=3)
    assert isinstance(loader, TokenBudgetBatches)
    batches = loader.epoch_batches(0)
    assert sorted(i for b in batches for i in b) == list(range(len(rows)))
    assert all(len(b) * max(len(rows[i].ids) for i in b) <= 64 for b in batches)
    assert len(batches) < len(rows)  # short rows share a batch
    obj = SFTObjective()
    it = iter(loader)
    with torch.no_grad():
        new = [obj(model, next(it)) for _ in batches]
        old = [obj(model, collate(rows[i : i + 2], tok.pad_id, packed=False)) for i in range(0, len(rows), 2)]
    assert sum(n for _, n, _ in new) == sum(n for _, n, _ in old) == sum(e.n_targets for e in exs)
    torch.testing.assert_close(sum(l for l, _, _ in new), sum(l for l, _, _ in old), atol=1e-3, rtol=1e-5)
    state = loader.state_dict()
    want = [next(it)["input_ids"] for _ in range(len(batches) + 2)]  # crosses into epoch 2
    again = row_loader(rows, 2, 32, tok.pad_id, packed=False, seed=3)
    again.load_state_dict(state)
    it2 = iter(again)
    assert all(torch.equal(w, next(it2)["input_ids"]) for w in want)
    with pytest.raises(DataError, match="token budget"):
        row_loader(rows, 1, 4, tok.pad_id, packed=False, seed=3)
