"""QLoRA: NF4 + double quantisation matches the reference quantisers, stays small, trains only
the adapters, and merges into a dense model with the same function."""

from __future__ import annotations

import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.model.hf import load_pretrained, save_pretrained
from lmforge.model.transformer import Transformer
from lmforge.peft.lora import LoraSettings, apply_lora, load_adapter, merge_lora, save_adapter
from lmforge.peft.qlora import NF4Linear, QLoraSettings, dequantize_model, load_quantized, nf4_bytes

CFG = ModelConfig(
    vocab_size=128,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    d_ff=128,
    max_seq_len=64,
    qkv_bias=True,
    tie_embeddings=False,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("base")
    save_pretrained(Transformer(CFG), d)
    return d


@pytest.mark.parametrize("backend", ["torchao", "bitsandbytes"])
def test_nf4_matches_reference_quantiser(backend):
    pytest.importorskip({"torchao": "torchao", "bitsandbytes": "bitsandbytes"}[backend])
    torch.manual_seed(0)
    w = torch.randn(256, 128) * 0.02
    layer = NF4Linear(w, None, torch.float32, backend)
    deq = layer.dequantize()
    if backend == "torchao":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

        ref = NF4Tensor.from_tensor(w, 64, 256).get_original_weight()
    else:
        import bitsandbytes.functional as bf

        q, st = bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        ref = bf.dequantize_4bit(q, st)
    torch.testing.assert_close(deq, ref.float(), atol=1e-6, rtol=0)
    rel = (deq - w).abs().mean() / w.abs().mean()
    assert rel < 0.12  # 4-bit: ~8% mean relative error on Gaussian weights
    bits = 8 * nf4_bytes(layer) / w.numel()
    assert 4.0 < bits < 4.6, bits
    # gradient w.r.t. the input is exact for the dequantised weight; the weight gets none
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ deq.t()).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)


def test_qlora_model_trains_adapters_and_merges(base_dir, tmp_path):
    pytest.importorskip("torchao")
    full = load_pretrained(base_dir)
    q = load_quantized(base_dir, QLoraSettings(compute_dtype="bfloat16"))
    assert sum(isinstance(m, NF4Linear) for m in q.modules()) == 2 * 7
    assert q.lm_head.weight.dtype == torch.bfloat16 and not q.lm_head.weight.requires_grad
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = full(ids), q(ids).float()
    assert (got - ref).abs().mean() / ref.abs().mean() < 0.15
    apply_lora(q, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    trainable = [p for p in q.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    before = {n: b.clone() for n, b in q.named_buffers() if n.endswith("qweight")}
    losses = []
    for _ in range(6):
        loss = q.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[n], b) for n, b in q.named_buffers() if n in before)
    with torch.no_grad():
        adapted = q(ids).float()
    save_adapter(q, tmp_path / "adapter")
    merged = dequantize_model(merge_lora(q), torch.float32)
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted, atol=0.05, rtol=0.05)
    # the adapter also applies to the full-precision base (the usual QLoRA deployment)
    fp = load_pretrained(base_dir)
    load_adapter(fp, tmp_path / "adapter")
    with torch.no_grad():
        assert (fp(ids) - adapted).abs().mean() / adapted.abs().mean() < 0.15


def test_qlora_quantises_mixtral_experts_and_trains_expert_lora(tmp_path):
    from lmforge.peft.qlora import NF4Experts

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=101, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64
    )
    cfg = cfg.model_copy(update=dict(n_experts=4, experts_top_k=2))
    save_pretrained(Transformer(cfg), tmp_path / "moe")
    s = QLoraSettings(compute_dtype="float32")
    q = load_quantized(tmp_path / "moe", s)
    assert all(isinstance(layer.mlp.experts, NF4Experts) for layer in q.model.layers)
    dense_expert_bytes = 2 * 4 * 3 * 64 * 64 * 4  # layers * experts * (gate, up, down) * fp32
    assert nf4_bytes(q) > 0.8 * dense_expert_bytes / 8  # the experts are in there, at ~4 bits
    ids = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(1))
    ref = dequantize_model(load_quantized(tmp_path / "moe", s))
    with torch.no_grad():
        torch.testing.assert_close(q(ids), ref(ids), atol=1e-5, rtol=1e-5)
    apply_lora(q, LoraSettings(r=2, target_modules=["q_proj", "w1", "w2", "w3"]))
    q.train()
    opt = torch.optim.AdamW([p for p in q.parameters() if p.requires_grad], lr=1e-2)
    targets = torch.roll(ids, -1, 1)
    losses = []
    for _ in range(3):
        loss = q.loss(ids, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    q.eval()
    with torch.no_grad():
        want = q(ids)
        merged = dequantize_model(merge_lora(q))
        torch.testing.assert_close(merged(ids), want, atol=1e-4, rtol=1e-4)


def test_qlora_shape_problem_named_before_loading(tmp_path):
    from lmforge.errors import ConfigError
    from lmforge.peft.qlora import check_quantizable

    cfg = ModelConfig(
        vocab_size=101, d_model=40, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32
    )
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight .*sft\.method=lora"):
        check_quantizable(cfg)
    save_pretrained(Transformer(cfg), tmp_path / "odd")
    with pytest.raises(ConfigError, match="k_proj"):
        load_quantized(tmp_path / "odd", QLoraSettings())


def test_qlora_expert_coverage_counts_each_weight_once(tmp_path):
    """On a 4-bit Mixtral the per-expert NF4 matrices are neither LoRA targets of their own nor
    counted twice: attention-only targets warn, attention + w1/w2/w3 do not."""
    import warnings

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=101, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32
    )
    save_pretrained(Transformer(cfg.model_copy(update=dict(n_experts=4, experts_top_k=2))), tmp_path / "moe")
    for targets, warns in ((["q_proj", "v_proj"], True), (["q_proj", "v_proj", "w1", "w2", "w3"], False)):
        q = load_quantized(tmp_path / "moe", QLoraSettings(compute_dtype="float32"))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            names = apply_lora(q, LoraSettings(r=2, target_modules=targets))
        assert not any(".experts." in n for n in names)
        assert any("LoRA targets cover" in str(x.message) for x in w) == warns
    with pytest.warns(UserWarning, match="cover"):
        apply_lora(
            load_quantized(tmp_path / "moe", QLoraSettings(compute_dtype="float32")),
            LoraSettings(target_modules=".*q_proj"),
        )
