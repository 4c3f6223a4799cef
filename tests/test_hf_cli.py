"""`lmforge import / export / merge` argument handling and errors (wired by the main CLI)."""

from __future__ import annotations

import argparse

import pytest
import torch

from lmforge.errors import CheckpointError
from lmforge.hf_cli import add_parser
from lmforge.model.config import ModelConfig
from lmforge.model.hf import load_pretrained, save_pretrained
from lmforge.model.transformer import Transformer
from lmforge.peft.lora import LoraSettings, apply_lora, save_adapter
from lmforge.peft.prompt import PromptTuned


def _cli(*argv) -> int:
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="command"))
    a = p.parse_args([str(x) for x in argv])
    return a.func(a)


def test_import_export_merge_roundtrip(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)
    model = Transformer(cfg)
    save_pretrained(model, tmp_path / "base")
    assert _cli("import", tmp_path / "base", tmp_path / "imp", "--shard-size", "10KB") == 0
    assert (tmp_path / "imp" / "model.safetensors.index.json").exists()
    assert '"model_type": "llama"' in capsys.readouterr().out
    assert _cli("export", tmp_path / "imp", tmp_path / "exp", "--dtype", "bfloat16") == 0
    apply_lora(model, LoraSettings(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.weight.fill_(0.1)
    save_adapter(model, tmp_path / "ad")
    assert _cli("merge", tmp_path / "base", tmp_path / "ad", tmp_path / "merged") == 0
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(
            load_pretrained(tmp_path / "merged")(ids), model(ids), atol=1e-5, rtol=1e-5
        )
    PromptTuned(Transformer(cfg), 2).save_adapter(tmp_path / "pt")
    with pytest.raises(CheckpointError, match="PROMPT_TUNING adapter cannot be merged"):
        _cli("merge", tmp_path / "base", tmp_path / "pt", tmp_path / "m2")
    with pytest.raises(CheckpointError, match="config.json"):
        _cli("import", tmp_path / "ad", tmp_path / "x")


def test_import_and_export_adapter_of_a_fused_family(tmp_path, capsys):
    """`lmforge import` of a GPT-2 checkpoint, then `export --adapter` merges a LoRA trained on the
    split q/k/v into the fused Conv1D layout `transformers` loads."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    hf.save_pretrained(tmp_path / "hf")
    assert _cli("import", tmp_path / "hf", tmp_path / "imp") == 0
    assert '"model_type": "gpt2"' in capsys.readouterr().out
    model = load_pretrained(tmp_path / "imp")
    apply_lora(model, LoraSettings(r=2, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    save_adapter(model, tmp_path / "ad")
    assert _cli("export", tmp_path / "imp", tmp_path / "out", "--adapter", tmp_path / "ad") == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids), atol=1e-5, rtol=1e-5)
