"""LoRA / DoRA: PEFT-format adapters that `peft` loads onto the exported HF model with the same
logits; merge / unmerge agree; wrong adapters fail loudly."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import CheckpointError, ConfigError
from lmforge.model.config import ModelConfig
from lmforge.model.hf import export_hf, load_pretrained, save_pretrained
from lmforge.model.transformer import Transformer
from lmforge.peft.lora import (
    LoraLinear,
    LoraSettings,
    apply_lora,
    load_adapter,
    merge_lora,
    save_adapter,
    set_merged,
    trainable_summary,
)
from lmforge.peft.merge import export_merged

CFG = dict(vocab_size=101, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=64)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


def _model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**CFG, **kw})).eval()


def _randomise_adapter(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def _ids(seed=3):
    return torch.randint(0, CFG["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(seed))


def test_lora_starts_at_base_and_only_adapters_train():
    model = _model()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
    names = apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref)  # B = 0 at init
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    s = trainable_summary(model)
    assert s["trainable_params"] == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    assert s["optimizer_state_bytes"] == 8 * s["trainable_params"]
    regex = apply_lora(_model(), LoraSettings(target_modules=r".*layers\.1\.mlp\.(up|down)_proj"))
    assert regex == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(ConfigError, match="matched no linear"):
        apply_lora(_model(), LoraSettings(target_modules=["query"]))


@pytest.mark.parametrize(
    "settings",
    [
        LoraSettings(
            r=4,
            alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
        LoraSettings(r=8, alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"]),
        LoraSettings(r=4, alpha=16, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    ],
    ids=["all-linear", "rslora", "dora"],
)
def test_merge_unmerge_and_peft_equivalence(tmp_path, settings):
    model = _model(qkv_bias=settings.use_dora)  # DoRA case also covers q/k/v biases (Qwen2)
    save_pretrained(model, tmp_path / "base")
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, settings)
    _randomise_adapter(model)
    ids = _ids()
    with torch.no_grad():
        lora_logits = model(ids)
        set_merged(model, True)
        merged_logits = model(ids)
        set_merged(model, False)
        again = model(ids)
    torch.testing.assert_close(merged_logits, lora_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, lora_logits, atol=1e-6, rtol=1e-6)
    for k, v in model.state_dict().items():  # unmerge restored the base weights
        base_key = k.replace(".base_layer", "")
        if base_key in orig and ".lora_" not in k:
            torch.testing.assert_close(v, orig[base_key], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(lora_logits, orig_logits(tmp_path / "base", ids), atol=1e-3)

    save_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == settings.r and cfg["use_dora"] == settings.use_dora

    # reload into a fresh lmforge model
    fresh = load_pretrained(tmp_path / "base")
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), lora_logits, atol=1e-6, rtol=1e-6)

    # peft on the HF export reproduces lmforge's logits
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    export_hf(tmp_path / "base", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, lora_logits, atol=1e-5, rtol=1e-5)

    # export with the adapter merged: a plain HF model with the same logits
    export_merged(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    hm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hm(ids).logits, lora_logits, atol=1e-5, rtol=1e-5)


def orig_logits(folder, ids):
    with torch.no_grad():
        return load_pretrained(folder)(ids)


def test_merge_lora_gives_plain_model():
    model = _model()
    apply_lora(model, LoraSettings(r=2, target_modules=["o_proj"]))
    _randomise_adapter(model)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
    plain = merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())
    assert set(plain.state_dict()) == set(_model().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), ref, atol=1e-5, rtol=1e-5)


def test_adapter_for_other_base_model_is_refused(tmp_path):
    model = _model()
    apply_lora(model, LoraSettings(r=4, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    other = _model(d_model=128, n_heads=4)
    with pytest.raises(
        CheckpointError, match=r"q_proj\.lora_A\.weight has shape \(4, 64\).*\(4, 128\).*different base"
    ):
        load_adapter(other, tmp_path / "a")
    deeper = _model(n_layers=3)
    with pytest.raises(CheckpointError, match="missing.*layers.2"):
        load_adapter(deeper, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(cfg, rank_pattern={"q_proj": 2})))
    with pytest.raises(CheckpointError, match="rank_pattern"):
        load_adapter(_model(), tmp_path / "a")


def test_lora_on_bf16_base_trains_fp32_adapters():
    model = _model().to(torch.bfloat16)
    apply_lora(model, LoraSettings(r=4, target_modules=["q_proj", "down_proj"], use_dora=True))
    ids = _ids()
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads.values())
    plain = merge_lora(model)
    assert plain.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
