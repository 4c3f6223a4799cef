"""The attention entry point: document masks (FlexAttention and dense fallback) agree with each
other and with running each document alone, for logits and gradients; sliding windows follow
the Hugging Face semantics (query i sees key j iff 0 <= i - j < window)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import ModelConfig, Transformer
from lmforge.model.attention import DocumentMask, attend, set_attention_backend, use_flex
from lmforge.model.output import linear_cross_entropy, token_logprobs


def tiny(**kw) -> Transformer:
    base = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    base.update(kw)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**base))


def packed_batch(lengths: list[list[int]], T: int, seed: int = 0):
    """ids, position ids, doc ids (-1 = padding) for rows holding documents of these lengths."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    ids = torch.randint(3, 97, (B, T), generator=g)
    pos = torch.zeros(B, T, dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)
    for b, lens in enumerate(lengths):
        s = 0
        for d, n in enumerate(lens):
            pos[b, s : s + n] = torch.arange(n)
            doc[b, s : s + n] = d
            s += n
        ids[b, s:] = 0
    return ids, pos, doc


def reference_mask(doc: torch.Tensor, window: int | None = None, prefix: int = 0) -> torch.Tensor:
    B, T = doc.shape
    out = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                ok = j <= i and (doc[b, i] == doc[b, j] or j < prefix)
                if window is not None:
                    ok = ok and 0 <= i - j < window
                out[b, 0, i, j] = ok
    return out


@pytest.fixture
def backend():
    old = set_attention_backend("auto")
    yield set_attention_backend
    set_attention_backend(old)


@pytest.mark.parametrize("window, prefix", [(None, 0), (3, 0), (None, 2), (4, 2)])
def test_dense_mask_matches_definition(window, prefix):
    _, _, doc = packed_batch([[3, 4, 2], [6, 3]], 10)
    got = DocumentMask(doc, prefix=prefix).dense(window)
    assert torch.equal(got, reference_mask(doc, window, prefix))


def test_prefix_mask_is_prepended():
    _, _, doc = packed_batch([[2, 3]], 6)
    m = DocumentMask(doc).with_prefix(2)
    assert m.shape == (1, 8) and m.prefix == 2
    want = reference_mask(torch.cat([torch.full((1, 2), -2), doc], 1), prefix=2)
    assert torch.equal(m.dense(), want)


@pytest.mark.parametrize("window", [None, 3])
def test_flex_and_dense_give_same_outputs(backend, window):
    torch.manual_seed(1)
    _, _, doc = packed_batch([[5, 7, 4], [9, 2], [16]], 16)
    q = torch.randn(3, 4, 16, 16)
    k, v = torch.randn(3, 2, 16, 16), torch.randn(3, 2, 16, 16)
    backend("dense")
    dense = attend(q, k, v, DocumentMask(doc), window=window, enable_gqa=True)
    backend("flex")
    with torch.no_grad():  # FlexAttention has no backward on CPU
        assert use_flex(q)
        flex = attend(q, k, v, DocumentMask(doc), window=window, enable_gqa=True)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
    # and the dense path is SDPA with the reference mask
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=reference_mask(doc, window), enable_gqa=True)
    torch.testing.assert_close(dense, ref)


def test_auto_backend_is_dense_on_cpu(backend):
    assert not use_flex(torch.zeros(1, 1, 2, 8))


def test_packed_logits_and_grads_equal_documents_alone():
    """fp32: a packed row's logits per document equal that document run alone, and the gradient
    of the summed loss equals the sum of the per-document gradients."""
    model = tiny()
    lengths = [[6, 9, 5], [12, 7]]
    T = 20
    ids, pos, doc = packed_batch(lengths, T)
    targets = torch.roll(ids, -1, dims=1)
    logits = model(ids, position_ids=pos, attn_mask=DocumentMask(doc))
    loss = 0.0
    for b, lens in enumerate(lengths):
        s = 0
        for n in lens:
            loss = loss + F.cross_entropy(
                logits[b, s : s + n - 1], targets[b, s : s + n - 1], reduction="sum"
            )
            s += n
    loss.backward()
    packed_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    total = 0.0
    for b, lens in enumerate(lengths):
        s = 0
        for n in lens:
            alone = model(ids[b : b + 1, s : s + n])
            torch.testing.assert_close(logits[b, s : s + n], alone[0], atol=1e-5, rtol=1e-5)
            total = total + F.cross_entropy(alone[0, :-1], ids[b, s + 1 : s + n], reduction="sum")
            s += n
    total.backward()
    torch.testing.assert_close(loss, total, atol=1e-4, rtol=1e-6)
    for k, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[k], p.grad, atol=1e-5, rtol=1e-4, msg=k)


def test_model_logits_same_under_flex_and_dense(backend):
    model = tiny().eval()
    ids, pos, doc = packed_batch([[6, 9, 5], [12, 8]], 20)
    with torch.no_grad():
        backend("dense")
        dense = model(ids, position_ids=pos, attn_mask=DocumentMask(doc))
        backend("flex")
        flex = model(ids, position_ids=pos, attn_mask=DocumentMask(doc))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_sliding_window_without_documents_matches_reference():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    got = attend(q, k, v, None, window=3)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=reference_mask(torch.zeros(2, 9), 3))
    torch.testing.assert_close(got, ref)
    # a window as long as the sequence is plain causal attention
    torch.testing.assert_close(attend(q, k, v, None, window=9), attend(q, k, v, None))
    # one query against 9 cached keys sees only the last 3
    last = attend(q[:, :, -1:], k, v, None, window=3)
    torch.testing.assert_close(last, ref[:, :, -1:])


@pytest.mark.parametrize("n", [7, 40])
def test_chunked_cross_entropy_equals_plain(n):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    h = torch.randn(n, 16, requires_grad=True)
    t = torch.randint(0, 50, (n,))
    plain = F.cross_entropy(head(h).float(), t, reduction="sum")
    gh, gw = torch.autograd.grad(plain, (h, head.weight))
    chunked = linear_cross_entropy(h, head, t, chunk=8)
    ch, cw = torch.autograd.grad(chunked, (h, head.weight))
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(ch, gh)
    torch.testing.assert_close(cw, gw)
    with torch.no_grad():
        lp = token_logprobs(h, head, t, chunk=8)
    torch.testing.assert_close(lp, torch.log_softmax(head(h), -1).gather(1, t[:, None]).squeeze(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's compiled kernels need CUDA")
def test_flex_on_cuda_matches_dense_logits_and_grads(backend):
    model = tiny(max_seq_len=256).cuda()
    ids, pos, doc = packed_batch([[60, 90, 50], [128, 72]], 256)
    ids, pos, doc = ids.cuda(), pos.cuda(), doc.cuda()
    out = {}
    for name in ("dense", "flex"):
        backend(name)
        model.zero_grad()
        logits = model(ids, position_ids=pos, attn_mask=DocumentMask(doc))
        logits.float().square().mean().backward()
        out[name] = (logits.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(out["flex"][0], out["dense"][0], atol=2e-3, rtol=2e-3)
    for a, b in zip(out["flex"][1], out["dense"][1]):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
