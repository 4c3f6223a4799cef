"""Log-likelihood scoring against `transformers` on a random HF Llama, rolling windows, batching,
and refusing a tokenizer that does not belong to the checkpoint."""

import math

import pytest
import torch

from lmforge.errors import CheckpointError, DataError
from lmforge.eval.loglik import Scorer, rolling_windows
from lmforge.eval.perplexity import document_metrics
from lmforge.serve.loading import load_model_and_tokenizer
from tests.factories import PARAGRAPH, tiny_model, tiny_tokenizer

REQUESTS = [
    ("The quick brown", " fox"),
    ("A list is ", "a mutable sequence of items"),  # trailing space moves to the continuation
    ("", "Return the sum of the numbers"),  # empty context -> prefix token
    ("Question: what is two plus two? Answer:" * 4, " four."),  # longer than the context: cut left
    ("The function returns", " None when the key is missing."),
    ("The function returns", " None when the key is missing."),  # duplicate: scored once
    ("apple river", " stone cloud music"),
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    tok = tiny_tokenizer()
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=48,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("hf_llama")
    hf.save_pretrained(d)
    tok.save(d)
    return hf, d


def _reference(hf, pairs, max_len):
    out = []
    for ctx, cont in pairs:
        full = (ctx + cont)[-(max_len + 1) :]
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([full[:-1]])).logits[0].float(), -1)
        L, n = len(full) - 1, len(cont)
        rows = logp[L - n : L]
        lp = float(rows.gather(1, torch.tensor(cont)[:, None]).double().sum())
        out.append((lp, bool((rows.argmax(-1) == torch.tensor(cont)).all())))
    return out


@pytest.mark.parametrize("add_bos", [True, False])
def test_loglikelihoods_equal_transformers(hf_pair, add_bos):
    hf, d = hf_pair
    model, tok = load_model_and_tokenizer(d)
    sc = Scorer(model, tok, add_bos=add_bos, batch_tokens=100)  # small budget: several batches
    pairs = [sc.encode_pair(c, x) for c, x in REQUESTS]
    got = sc.score(pairs)
    ref = _reference(hf, pairs, model.cfg.max_seq_len)
    for (g, gg), (r, rg) in zip(got, ref):
        assert abs(g - r) < 1e-5
        assert gg == rg
    assert sc.stats.unique == len(REQUESTS) - 1 and sc.stats.truncated >= 1
    # the scores do not depend on how requests were batched
    again = Scorer(model, tok, add_bos=add_bos, batch_tokens=10_000, max_batch=3).score(pairs)
    assert max(abs(a[0] - b[0]) for a, b in zip(got, again)) < 1e-5


def test_encode_pair_follows_harness_rules():
    tok = tiny_tokenizer()
    sc = Scorer(tiny_model(tok.vocab_size), tok, add_bos=False)
    ctx, cont = sc.encode_pair("A list is ", "a mutable")
    assert ctx == tok.encode("A list is") and ctx + cont == tok.encode("A list is a mutable")
    ctx, cont = sc.encode_pair("", "apple")
    assert ctx == [tok.bos_id] and cont == tok.encode("apple")
    sc_bos = Scorer(tiny_model(tok.vocab_size), tok, add_bos=True)
    assert sc_bos.encode_pair("apple", " river")[0] == [tok.bos_id] + tok.encode("apple")


def test_rolling_windows_predict_every_token_once():
    toks = list(range(100, 150))
    for context_len in (1, 4, 16):
        wins = list(rolling_windows(toks, 0, 16, context_len))
        assert [t for _, c in wins for t in c] == toks
        for ctx, cont in wins:
            assert len(ctx) + len(cont) <= 17
        for ctx, cont in wins[1:]:
            assert len(ctx) >= min(context_len, 16)  # at least the requested context
        ctx, cont = wins[-1]
        assert len(ctx) + len(cont) == 17  # the last window has a full context
    assert list(rolling_windows([], 0, 16)) == []


def test_rolling_equals_single_pass_when_document_fits():
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size, max_seq_len=64)
    sc = Scorer(model, tok)
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text)
    assert len(ids) < 64
    (rolled,) = sc.loglikelihood_rolling([text])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([[tok.bos_id] + ids[:-1]]))[0].float(), -1)
    assert abs(rolled - float(logp.gather(1, torch.tensor(ids)[:, None]).sum())) < 1e-4
    # a long document: windows of a short-context scorer cover it; sliding windows see more context
    long_text = PARAGRAPH * 2
    short = Scorer(model, tok, max_len=16)
    n = len(tok.encode(long_text))
    m1 = document_metrics(short, [long_text], context_len=1)
    m8 = document_metrics(short, [long_text], context_len=8)
    assert m1["tokens"] == m8["tokens"] == n
    assert m1["words"] == len(long_text.split())
    assert math.isclose(m1["bpb"] * math.log(2) * m1["bytes"], m1["loss"] * n, rel_tol=1e-9)
    assert m1["loss"] != m8["loss"]


def test_mismatched_tokenizer_is_refused(hf_pair, tmp_path):
    _, d = hf_pair
    big = tiny_tokenizer(vocab_size=600, extra=["other words entirely " * 50, "zebra quantum lattice " * 50])
    big.save(tmp_path / "tok")
    with pytest.raises(CheckpointError, match="do not belong together"):
        load_model_and_tokenizer(d, tmp_path / "tok")
    model, tok = load_model_and_tokenizer(d)
    sc = Scorer(model, tok)
    with pytest.raises(DataError, match="does not belong to this checkpoint"):
        sc.score([([1, 2], [model.cfg.vocab_size + 3])])
    with pytest.raises(DataError, match="longer than the model context"):
        sc.score([([1], list(range(10, 10 + model.cfg.max_seq_len + 1)))])


def _choices(vocab, seed=0):
    """Multiple-choice-like requests: 6 contexts x 4 continuations of 1-5 tokens (one context
    long enough to be cut), plus unshared ones."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for k in range(6):
        ctx = torch.randint(1, vocab, (60 if k == 0 else 5 + 3 * k,), generator=g).tolist()
        for n in (1, 3, 1, 5):
            pairs.append((ctx, torch.randint(1, vocab, (n,), generator=g).tolist()))
    pairs += [(torch.randint(1, vocab, (7,), generator=g).tolist(), [5, 6])]
    return pairs


def _with_greedy(model, pairs):
    ctx = pairs[4][0]  # a short shared context: its greedy next token as one more choice
    with torch.no_grad():
        nxt = int(model(torch.tensor([ctx]))[0, -1].argmax())
    return [*pairs, (ctx, [nxt])]


@pytest.mark.parametrize("max_len", [48, 14])  # 14: a context's choices need several rows
def test_shared_context_rows_score_like_one_row_per_request(max_len):
    """Choices that share a context share one row (the context once, each continuation a segment
    seeing the context and itself): same log-likelihoods and greedy flags as scoring each
    request alone (the model's own forward, no batching), fewer tokens fed."""
    model = tiny_model(97, max_seq_len=64)
    pairs = _with_greedy(model, _choices(97))
    alone = [Scorer(model, max_len=max_len, share_context=False, max_batch=1).score([p])[0] for p in pairs]
    shared = Scorer(model, max_len=max_len, batch_tokens=64, max_batch=4)
    got = shared.score(pairs)
    unshared = Scorer(model, max_len=max_len, batch_tokens=64, max_batch=4, share_context=False)
    base = unshared.score(pairs)
    for (a, ga), (b, gb), (c, gc) in zip(alone, got, base, strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-4) and gb == ga
        assert c == pytest.approx(a, rel=1e-5, abs=1e-4) and gc == ga
    assert shared.stats.tokens < unshared.stats.tokens  # the contexts ran once per row
    assert got[-1][1]  # the model's own greedy token after a shared context
