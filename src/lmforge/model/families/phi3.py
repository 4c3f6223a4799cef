"""Phi-3: Llama's block with fused projections.

The checkpoint stores `self_attn.qkv_proj` ([q; k; v] rows) and `mlp.gate_up_proj` ([gate; up]
rows); on import they are split into lmforge's q/k/v and gate/up layers (so LoRA targets and
the serve engine are the same as for Llama), on export fused again. Phi-3's optional sliding
window is the real window. Refused: partial rotary, LongRoPE / SuScaled RoPE (the 128k models).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from ...errors import CheckpointError
from ..config import ModelConfig
from .base import Family, Items
from .common import activation, base_fields, base_hf, config_errors, window_fields, window_hf
from .lora_layout import check_patterns, fuse, patterns, split

_QKV = re.compile(r"^(model\.layers\.\d+\.self_attn)\.qkv_proj\.weight$")
_GATE_UP = re.compile(r"^(model\.layers\.\d+\.mlp)\.gate_up_proj\.weight$")


def from_hf(hf: dict, source: str) -> ModelConfig:
    with config_errors(hf, source):
        return ModelConfig(
            **base_fields(hf, source),
            **window_fields(hf, source),
            d_ff=int(hf["intermediate_size"]),
            activation=activation(hf.get("hidden_act", "silu"), source, "hidden_act"),
            hf_type="phi3",
        )


def to_hf(cfg: ModelConfig) -> dict:
    if cfg.layer_types is not None and "full" in cfg.layer_types:
        raise CheckpointError("Phi-3 slides every layer or none; this model mixes full and sliding layers")
    return {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        **base_hf(cfg),
        "original_max_position_embeddings": cfg.max_seq_len,
        "pad_token_id": None,  # Phi3Config would default to 32000, outside a smaller vocabulary
        **window_hf(cfg),
    }


def keys_in(items: Items, cfg: ModelConfig, source: str) -> Iterator[tuple[str, torch.Tensor]]:
    q, kv, ff = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ff_dim
    for k, v in items:
        m = _QKV.match(k)
        if m:
            if v.shape[0] != q + 2 * kv:
                raise CheckpointError(
                    f"{source}: {k} has {v.shape[0]} rows, config.json implies {q + 2 * kv} (q+k+v)"
                )
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.split([q, kv, kv]), strict=True):
                yield f"{m.group(1)}.{name}.weight", part
            continue
        m = _GATE_UP.match(k)
        if m:
            if v.shape[0] != 2 * ff:
                raise CheckpointError(f"{source}: {k} has {v.shape[0]} rows, config.json implies {2 * ff}")
            gate, up = v.split([ff, ff])
            yield f"{m.group(1)}.gate_proj.weight", gate
            yield f"{m.group(1)}.up_proj.weight", up
            continue
        yield k, v


def keys_out(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.endswith(".self_attn.q_proj.weight"):
            base = k.removesuffix(".q_proj.weight")
            parts = [state[f"{base}.{n}_proj.weight"] for n in "qkv"]
            out[f"{base}.qkv_proj.weight"] = torch.cat(parts, 0)
        elif k.endswith(".mlp.gate_proj.weight"):
            base = k.removesuffix(".gate_proj.weight")
            out[f"{base}.gate_up_proj.weight"] = torch.cat([v, state[f"{base}.up_proj.weight"]], 0)
        elif not k.endswith((".self_attn.k_proj.weight", ".self_attn.v_proj.weight", ".mlp.up_proj.weight")):
            out[k] = v
    return out


def _parts(cfg: ModelConfig) -> dict[str, list[tuple[str, int]]]:
    q, kv, ff = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ff_dim
    return {
        "qkv_proj": [("q_proj", q), ("k_proj", kv), ("v_proj", kv)],
        "gate_up_proj": [("gate_proj", ff), ("up_proj", ff)],
    }


def lora_out(state: dict[str, torch.Tensor], cfg: ModelConfig, s: dict) -> tuple[dict, dict]:
    fused = {}
    for name, parts in _parts(cfg).items():
        state, done = fuse(state, parts, name, s["r"])
        if done:
            fused[name] = len(parts)
    targets = sorted({k.split(".")[-3] for k in state if ".lora_A." in k})
    return state, {"target_modules": targets, **patterns(fused, s["r"], s["alpha"], s["use_rslora"])}


def lora_in(state: dict[str, torch.Tensor], cfg: ModelConfig, acfg: dict, source: str) -> tuple[dict, dict]:
    parts = _parts(cfg)
    check_patterns(acfg, {k: len(v) for k, v in parts.items()}, source)
    for name, p in parts.items():
        state = split(state, p, name, source)
    targets = acfg.get("target_modules") or []
    if isinstance(targets, list):
        targets = [n for t in targets for n in ([x for x, _ in parts[t]] if t in parts else [t])]
    return state, {**acfg, "target_modules": targets, "rank_pattern": {}, "alpha_pattern": {}}


FAMILIES = [Family("phi3", ("phi3",), from_hf, to_hf, keys_in, keys_out, lora_out, lora_in)]
