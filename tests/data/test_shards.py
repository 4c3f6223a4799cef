"""Token shards (write/load/validate) and the BOS-aligned, resumable TokenLoader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from lmforge.data.builtin import harvest_builtin_corpus
from lmforge.data.readers import Document
from lmforge.data.shards import TokenLoader, iter_eval_windows, load_shard, window_starts, write_token_shards
from lmforge.errors import DataError
from lmforge.tokenizer import SPECIAL_TOKENS, LMTokenizer, train_tokenizer

SEQ = 64


@pytest.fixture(scope="module")
def docs() -> list[str]:
    corpus = [d.text for d in harvest_builtin_corpus()]
    # Short documents (most rows start at a BOS) plus a few whole modules (multi-window documents).
    paragraphs = [p for text in corpus[:40] for p in text.split("\n\n") if p.strip()]
    return paragraphs[:300] + corpus[40:43]


@pytest.fixture(scope="module")
def tok(docs) -> LMTokenizer:
    return train_tokenizer(docs, vocab_size=400)


@pytest.fixture(scope="module")
def shard_dir(docs, tok, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_token_shards(docs, tok, out, "train", batch_docs=64)
    return out


def test_round_trip_counts_and_layout(docs, tok, shard_dir):
    shard = load_shard(shard_dir, "train")
    meta = json.loads((shard_dir / "train.json").read_text())
    assert meta == shard.meta
    encoded = [tok.encode(d) for d in docs]
    assert meta["n_docs"] == len(docs)
    assert meta["n_tokens"] == sum(len(e) + 1 for e in encoded)
    assert meta["n_bytes"] == sum(len(d.encode("utf-8")) for d in docs)
    assert (meta["dtype"], meta["bos_id"], meta["vocab_size"], meta["split"]) == ("uint16", 0, 400, "train")
    assert shard.tokens.dtype == np.uint16 and isinstance(shard.tokens, np.memmap)
    assert (shard.tokens[shard.doc_starts] == tok.bos_id).all()
    assert int((np.asarray(shard.tokens) == tok.bos_id).sum()) == len(docs)  # BOS only at starts
    ends = list(shard.doc_starts[1:]) + [meta["n_tokens"]]
    for i in (0, 7, len(docs) - 1):
        ids = shard.tokens[shard.doc_starts[i] + 1 : ends[i]]
        assert ids.tolist() == encoded[i]
        assert tok.decode(ids.tolist()) == docs[i]


def test_documents_and_empty_input(tok, tmp_path):
    meta = write_token_shards([Document("alpha beta", "x"), "", "gamma"], tok, tmp_path, "val")
    assert meta["n_docs"] == 2
    with pytest.raises(DataError, match="no non-empty documents to write for split 'test'"):
        write_token_shards(["", ""], tok, tmp_path, "test")
    assert not list(tmp_path.glob("test*")) and not list(tmp_path.glob(".test*"))


def test_uint32_for_large_vocabularies(tmp_path):
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": len(SPECIAL_TOKENS) + i for i in range(70_000)})
    big = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = LMTokenizer(big)
    meta = write_token_shards(["w69999 w3", "w0"], tok, tmp_path, "train")
    shard = load_shard(tmp_path, "train")
    assert meta["dtype"] == "uint32"
    assert shard.tokens.tolist() == [0, 7 + 69_999, 7 + 3, 0, 7]


def test_loader_rows_start_at_window_starts_and_targets_shift(shard_dir):
    shard = load_shard(shard_dir, "train")
    starts = window_starts(shard, SEQ)
    ends = np.append(shard.doc_starts[1:], shard.n_tokens)
    expected = [int(s) + k for s, e in zip(shard.doc_starts, ends) for k in range(0, int(e - s), SEQ)]
    assert starts.tolist() == [w for w in expected if w + SEQ + 1 <= shard.n_tokens]
    assert any(w not in set(shard.doc_starts.tolist()) for w in expected)  # some long documents

    doc_starts = set(shard.doc_starts.tolist())
    tokens = np.asarray(shard.tokens, dtype=np.int64)
    start_of = {tuple(tokens[w : w + SEQ + 1]): int(w) for w in starts}
    loader = TokenLoader(shard, SEQ, batch_size=8, seed=0)
    bos_rows = 0
    for _ in range(20):
        x, y = next(loader)
        assert x.shape == y.shape == (8, SEQ) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            start = start_of[tuple(row)]  # KeyError: not a BOS-aligned window with its targets
            bos_rows += start in doc_starts
            assert (row[0] == 0) == (start in doc_starts)
    assert 80 < bos_rows < 160  # mostly short documents: most rows begin with BOS, not all


def test_epoch_is_a_permutation_of_windows(shard_dir):
    shard = load_shard(shard_dir, "train")
    loader = TokenLoader(shard, SEQ, batch_size=1, seed=3)
    n = loader.n_windows
    firsts = [next(loader)[0][0, :4].tolist() for _ in range(n)]
    assert loader.state_dict() == {"epoch": 1, "position": 0}
    expected = [shard.tokens[s : s + 4].tolist() for s in window_starts(shard, SEQ)]
    assert sorted(firsts) == sorted(expected) and firsts != expected


def test_determinism_and_seeds(shard_dir):
    shard = load_shard(shard_dir, "train")
    a, b, c = (TokenLoader(shard, SEQ, 4, seed=s) for s in (1, 1, 2))
    for _ in range(3):
        xa, xb, xc = next(a)[0], next(b)[0], next(c)[0]
        assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    seq = TokenLoader(shard, SEQ, 4, seed=1, shuffle=False)
    x, _ = next(seq)
    starts = window_starts(shard, SEQ)[:4]
    assert x.tolist() == [shard.tokens[s : s + SEQ].tolist() for s in starts]


@pytest.mark.parametrize("shuffle", [True, False])
def test_resume_yields_the_uninterrupted_batches(shard_dir, shuffle):
    shard = load_shard(shard_dir, "train")
    batch = 64  # a few batches per epoch, so the stream crosses epoch boundaries
    reference = TokenLoader(shard, SEQ, batch, seed=7, shuffle=shuffle)
    expected = [next(reference) for _ in range(12)]
    first = TokenLoader(shard, SEQ, batch, seed=7, shuffle=shuffle)
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = TokenLoader(shard, SEQ, batch, seed=7, shuffle=shuffle)
    resumed.load_state_dict(state)
    for want in expected[5:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert resumed.state_dict()["epoch"] >= 1
    with pytest.raises(DataError, match="does not fit this shard"):
        resumed.load_state_dict({"epoch": 0, "position": 10**9})


def test_eval_windows_cover_tokens_once_in_order(shard_dir):
    shard = load_shard(shard_dir, "train")
    xs, ys = zip(*iter_eval_windows(shard, SEQ, batch_size=16))
    x, y = torch.cat(xs), torch.cat(ys)
    n = (shard.n_tokens - 1) // SEQ
    assert x.shape == (n, SEQ) and all(b.shape[0] <= 16 for b in xs)
    flat = np.asarray(shard.tokens, dtype=np.int64)
    assert x.flatten().tolist() == flat[: n * SEQ].tolist()
    assert y.flatten().tolist() == flat[1 : n * SEQ + 1].tolist()
    limited = list(iter_eval_windows(shard, SEQ, batch_size=16, max_tokens=5 * SEQ + 3))
    assert sum(b[0].shape[0] for b in limited) == 5


def test_truncated_or_missing_files_are_detected(docs, tok, tmp_path):
    write_token_shards(docs[:20], tok, tmp_path, "train")
    bin_path = tmp_path / "train.bin"
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"train\.bin: truncated or corrupt"):
        load_shard(tmp_path, "train")
    bin_path.unlink()
    with pytest.raises(DataError, match=r"train\.bin: missing token file"):
        load_shard(tmp_path, "train")
    with pytest.raises(DataError, match=r"val\.json: no such shard index"):
        load_shard(tmp_path, "val")


def test_too_short_for_seq_len(tok, tmp_path):
    write_token_shards(["tiny"], tok, tmp_path, "train")
    shard = load_shard(tmp_path, "train")
    with pytest.raises(DataError, match="fewer than seq_len"):
        TokenLoader(shard, 1024, 2, seed=0)
    with pytest.raises(DataError, match="fewer than seq_len"):
        list(iter_eval_windows(shard, 1024, 2))
