"""Gemma and Gemma 2: Llama's layout with Gemma's numerics.

Both: GeGLU feed-forward (tanh-approximated GELU), token embeddings scaled by sqrt(d_model),
RMSNorm as x * (1 + weight) computed in fp32, a head width set on its own (256), tied
embeddings. Gemma 2 adds: sandwich norms (`post_attention_layernorm` norms the attention
output, `pre_feedforward_layernorm` / `post_feedforward_layernorm` wrap the MLP), attention
scores scaled by `query_pre_attn_scalar ** -0.5` and soft-capped (`attn_logit_softcapping`),
final logits soft-capped (`final_logit_softcapping`), and sliding-window layers alternating
with global ones (`layer_types`). Gemma 3 (text, `gemma3_text`) is Gemma 2 with Gemma-style
RMSNorm on query and key heads, no soft-caps, its own RoPE base on the sliding layers and
optionally linear RoPE scaling on the global ones. Weight names are the same as lmforge's.
"""

from __future__ import annotations

from ...errors import CheckpointError
from ..config import ModelConfig
from .base import Family
from .common import (
    TO_HF_ACTIVATION,
    activation,
    base_fields,
    base_hf,
    config_errors,
    window_fields,
    window_hf,
)


def _act(hf: dict, source: str) -> str:
    name = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    return activation(name, source, "hidden_activation")


def _gemma3_rope(hf: dict, source: str) -> tuple[dict, dict]:
    """(hf without its RoPE keys, ModelConfig RoPE fields) of a Gemma 3 config, in either the
    per-layer-type `rope_parameters` form or the older rope_theta / rope_local_base_freq one."""
    rp = hf.get("rope_parameters") or {}
    if "full_attention" in rp or "sliding_attention" in rp:
        full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
    else:
        full = dict(hf.get("rope_scaling") or {}, rope_theta=hf.get("rope_theta", rp.get("rope_theta", 1e6)))
        local = {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
    for name, p in (("full_attention", full), ("sliding_attention", local)):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in ("default", "linear") or (kind == "linear" and name == "sliding_attention"):
            raise CheckpointError(f"{source}: {name} RoPE type {kind!r} is not supported")
    factor = float(full.get("factor", 1.0)) if full.get("rope_type", full.get("type")) == "linear" else 1.0
    rest = {k: v for k, v in hf.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")}
    fields = dict(
        rope_theta=float(full.get("rope_theta", 1e6)),
        rope_theta_local=float(local.get("rope_theta", 10000.0)),
        rope_linear_factor=factor,
    )
    return rest, fields


def from_hf(hf: dict, source: str) -> ModelConfig:
    mt = hf.get("model_type")
    rope: dict = {}
    if mt == "gemma3_text":
        hf, rope = _gemma3_rope(hf, source)
    if hf.get("attention_bias"):
        raise CheckpointError(f"{source}: {mt} with attention_bias=true is not supported")
    if hf.get("use_bidirectional_attention"):
        raise CheckpointError(f"{source}: use_bidirectional_attention is not supported (causal LM only)")
    extra: dict = {}
    if mt in ("gemma2", "gemma3_text"):
        extra = dict(
            **window_fields(hf, source),
            sandwich_norm=True,
            query_scale=float(hf.get("query_pre_attn_scalar") or 256),
            attn_softcap=hf.get("attn_logit_softcapping"),
            logit_softcap=hf.get("final_logit_softcapping"),
        )
    with config_errors(hf, source):
        return ModelConfig(
            **dict(base_fields(hf, source), tie_embeddings=bool(hf.get("tie_word_embeddings", True)), **rope),
            d_ff=int(hf["intermediate_size"]),
            activation=_act(hf, source),
            norm="rms_offset",
            embed_scale=True,
            hf_type=mt,
            qk_norm=mt == "gemma3_text",
            **extra,
        )


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
    if cfg.hf_type == "gemma3_text":
        full: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        if cfg.rope_linear_factor != 1.0:
            full.update(rope_type="linear", factor=cfg.rope_linear_factor)
        local = {"rope_type": "default", "rope_theta": cfg.rope_theta_local or cfg.rope_theta}
        out["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
        out.pop("rope_theta", None)
    arch = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}[cfg.hf_type or "gemma2"]
    return {
        "architectures": [arch],
        "model_type": cfg.hf_type or "gemma2",
        "use_bidirectional_attention": False,
        **out,
        "query_pre_attn_scalar": _number(cfg.query_scale or cfg.head_dim),
        "attn_logit_softcapping": cfg.attn_softcap,
        "final_logit_softcapping": cfg.logit_softcap,
        **win,
    }


FAMILIES = [Family("gemma", ("gemma", "gemma2", "gemma3_text"), from_hf, to_hf)]
