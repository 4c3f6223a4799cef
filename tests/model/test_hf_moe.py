"""MoE models in the Hugging Face layout: lmforge MoE -> Mixtral folder that `transformers`
loads with the same logits (per-expert w1/w2/w3 names, as published Mixtral checkpoints), a
`transformers` Mixtral -> lmforge with the same logits, and MoE variants Mixtral cannot express
saved in lmforge's own layout and refused by export with the feature named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from lmforge.errors import CheckpointError  # noqa: E402
from lmforge.hf_cli import cmd_export  # noqa: E402
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.hf import export_hf, import_hf, iter_weights, load_pretrained, save_pretrained  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


def _moe(**kw) -> Transformer:
    base = dict(
        vocab_size=101,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        moe_d_ff=24,
        max_seq_len=64,
        n_experts=4,
        experts_top_k=2,
        aux_loss_coef=0.02,
        z_loss_coef=0.003,
    )
    base.update(kw)
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**base)).eval()
    with torch.no_grad():  # non-trivial norms; a router spread enough that top-k is not a tie
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    return m


def _ids(v=101):
    return torch.randint(0, v, (2, 19), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tie", [True, False])
def test_moe_exports_as_mixtral_and_transformers_agrees(tmp_path, tie):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    model = _moe(tie_embeddings=tie)
    save_pretrained(model, tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "out", max_shard_size="30KB" if tie else None)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["architectures"] == ["MixtralForCausalLM"]
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["intermediate_size"]) == (4, 2, 24)
    assert cfg["router_aux_loss_coef"] == 0.02 and cfg["output_router_logits"] is True
    keys = set()
    for f in (tmp_path / "out").glob("model*.safetensors"):
        keys |= set(load_file(str(f)))
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert isinstance(hf, MixtralForCausalLM)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=2e-5, rtol=1e-5)
    # ... and back: the exported folder loads in lmforge with the same config and function
    back = load_pretrained(tmp_path / "out")
    assert back.cfg == model.cfg
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), atol=1e-6, rtol=1e-6)


def test_transformers_mixtral_imports(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    c = MixtralConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        router_aux_loss_coef=0.03,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    hf = MixtralForCausalLM(c).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # sharded, per-expert names
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ids = _ids(97)
    with torch.no_grad():
        ref = hf(ids).logits
        ours = load_pretrained(tmp_path / "hf")
        torch.testing.assert_close(ours(ids), ref, atol=2e-5, rtol=1e-5)
    assert (ours.cfg.n_experts, ours.cfg.experts_top_k, ours.cfg.expert_dim) == (4, 2, 40)
    assert ours.cfg.aux_loss_coef == 0.03 and ours.cfg.z_loss_coef == 0.0 and ours.cfg.rope_theta == 5000.0
    rep = import_hf(tmp_path / "hf", tmp_path / "imported")
    assert rep["model_type"] == "mixtral" and rep["params"] == ours.cfg.param_count()
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "imported")(ids), ref, atol=2e-5, rtol=1e-5)
    # streaming reader (QLoRA's path) yields the stacked names
    names = {k: tuple(v.shape) for k, v in iter_weights(tmp_path / "hf")}
    assert names["model.layers.0.mlp.experts.gate_up_proj"] == (4, 80, 32)
    assert names["model.layers.1.mlp.experts.down_proj"] == (4, 32, 40)
    assert not any("block_sparse_moe" in k for k in names)


def test_truncated_experts_are_named(tmp_path):
    save_pretrained(_moe(), tmp_path / "m")
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    del state["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1: expert weights w1/w3 incomplete"):
        load_pretrained(tmp_path / "m")


@pytest.mark.parametrize(
    "kw,feature",
    [
        (dict(moe_gate="sigmoid"), "moe_gate='sigmoid'"),
        (dict(shared_expert=True), "shared_expert"),
        (dict(capacity_factor=1.25), "capacity_factor=1.25"),
        (dict(qkv_bias=True), "qkv_bias"),
    ],
)
def test_unsupported_moe_saved_in_own_layout_and_export_refused(tmp_path, kw, feature, capsys):
    model = _moe(**kw)
    save_pretrained(model, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["model_type"] == "lmforge_moe" and "transformers cannot load" in cfg["_lmforge_note"]
    back = load_pretrained(tmp_path / "ours")  # lmforge itself reads it back exactly
    assert back.cfg == model.cfg
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), atol=0, rtol=0)
    with pytest.raises(CheckpointError, match=feature):
        export_hf(tmp_path / "ours", tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()

    class A:
        model, out, adapter, dtype, shard_size = (
            str(tmp_path / "ours"),
            str(tmp_path / "out2"),
            None,
            None,
            None,
        )

    with pytest.raises(CheckpointError, match="cannot be exported"):
        cmd_export(A)


def test_training_checkpoint_of_moe_loads_as_model_folder(tmp_path):
    """Training checkpoints keep the stacked expert tensors beside a Mixtral config.json."""
    from lmforge.train.checkpoint import save_checkpoint

    model = _moe()
    path = save_checkpoint(tmp_path / "ckpt", 3, model, None, {"step": 3})
    assert json.loads((path / "config.json").read_text())["model_type"] == "mixtral"
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(path)(ids), model(ids), atol=0, rtol=0)
