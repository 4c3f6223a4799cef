"""Mixture-of-Experts layer against a per-token reference; capacity, aux losses, counts."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import ModelConfig, Transformer
from lmforge.model.moe import MoE


def cfg(**kw):
    base = dict(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_experts=4, experts_top_k=2, d_ff=24)
    base.update(kw)
    return ModelConfig(**base)


def reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Route token by token, the obvious way."""
    h = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        logits = moe.gate(h[t]).float()
        probs = logits.softmax(-1) if moe.gate_type == "softmax" else logits.sigmoid()
        w, idx = probs.topk(moe.top_k)
        w = w / w.sum()
        for wi, e in zip(w, idx):
            out[t] += wi * moe.experts.expert(int(e), h[t : t + 1])[0]
        if moe.shared_expert is not None:
            out[t] += moe.shared_expert(h[t : t + 1])[0]
    return out.view_as(x)


@pytest.mark.parametrize("gate, shared", [("softmax", False), ("sigmoid", True)])
def test_dropless_matches_per_token_reference(gate, shared):
    torch.manual_seed(0)
    m = Transformer(cfg(moe_gate=gate, shared_expert=shared))
    moe = m.model.layers[0].mlp
    x = torch.randn(3, 7, 16)
    assert torch.allclose(moe(x), reference(moe, x), atol=1e-5)
    assert moe.stats["dropped_frac"] == 0.0


def test_capacity_drops_are_counted_and_exact():
    torch.manual_seed(0)
    moe = Transformer(cfg(capacity_factor=0.5)).model.layers[0].mlp
    x = torch.randn(2, 16, 16)
    y = moe(x)
    N, k, E = 32, 2, 4
    cap = math.ceil(0.5 * N * k / E)
    h = x.reshape(-1, 16)
    w, idx = moe.gate(h).float().softmax(-1).topk(k)
    w = w / w.sum(-1, keepdim=True)
    expect, seen, dropped = torch.zeros_like(h), [0] * E, 0
    for t in range(N):  # assignments are served in token order, k per token
        for j in range(k):
            e = int(idx[t, j])
            if seen[e] < cap:
                expect[t] += w[t, j] * moe.experts.expert(e, h[t : t + 1])[0]
            else:
                dropped += 1
            seen[e] += 1
    assert dropped > 0
    assert moe.stats["dropped_frac"] == pytest.approx(dropped / (N * k))
    assert torch.allclose(y.reshape(-1, 16), expect, atol=1e-5)


def test_aux_and_z_loss_closed_form():
    torch.manual_seed(1)
    moe = Transformer(cfg()).model.layers[0].mlp
    x = torch.randn(1, 12, 16)
    moe(x)
    logits = moe.gate(x.reshape(-1, 16)).float()
    probs = logits.softmax(-1)
    idx = probs.topk(2).indices
    f = F.one_hot(idx, 4).sum(1).float().mean(0) / 2
    assert float(moe.aux_loss) == pytest.approx(float(4 * (f * probs.mean(0)).sum()), rel=1e-5)
    assert float(moe.z_loss) == pytest.approx(float(torch.logsumexp(logits, -1).pow(2).mean()), rel=1e-5)


def test_param_counts_total_and_active():
    for shared in (False, True):
        c = cfg(shared_expert=shared)
        m = Transformer(c)
        assert m.num_params() == c.param_count()
        dense_ffn = 3 * c.d_model * c.expert_dim
        assert (
            c.param_count() - c.param_count(active=True)
            == c.n_layers * (c.n_experts - c.experts_top_k) * dense_ffn
        )


def test_router_gets_gradient_from_aux_loss():
    torch.manual_seed(0)
    m = Transformer(cfg())
    x = torch.randint(0, 64, (2, 8))
    loss = m.loss(x[:, :-1], x[:, 1:]) + m.moe_aux_loss()
    loss.backward()
    g = m.model.layers[0].mlp.gate.weight.grad
    assert g is not None and float(g.abs().sum()) > 0


def test_greedy_generation_with_cache_matches_no_cache():
    from lmforge.model.generate import SamplingParams, generate

    torch.manual_seed(0)
    m = Transformer(cfg(max_seq_len=32)).eval()
    p = SamplingParams(max_new_tokens=10, temperature=0)
    assert generate(m, [[1, 2, 3], [4]], p) == generate(m, [[1, 2, 3], [4]], p, use_cache=False)
