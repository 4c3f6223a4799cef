"""GPT-2: learned absolute positions, LayerNorm with bias, a plain GELU (tanh) MLP, biases on
every linear layer, tied embeddings.

GPT-2 checkpoints store `Conv1D` weights, [in, out] (the transpose of `nn.Linear`), and fuse
q/k/v into one `attn.c_attn`; import transposes and splits them into lmforge's names, export
does the reverse. The attention-mask buffers some checkpoints carry (`attn.bias`,
`attn.masked_bias`) are dropped on import. Refused: `scale_attn_by_inverse_layer_idx`,
unscaled attention, cross-attention.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from ...errors import CheckpointError
from ..config import ModelConfig
from .base import Family, Items
from .common import TO_HF_ACTIVATION, activation, config_errors
from .lora_layout import PREFIX, check_patterns, fuse, patterns, split

_LAYER = re.compile(r"^(?:transformer\.)?h\.(\d+)\.(.+)$")
_TOP = {"wte.weight": "model.embed_tokens.weight", "wpe.weight": "model.embed_positions.weight"}
_TOP.update({f"ln_f.{p}": f"model.norm.{p}" for p in ("weight", "bias")})
_SIMPLE = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm"}
_LINEAR = {"attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}


def from_hf(hf: dict, source: str) -> ModelConfig:
    for key, bad in (("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False)):
        if hf.get(key, not bad) == bad:
            raise CheckpointError(f"{source}: gpt2 with {key}={bad} is not supported")
    if hf.get("add_cross_attention"):
        raise CheckpointError(f"{source}: gpt2 with cross-attention is not a causal LM lmforge can train")
    with config_errors(hf, source):
        d = int(hf["n_embd"])
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            d_model=d,
            n_layers=int(hf["n_layer"]),
            n_heads=int(hf["n_head"]),
            d_ff=int(hf.get("n_inner") or 4 * d),
            max_seq_len=int(hf.get("n_positions", 1024)),
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            init_std=float(hf.get("initializer_range", 0.02)),
            activation=activation(hf.get("activation_function", "gelu_new"), source, "activation_function"),
            norm="layer",
            gated_mlp=False,
            bias=True,
            positions="learned",
            hf_type="gpt2",
        )


def to_hf(cfg: ModelConfig) -> dict:
    act = {"gelu_tanh": "gelu_new"}.get(cfg.activation, TO_HF_ACTIVATION[cfg.activation])
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.ff_dim,
        "n_positions": cfg.max_seq_len,
        "layer_norm_epsilon": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "activation_function": act,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
    }


def _layer_in(i: str, rest: str, v: torch.Tensor, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    pre = f"model.layers.{i}"
    mod, _, param = rest.rpartition(".")
    if mod in _SIMPLE:
        yield f"{pre}.{_SIMPLE[mod]}.{param}", v
    elif mod == "attn.c_attn":
        parts = (v.t() if param == "weight" else v).split(cfg.d_model, 0)
        for name, part in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
            yield f"{pre}.self_attn.{name}.{param}", part.contiguous()
    elif mod in _LINEAR:
        yield f"{pre}.{_LINEAR[mod]}.{param}", (v.t().contiguous() if param == "weight" else v)
    elif mod != "attn":  # attn.bias / attn.masked_bias: causal-mask buffers, not weights
        yield f"{pre}.{rest}", v  # unknown: kept, so the shape check names it


def keys_in(items: Items, cfg: ModelConfig, source: str) -> Iterator[tuple[str, torch.Tensor]]:
    for k, v in items:
        m = _LAYER.match(k)
        if m:
            yield from _layer_in(m.group(1), m.group(2), v, cfg)
            continue
        short = k.removeprefix("transformer.")
        yield _TOP.get(short, k), v


def keys_out(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    inv_top = {v: f"transformer.{k}" for k, v in _TOP.items()}
    inv_simple = {v: k for k, v in _SIMPLE.items()}
    inv_lin = {v: k for k, v in _LINEAR.items()}
    out = {}
    for k, v in state.items():
        if k in inv_top:
            out[inv_top[k]] = v
            continue
        m = re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", k)
        if not m:
            out[k] = v
            continue
        i, mod, param = m.groups()
        pre = f"transformer.h.{i}"
        if mod in inv_simple:
            out[f"{pre}.{inv_simple[mod]}.{param}"] = v
        elif mod in inv_lin:
            out[f"{pre}.{inv_lin[mod]}.{param}"] = v.t().contiguous() if param == "weight" else v
        elif mod == "self_attn.q_proj":
            parts = [state[f"model.layers.{i}.self_attn.{n}_proj.{param}"] for n in "qkv"]
            fused = torch.cat(parts, 0)
            out[f"{pre}.attn.c_attn.{param}"] = fused.t().contiguous() if param == "weight" else fused
        elif mod not in ("self_attn.k_proj", "self_attn.v_proj"):
            out[k] = v
    return out


# LoRA module names: lmforge (under model.layers.{i}.) -> GPT-2 (under transformer.h.{i}.)
_LORA = {"self_attn.c_attn": "attn.c_attn", **{v: k for k, v in _LINEAR.items()}}
_QKV = [("q_proj", 0), ("k_proj", 0), ("v_proj", 0)]


def _qkv(cfg: ModelConfig) -> list[tuple[str, int]]:
    return [(n, cfg.d_model) for n, _ in _QKV]


def lora_out(state: dict[str, torch.Tensor], cfg: ModelConfig, s: dict) -> tuple[dict, dict]:
    state, done = fuse(state, _qkv(cfg), "c_attn", s["r"])
    out = {}
    for k, v in state.items():
        m = re.match(rf"^{re.escape(PREFIX)}model\.layers\.(\d+)\.(.+)\.(lora_[AB]\.weight)$", k)
        if m is None or m.group(2) not in _LORA:
            raise CheckpointError(f"LoRA on {k} has no GPT-2 layer to be saved on")
        out[f"{PREFIX}transformer.h.{m.group(1)}.{_LORA[m.group(2)]}.{m.group(3)}"] = v
    targets = sorted({".".join(k.split(".")[-4:-2]) for k in out if ".lora_A." in k})
    extra = patterns({"c_attn": 3} if done else {}, s["r"], s["alpha"], s["use_rslora"])
    return out, {"target_modules": targets, "fan_in_fan_out": True, **extra}


def lora_in(state: dict[str, torch.Tensor], cfg: ModelConfig, acfg: dict, source: str) -> tuple[dict, dict]:
    check_patterns(acfg, {"c_attn": 3}, source)
    back = {v: k for k, v in _LORA.items()}
    renamed = {}
    for k, v in state.items():
        m = re.match(rf"^{re.escape(PREFIX)}transformer\.h\.(\d+)\.(.+)\.(lora_[AB]\.weight)$", k)
        if m is None or m.group(2) not in back:
            raise CheckpointError(f"{source}: adapter tensor {k} is not on a GPT-2 layer lmforge trains")
        renamed[f"{PREFIX}model.layers.{m.group(1)}.{back[m.group(2)]}.{m.group(3)}"] = v
    state = split(renamed, _qkv(cfg), "c_attn", source)
    targets = sorted({k.split(".")[-3] for k in state if ".lora_A." in k})
    return state, {
        **acfg,
        "target_modules": targets,
        "fan_in_fan_out": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


FAMILIES = [Family("gpt2", ("gpt2",), from_hf, to_hf, keys_in, keys_out, lora_out, lora_in)]
