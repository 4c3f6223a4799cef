"""Qwen3: Llama plus an RMSNorm on every query and key head (before RoPE), and a head width
that is set on its own (`head_dim`, e.g. 128 for a 1024-wide model with 16 heads).

Weight names are lmforge's (`self_attn.q_norm.weight`, `self_attn.k_norm.weight`).
Refused: `attention_bias` (Qwen3 would put it on the output projection too).
"""

from __future__ import annotations

from ...errors import CheckpointError
from ..config import ModelConfig
from .base import Family
from .common import activation, base_fields, base_hf, config_errors, window_fields, window_hf


def from_hf(hf: dict, source: str) -> ModelConfig:
    if hf.get("attention_bias"):
        raise CheckpointError(f"{source}: qwen3 with attention_bias=true is not supported")
    with config_errors(hf, source):
        return ModelConfig(
            **base_fields(hf, source),
            **window_fields(hf, source, enabled=bool(hf.get("use_sliding_window"))),
            d_ff=int(hf["intermediate_size"]),
            activation=activation(hf.get("hidden_act", "silu"), source, "hidden_act"),
            qk_norm=True,
            hf_type="qwen3",
        )


def to_hf(cfg: ModelConfig) -> dict:
    win = window_hf(cfg)
    if cfg.sliding_window and cfg.layer_types is None:
        win["layer_types"] = ["sliding_attention"] * cfg.n_layers
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        **base_hf(cfg),
        "attention_bias": False,
        "use_sliding_window": bool(cfg.sliding_window),
        "max_window_layers": 0 if cfg.sliding_window else cfg.n_layers,
        **win,
    }


FAMILIES = [Family("qwen3", ("qwen3",), from_hf, to_hf)]
