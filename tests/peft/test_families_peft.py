"""Every model family lmforge imports fine-tunes the same ways: LoRA and QLoRA steps run on an
imported Qwen3 / Gemma / Gemma 2 / Phi-3 / GPT-2, prompt tuning on the RoPE families;
`peft.PeftModel` on the original `transformers` model reproduces the LoRA adapter's logits
(Phi-3 and GPT-2: saved on their fused layers) and, where names match, the prompt-tuning
adapter's; `lmforge merge` output loads in `AutoModelForCausalLM` with the same logits."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.model.hf import load_pretrained
from lmforge.peft.lora import LoraSettings, apply_lora, load_adapter, lora_modules, save_adapter
from lmforge.peft.merge import export_merged
from lmforge.peft.prompt import PromptSettings, PromptTuned
from lmforge.peft.qlora import QLoraSettings, load_quantized
from tests.model.test_families import _hf_model, _ids

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

SAME_NAMES = {"qwen3", "gemma", "gemma2"}


def _step(model, ids) -> float:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    loss = model.loss(ids, torch.roll(ids, -1, 1))
    loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()
    return float(loss)


@pytest.mark.parametrize("kind", ["qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2"])
def test_family_lora_qlora_prompt_and_merge(tmp_path, kind):
    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    ids = _ids(2, 12)
    model = load_pretrained(tmp_path / "hf")
    names = apply_lora(model, LoraSettings(r=4, alpha=8))
    assert names and all("lora" not in n for n in names)
    assert torch.isfinite(torch.tensor(_step(model, ids)))
    assert all(float(m.lora_B.weight.abs().sum()) > 0 for _, m in lora_modules(model))  # gradients flowed
    with torch.no_grad():
        ours = model(ids)
    save_adapter(model, tmp_path / "adapter")
    again = load_pretrained(tmp_path / "hf")  # lmforge reads its adapter back (fused layers split again)
    load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours, atol=1e-5, rtol=1e-5)
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, ours, atol=1e-4, rtol=1e-4)
    export_merged(tmp_path / "hf", tmp_path / "adapter", tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ours, atol=1e-4, rtol=1e-4)
    # QLoRA: the family's checkpoint streams into NF4 and trains
    q = load_quantized(tmp_path / "hf", QLoraSettings(compute_dtype="float32"))
    apply_lora(q, LoraSettings(r=4))
    assert torch.isfinite(torch.tensor(_step(q, ids)))
    if kind in ("gpt2", "gemma3_text"):  # learned positions / two RoPE bases: refused, alternative named
        with pytest.raises(ConfigError, match="sft.method=lora"):
            PromptTuned(load_pretrained(tmp_path / "hf"), 3)
    else:  # prompt tuning: virtual tokens take RoPE positions 0..N-1
        pt = PromptTuned(load_pretrained(tmp_path / "hf"), 3)
        assert torch.isfinite(torch.tensor(_step(pt, ids)))
        if kind in SAME_NAMES:
            peft = pytest.importorskip("peft")
            pt.save_adapter(tmp_path / "pt", settings=PromptSettings(num_virtual_tokens=3, init="random"))
            pm = peft.PeftModel.from_pretrained(_hf_model(kind), tmp_path / "pt").eval()
            with torch.no_grad():
                torch.testing.assert_close(pm(input_ids=ids).logits[:, 3:], pt(ids), atol=1e-4, rtol=1e-4)


def test_fused_layer_adapter_from_peft_is_refused_when_not_splittable(tmp_path):
    """A PEFT LoRA trained on Phi-3's fused qkv_proj mixes q/k/v through its shared rank: no
    exact split form, so loading it names the layer and the way out."""
    from lmforge.errors import CheckpointError

    peft = pytest.importorskip("peft")
    hf = _hf_model("phi3")
    hf.save_pretrained(tmp_path / "hf")
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["qkv_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    pm.save_pretrained(tmp_path / "adapter")
    with pytest.raises(CheckpointError, match=r"qkv_proj LoRA is not block-diagonal.*merge it"):
        load_adapter(load_pretrained(tmp_path / "hf"), tmp_path / "adapter")
