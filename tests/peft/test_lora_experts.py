"""LoRA on Mixtral experts: w1/w2/w3 adapt the stacked expert tensors per expert, the adapter is
one `peft.PeftModel.from_pretrained` reproduces on the `transformers` Mixtral, merging folds it
in exactly, and attention-only targets on an MoE warn that the experts stay untouched."""

from __future__ import annotations

import warnings

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.model.config import ModelConfig
from lmforge.model.hf import export_hf, load_pretrained, save_pretrained
from lmforge.model.transformer import Transformer
from lmforge.peft.lora import LoraSettings, apply_lora, load_adapter, merge_lora, save_adapter
from lmforge.peft.lora_experts import LoraExperts
from lmforge.peft.merge import export_merged

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = dict(vocab_size=101, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)


def _mixtral() -> Transformer:
    torch.manual_seed(0)
    return Transformer(
        ModelConfig(**CFG, n_experts=4, experts_top_k=2, aux_loss_coef=0.0, z_loss_coef=0.0)
    ).eval()


def _randomise_lora(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.05)


def _ids():
    return torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(2))


def test_expert_lora_changes_experts_and_matches_manual_delta():
    model = _mixtral()
    names = apply_lora(model, LoraSettings(r=2, alpha=4, target_modules=["w1", "w2", "w3"]))
    assert names == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    lx = model.model.layers[0].mlp.experts
    assert isinstance(lx, LoraExperts) and lx.params == ["gate_up_proj", "down_proj"]
    _randomise_lora(model)
    x = torch.randn(5, 64)
    w = lx.base_layer.gate_up_proj[1] + 2.0 * lx.lora_B["gate_up_proj"][1] @ lx.lora_A["gate_up_proj"][1]
    torch.testing.assert_close(lx.gate_up(1, x), x @ w.T, atol=1e-5, rtol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(ConfigError, match="w1 and w3"):
        apply_lora(_mixtral(), LoraSettings(target_modules=["w1"]))
    with pytest.raises(ConfigError, match="dropout"):
        apply_lora(_mixtral(), LoraSettings(target_modules=["w1", "w3"], dropout=0.1))


def test_attention_only_targets_on_moe_warn():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        apply_lora(_mixtral(), LoraSettings(target_modules=["q_proj", "v_proj"]))
    assert any("w1, w2, w3" in str(x.message) for x in w)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        apply_lora(
            _mixtral(),
            LoraSettings(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]),
        )
    assert not [x for x in w if "LoRA targets cover" in str(x.message)]


def test_peft_loads_expert_adapter_and_merge_matches(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = _mixtral()
    save_pretrained(base, tmp_path / "base")
    model = load_pretrained(tmp_path / "base")
    apply_lora(model, LoraSettings(r=2, alpha=4, target_modules=["q_proj", "w1", "w2", "w3"]))
    _randomise_lora(model)
    ids = _ids()
    with torch.no_grad():
        ours = model(ids)
    save_adapter(model, tmp_path / "adapter")
    # lmforge reloads its own adapter
    again = load_pretrained(tmp_path / "base")
    load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours, atol=1e-5, rtol=1e-5)
    # PEFT on the transformers Mixtral reproduces the logits
    export_hf(tmp_path / "base", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, ours, atol=1e-4, rtol=1e-4)
    # merged: lmforge's merge and the exported folder agree
    with torch.no_grad():
        torch.testing.assert_close(merge_lora(again)(ids), ours, atol=1e-5, rtol=1e-5)
    export_merged(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ids).logits, ours, atol=1e-4, rtol=1e-4)
