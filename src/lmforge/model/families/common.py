"""What the decoder families' config.json files share, parsed and written in one place.

`base_fields` reads the keys every Llama-like config has (widths, heads, RoPE, norm epsilon,
tied embeddings), refusing what lmforge's decoder does not compute (RoPE scaling, partial
rotary) with the key named; `base_hf` writes them back. `window_fields` / `window_hf` map the
sliding window: `sliding_window` plus, where the family has them, per-layer `layer_types`
("sliding_attention" / "full_attention", as `transformers` 5 writes them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ...errors import CheckpointError
from ..config import ModelConfig

HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}
TO_HF_ACTIVATION = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


@contextlib.contextmanager
def config_errors(hf: dict, source: str) -> Iterator[None]:
    """Reading a family's config.json: a missing key or a value ModelConfig refuses becomes a
    CheckpointError naming the file (and the key)."""
    try:
        yield
    except KeyError as e:
        raise CheckpointError(
            f"{source}: missing key {e.args[0]!r} ({hf.get('model_type')} config)"
        ) from None
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def activation(name: str | None, source: str, key: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise CheckpointError(
            f"{source}: {key} {name!r} is not supported (supported: {sorted(HF_ACTIVATIONS)})"
        )
    return HF_ACTIVATIONS[name]


def check_rope(hf: dict, source: str) -> float:
    """The RoPE base; refuses scaled or partial RoPE, which lmforge's decoder does not compute."""
    for key in ("rope_scaling", "rope_parameters"):
        rs = hf.get(key) or {}
        kind = rs.get("rope_type", rs.get("type"))
        if kind not in (None, "default"):
            raise CheckpointError(
                f"{source}: {key} type {kind!r} is not supported (plain RoPE only); "
                f"Llama 3.1+/YaRN/LongRoPE checkpoints need RoPE scaling in lmforge's model"
            )
        if float(rs.get("partial_rotary_factor", 1.0)) != 1.0:
            raise CheckpointError(f"{source}: {key}.partial_rotary_factor != 1 is not supported")
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor != 1 is not supported")
    return float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))


def base_fields(hf: dict, source: str) -> dict:
    """ModelConfig fields common to the Llama-like families (`head_size` only when it differs
    from hidden_size / heads)."""
    try:
        d, h = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        out: dict[str, Any] = dict(
            vocab_size=int(hf["vocab_size"]),
            d_model=d,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=h,
            n_kv_heads=int(hf.get("num_key_value_heads") or h),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            rope_theta=check_rope(hf, source),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: missing key {e.args[0]!r}") from None
    hd = hf.get("head_dim")
    if hd not in (None, d // h) or d % h:
        out["head_size"] = int(hd or 0) or None
        if out["head_size"] is None:
            raise CheckpointError(f"{source}: num_attention_heads {h} does not divide hidden_size {d}")
    return out


def base_hf(cfg: ModelConfig) -> dict:
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ff_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": TO_HF_ACTIVATION[cfg.activation],
        "initializer_range": cfg.init_std,
    }


def window_fields(hf: dict, source: str, *, enabled: bool = True) -> dict:
    """sliding_window / layer_types of a config.json (empty when the model attends fully)."""
    window = hf.get("sliding_window")
    if not enabled or not window:
        return {}
    types = hf.get("layer_types")
    if types is None:
        return {"sliding_window": int(window)}
    names = {"sliding_attention": "sliding", "full_attention": "full"}
    bad = [t for t in types if t not in names]
    if bad:
        raise CheckpointError(f"{source}: layer_types entry {bad[0]!r} not supported ({sorted(names)})")
    mapped = [names[t] for t in types]
    if "sliding" not in mapped:
        return {}
    return {"sliding_window": int(window), "layer_types": mapped}


def window_hf(cfg: ModelConfig) -> dict:
    if not cfg.sliding_window:
        return {"sliding_window": None}
    out: dict = {"sliding_window": cfg.sliding_window}
    if cfg.layer_types is not None:
        out["layer_types"] = [f"{t}_attention" for t in cfg.layer_types]
    return out
