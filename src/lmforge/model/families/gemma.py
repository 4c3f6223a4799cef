"""Gemma and Gemma 2: Llama's layout with Gemma's numerics.

Both: GeGLU feed-forward (tanh-approximated GELU), token embeddings scaled by sqrt(d_model),
RMSNorm as x * (1 + weight) computed in fp32, a head width set on its own (256), tied
embeddings. Gemma 2 adds: sandwich norms (`post_attention_layernorm` norms the attention
output, `pre_feedforward_layernorm` / `post_feedforward_layernorm` wrap the MLP), attention
scores scaled by `query_pre_attn_scalar ** -0.5` and soft-capped (`attn_logit_softcapping`),
final logits soft-capped (`final_logit_softcapping`), and sliding-window layers alternating
with global ones (`layer_types`). Weight names are the same as lmforge's.
"""

from __future__ import annotations

from ...errors import CheckpointError
from ..config import ModelConfig
from . import Family
from .common import TO_HF_ACTIVATION, activation, base_fields, base_hf, window_fields, window_hf


def _act(hf: dict, source: str) -> str:
    name = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    return activation(name, source, "hidden_activation")


def from_hf(hf: dict, source: str) -> ModelConfig:
    mt = hf.get("model_type")
    if hf.get("attention_bias"):
        raise CheckpointError(f"{source}: {mt} with attention_bias=true is not supported")
    if hf.get("use_bidirectional_attention"):
        raise CheckpointError(f"{source}: use_bidirectional_attention is not supported (causal LM only)")
    extra: dict = {}
    if mt == "gemma2":
        extra = dict(
            **window_fields(hf, source),
            sandwich_norm=True,
            query_scale=float(hf.get("query_pre_attn_scalar") or 256),
            attn_softcap=hf.get("attn_logit_softcapping"),
            logit_softcap=hf.get("final_logit_softcapping"),
        )
    try:
        return ModelConfig(
            **dict(base_fields(hf, source), tie_embeddings=bool(hf.get("tie_word_embeddings", True))),
            d_ff=int(hf["intermediate_size"]),
            activation=_act(hf, source),
            norm="rms_offset",
            embed_scale=True,
            hf_type=mt,
            **extra,
        )
    except KeyError as e:
        raise CheckpointError(
            f"{source}: missing key {e.args[0]!r} ({hf.get('model_type')} config)"
        ) from None
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def to_hf(cfg: ModelConfig) -> dict:
    out = {**base_hf(cfg), "attention_bias": False, "hidden_activation": TO_HF_ACTIVATION[cfg.activation]}
    if cfg.hf_type == "gemma":
        return {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", **out}
    win = window_hf(cfg)
    if cfg.sliding_window and cfg.layer_types is None:
        win["layer_types"] = ["sliding_attention"] * cfg.n_layers
    if not cfg.sliding_window:
        win = {"sliding_window": cfg.max_seq_len, "layer_types": ["full_attention"] * cfg.n_layers}
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        **out,
        "query_pre_attn_scalar": _number(cfg.query_scale or cfg.head_dim),
        "attn_logit_softcapping": cfg.attn_softcap,
        "final_logit_softcapping": cfg.logit_softcap,
        **win,
    }


FAMILIES = [Family("gemma", ("gemma", "gemma2"), from_hf, to_hf)]
