"""Model: parameter counts, KV-cache equivalence, padding invariance, HF equivalence."""

import pytest
import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.model.generate import SamplingParams, generate, sample_next


def tiny(**kw):
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    base.update(kw)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**base)).eval()


@pytest.mark.parametrize("tie, bias", [(True, False), (False, False), (False, True)])
def test_param_count_matches_modules(tie, bias):
    m = tiny(tie_embeddings=tie, qkv_bias=bias)
    assert m.num_params() == m.cfg.param_count()


def test_flops_per_token_close_to_6n_plus_attention():
    cfg = ModelConfig(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024)
    norms = (2 * cfg.n_layers + 1) * cfg.d_model  # norm gains do no matmul work
    n = cfg.param_count(include_embeddings=False) - norms + cfg.vocab_size * cfg.d_model
    attn = 3 * 4 * cfg.n_layers * 1024 * cfg.d_model
    assert cfg.flops_per_token(1024) == pytest.approx(6 * n + attn, rel=1e-9)


def test_causality():
    m = tiny()
    x = torch.randint(0, 97, (1, 20))
    y = x.clone()
    y[0, 15] = (y[0, 15] + 1) % 97
    a, b = m(x), m(y)
    assert torch.allclose(a[0, :15], b[0, :15], atol=1e-6)
    assert not torch.allclose(a[0, 15:], b[0, 15:], atol=1e-4)


def test_greedy_with_and_without_cache_identical():
    m = tiny()
    prompts = [[5, 6, 7, 8, 9], [1, 2, 3], [42]]
    p = SamplingParams(max_new_tokens=25, temperature=0.0)
    assert generate(m, prompts, p, use_cache=True) == generate(m, prompts, p, use_cache=False)


def test_padded_batch_equals_single_prompts():
    m = tiny()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [1, 2, 3]]
    p = SamplingParams(max_new_tokens=12, temperature=0.0)
    batched = generate(m, prompts, p)
    singles = [generate(m, [q], p)[0] for q in prompts]
    assert batched == singles


def test_sampling_is_seeded_and_stops():
    m = tiny()
    p = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=10, top_p=0.9, seed=3)
    a = generate(m, [[1, 2, 3]], p)
    assert a == generate(m, [[1, 2, 3]], p)
    first = a[0][0]
    stopped = generate(
        m,
        [[1, 2, 3]],
        SamplingParams(
            max_new_tokens=20, temperature=1.0, top_k=10, top_p=0.9, seed=3, stop_token_ids=[first]
        ),
    )
    assert stopped == [[]]


def test_top_k_top_p_filtering():
    logits = torch.tensor([[5.0, 4.0, 3.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, SamplingParams(top_k=2), g)) for _ in range(200)}
    assert picks <= {0, 1} and len(picks) == 2
    picks = {int(sample_next(logits, SamplingParams(top_p=0.5), g)) for _ in range(50)}
    assert picks == {0}


def test_invalid_sampling_values():
    for kw in ({"temperature": -1}, {"top_p": 0}, {"top_k": 0}, {"max_new_tokens": -1}):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


def test_context_overflow_is_an_error():
    m = tiny(max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds the model context"):
        generate(m, [[1] * 10], SamplingParams(max_new_tokens=10))


def test_saved_folder_loads_in_transformers_with_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.model.hf import load_pretrained, save_pretrained

    for bias in (False, True):
        m = tiny(qkv_bias=bias, tie_embeddings=not bias)
        with torch.no_grad():  # non-trivial norm weights and biases
            for _n, p in m.named_parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
        save_pretrained(m, tmp_path / f"m{bias}")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"m{bias}").eval()
        x = torch.randint(0, 97, (2, 17))
        with torch.no_grad():
            ref = hf(x).logits
            assert torch.allclose(m(x), ref, atol=1e-5)
            back = load_pretrained(tmp_path / f"m{bias}")
            assert torch.allclose(back(x), ref, atol=1e-5)


@pytest.mark.parametrize("budget", [None, 1])  # 1 byte: every step runs the chunked head
def test_forward_with_targets_is_the_summed_cross_entropy(monkeypatch, budget):
    """`model(x, targets=y)` equals cross-entropy over the full logits (ignored positions
    included), and so do its gradients, whether the head runs whole or in chunks."""
    import lmforge.model.output as output

    if budget is not None:
        monkeypatch.setattr(output, "LOGITS_BUDGET", budget)
        monkeypatch.setattr(output, "DEFAULT_CHUNK", 5)  # 2 x 16 rows -> 7 chunks, the last short
    m = tiny(tie_embeddings=False).train()
    x = torch.randint(0, 97, (2, 16))
    y = torch.randint(0, 97, (2, 16))
    y[0, :3] = -100
    ref = torch.nn.functional.cross_entropy(m(x).float().flatten(0, 1), y.flatten(), reduction="sum")
    ref_grads = torch.autograd.grad(ref, list(m.parameters()))
    got = m(x, targets=y)
    grads = torch.autograd.grad(got, list(m.parameters()))
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
