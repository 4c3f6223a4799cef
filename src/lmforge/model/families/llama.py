"""Llama, Mistral and Qwen2: the families lmforge's decoder and weight names were built on.

Written back as Llama, as Qwen2 when q/k/v have biases, and as Mistral when every layer has a
sliding window. Refused: biases on a Llama, activations other than SiLU, RoPE scaling.
"""

from __future__ import annotations

from ...errors import CheckpointError
from ..config import ModelConfig
from .base import Family
from .common import base_fields, base_hf, config_errors, window_fields, window_hf


def from_hf(hf: dict, source: str) -> ModelConfig:
    mt = hf.get("model_type")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} not supported (need silu)")
    if mt == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise CheckpointError(f"{source}: llama with attention_bias/mlp_bias is not supported")
    enabled = mt == "mistral" or (mt == "qwen2" and bool(hf.get("use_sliding_window")))
    with config_errors(hf, source):
        return ModelConfig(
            **base_fields(hf, source),
            **window_fields(hf, source, enabled=enabled),
            d_ff=int(hf["intermediate_size"]),
            qkv_bias=mt == "qwen2",
        )


def to_hf(cfg: ModelConfig) -> dict:
    out = base_hf(cfg)
    if cfg.qkv_bias:
        win = window_hf(cfg)
        if cfg.sliding_window and cfg.layer_types is None:
            win["layer_types"] = ["sliding_attention"] * cfg.n_layers
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            **out,
            "use_sliding_window": bool(cfg.sliding_window),
            "max_window_layers": 0 if cfg.sliding_window else cfg.n_layers,
            **win,
        }
    if cfg.sliding_window:
        if cfg.layer_types is not None and "full" in cfg.layer_types:
            raise CheckpointError(
                "a model with both full and sliding-window layers and no q/k/v bias has no Llama-family "
                "architecture in transformers (Mistral slides every layer)"
            )
        return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", **out, **window_hf(cfg)}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **out,
        "attention_bias": False,
        "mlp_bias": False,
    }


FAMILIES = [Family("llama", ("llama", "mistral", "qwen2"), from_hf, to_hf)]
