"""Checks the SFT stage makes before any work: `seq_len` against the model's context (and its
memory-capped default), and chat-template errors that name the record and its roles."""

from __future__ import annotations

import json

import pytest

from lmforge.chat import ChatFormat, encode_records, read_jsonl_records
from lmforge.errors import ConfigError, DataError
from lmforge.model.config import ModelConfig
from lmforge.stages.sft import SFTConfig, choose_seq_len
from lmforge.tokenizer import train_tokenizer

MCFG = ModelConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, max_seq_len=512)


def test_seq_len_checked_against_context(tmp_path):
    logs: list[str] = []
    with pytest.raises(ConfigError, match=r"sft.seq_len=1024 exceeds the model's context \(512"):
        choose_seq_len(SFTConfig(seq_len=1024), MCFG, tmp_path, "cpu", logs.append)
    assert choose_seq_len(SFTConfig(seq_len=128), MCFG, tmp_path, "cpu", logs.append) == 128
    # unset: the model's context (a tiny model fits in memory), not a config's fixed 256
    assert choose_seq_len(SFTConfig(), MCFG, tmp_path, "cpu", logs.append) == 512
    assert not logs


def test_seq_len_default_capped_by_memory(tmp_path, monkeypatch):
    big = MCFG.model_copy(update=dict(max_seq_len=131072, d_model=4096, n_layers=32))
    logs: list[str] = []
    monkeypatch.setattr("os.sysconf", lambda name: 4096 if name == "SC_PAGE_SIZE" else 2**28)  # 1 TiB free
    seq = choose_seq_len(SFTConfig(batch_size=8), big, tmp_path, "cpu", logs.append)
    per_token = big.activation_bytes_per_token(4)
    assert 256 < seq < 131072 and 8 * seq * per_token <= 2**39 < 8 * 2 * seq * per_token
    assert logs and "capped to" in logs[0]


def test_template_error_names_record_and_roles(tmp_path):
    tok = train_tokenizer(["hello there, how are you? fine thanks"] * 20, vocab_size=300)
    mistral_like = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    fmt = ChatFormat(tok, mistral_like)
    data = tmp_path / "chat.jsonl"
    ok = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine"}]}
    sys = {"messages": [{"role": "system", "content": "be kind"}, *ok["messages"]]}
    data.write_text(json.dumps(ok) + "\n" + json.dumps(sys) + "\n")
    with pytest.raises(DataError, match=r"chat\.jsonl:2: .*alternate.*roles: system -> user -> assistant"):
        encode_records(read_jsonl_records(data), fmt, 64)
    examples, stats = encode_records(read_jsonl_records(data), fmt, 64, on_error="skip")
    assert len(examples) == 1 and stats.skipped["template"] == 1
