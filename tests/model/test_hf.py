"""Hugging Face interop: tiny random Llama / Qwen2 / Mistral models built with `transformers`
(no download) must give the same logits in lmforge, and lmforge models must load back into
`transformers` with the same logits."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.errors import CheckpointError  # noqa: E402
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.hf import export_hf, import_hf, load_pretrained, save_pretrained  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402

SHAPE = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


def _hf_model(kind: str, tie: bool = False):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    cls, cfg_cls = {
        "llama": (LlamaForCausalLM, LlamaConfig),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config),
        "mistral": (MistralForCausalLM, MistralConfig),
    }[kind]
    extra = {"sliding_window": None} if kind == "mistral" else {}
    cfg = cfg_cls(**SHAPE, tie_word_embeddings=tie, rope_theta=5000.0, rms_norm_eps=1e-5, **extra)
    torch.manual_seed(0)
    m = cls(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise them so they are tested
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return m


def _ids(b=2, t=23, v=97, seed=1):
    return torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "kind,tie,shard", [("llama", False, None), ("qwen2", True, "20KB"), ("mistral", False, "30KB")]
)
def test_import_matches_transformers_logits(tmp_path, kind, tie, shard):
    hf = _hf_model(kind, tie)
    hf.save_pretrained(tmp_path / "hf", **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        ours = load_pretrained(tmp_path / "hf")(ids)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # `lmforge import` writes an lmforge folder with the same function
    rep = import_hf(tmp_path / "hf", tmp_path / "imported")
    assert rep["model_type"] == kind
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "imported")(ids), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qkv_bias,tie", [(False, True), (True, False)])
def test_export_loads_in_transformers(tmp_path, qkv_bias, tie):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=101,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=96,
        max_seq_len=64,
        qkv_bias=qkv_bias,
        tie_embeddings=tie,
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    save_pretrained(model, tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "out", max_shard_size="40KB")
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = _ids(v=101)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=1e-5)
    # bf16 export halves the files and still loads
    export_hf(tmp_path / "ours", tmp_path / "bf16", dtype="bfloat16", max_shard_size=None)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_pretrained(tmp_path / "bf16").model.embed_tokens.weight.dtype == torch.float32


def test_missing_shard_is_named(tmp_path):
    _hf_model("llama").save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=shards[1].name):
        load_pretrained(tmp_path / "hf")


def test_unsupported_and_mismatched_checkpoints(tmp_path):
    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    bad = dict(cfg, rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5})
    (tmp_path / "hf" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="llama3"):
        load_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=128)))
    with pytest.raises(CheckpointError, match="mlp.*shape"):
        load_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(cfg, model_type="no_such_model")))
    with pytest.raises(CheckpointError, match="no_such_model"):
        load_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    with pytest.raises(CheckpointError, match="missing key 'n_embd'"):
        load_pretrained(tmp_path / "hf")
