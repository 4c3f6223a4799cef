"""Training FLOPs: the 6N rule and the exact count with attention, forward vs backward.

Two ways to count the FLOPs of one training token:

* **6N** (Kaplan et al. 2020, arXiv:2001.08361, Sec. 2.1; Hoffmann et al. 2022 "Chinchilla",
  arXiv:2203.15556): each parameter does one multiply-add (2 FLOPs) in the forward pass and
  twice that in the backward pass (gradients w.r.t. activations and w.r.t. weights), so
  C = 6 N D. Attention's own matmuls (QK^T, AV) are left out; they grow with context length.
* **Exact with attention** (PaLM, Chowdhery et al. 2022, arXiv:2204.02311, App. B):
  forward = 2 x (matmul parameters, LM head included) + 4 x n_layers x seq x d_attn,
  backward = 2 x forward, training = 3 x forward, i.e. 6N + 12 L T d per token.
  The per-config count is `ModelConfig.flops_per_token` (one definition for the whole toolkit);
  this module adds the forward/backward split and the 6N comparison.

MFU (model FLOPs utilization, PaLM App. B) is model FLOPs per second / peak FLOP/s. It
counts the model's FLOPs, not the hardware's: activation recomputation does not raise it.
Causal masking is not discounted in the attention term, as is customary for MFU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from lmforge.errors import ConfigError

if TYPE_CHECKING:  # importing lmforge.model pulls in torch; counting FLOPs does not need it
    from lmforge.model.config import ModelConfig


@dataclass(frozen=True)
class FlopsPerToken:
    """FLOPs of one token of one sequence at `seq_len` (training = forward + backward)."""

    seq_len: int
    n_params: int  # total, embeddings included (Chinchilla's N)
    n_non_embedding: int | None  # Kaplan's N (None when only the total is known)
    forward: float
    backward: float
    attention_forward: float  # the part of `forward` from QK^T and AV
    approx_6n: float  # 6 x n_params

    @property
    def training(self) -> float:
        return self.forward + self.backward

    @property
    def attention_fraction(self) -> float:
        return self.attention_forward / self.forward

    def to_dict(self) -> dict:
        d = asdict(self)
        d["training"] = self.training
        d["attention_fraction"] = self.attention_fraction
        return d


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> FlopsPerToken:
    """Exact matmul FLOPs per token for a model config, split into forward and backward."""
    seq = int(seq_len or cfg.max_seq_len)
    if seq < 1:
        raise ConfigError(f"seq_len must be positive, got {seq_len!r}")
    fwd = cfg.flops_per_token(seq, training=False)
    attn = 4.0 * cfg.n_layers * seq * cfg.n_heads * cfg.head_dim
    n = cfg.param_count()
    return FlopsPerToken(
        seq_len=seq,
        n_params=n,
        n_non_embedding=cfg.non_embedding_params(),
        forward=fwd,
        backward=2.0 * fwd,
        attention_forward=attn,
        approx_6n=6.0 * n,
    )


def flops_per_token_from_shape(
    n_params: float, n_layers: int | None = None, d_model: int | None = None, seq_len: int | None = None
) -> FlopsPerToken:
    """FLOPs per token when only N is known; the attention term is added when the depth,
    width and sequence length are given (PaLM: 6N + 12 L T d)."""
    _positive("n_params", n_params)
    attn = 0.0
    if n_layers is not None or d_model is not None:
        if n_layers is None or d_model is None or seq_len is None:
            raise ConfigError("the attention term needs n_layers, d_model and seq_len together")
        _positive("n_layers", n_layers)
        _positive("d_model", d_model)
        _positive("seq_len", seq_len)
        attn = 4.0 * n_layers * seq_len * d_model
    fwd = 2.0 * n_params + attn
    return FlopsPerToken(
        seq_len=int(seq_len or 0),
        n_params=int(n_params),
        n_non_embedding=None,
        forward=fwd,
        backward=2.0 * fwd,
        attention_forward=attn,
        approx_6n=6.0 * n_params,
    )


def training_flops(n_params: float, tokens: float) -> float:
    """C = 6 N D, the approximation every scaling law in this package uses."""
    _positive("n_params", n_params)
    _positive("tokens", tokens)
    return 6.0 * float(n_params) * float(tokens)


def training_flops_for_config(
    cfg: ModelConfig, tokens: float, seq_len: int | None = None, exact: bool = True
) -> float:
    """Training FLOPs of `tokens` tokens for a config: exact (with attention) or 6N."""
    _positive("tokens", tokens)
    f = flops_per_token(cfg, seq_len)
    return (f.training if exact else f.approx_6n) * float(tokens)


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float, n_devices: int = 1) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the devices' combined peak.

    `flops_per_token` is the *training* figure (forward + backward), e.g.
    ``flops_per_token(cfg, seq).training``; `peak_flops` is per device
    (`lmforge.scaling.cost.peak_flops` / `device_peak_flops`).
    """
    _positive("peak_flops", peak_flops)
    if n_devices < 1:
        raise ConfigError(f"n_devices must be >= 1, got {n_devices!r}")
    return float(tokens_per_second) * float(flops_per_token) / (float(peak_flops) * n_devices)


def _positive(name: str, v: float) -> None:
    try:
        ok = math.isfinite(float(v)) and float(v) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{name} must be a positive finite number, got {v!r}")


_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}


def parse_quantity(text: str | float | int) -> float:
    """Parse '175B', '300b', '1.4T', '7e9', '70M', '2.5k' or a plain number into a float."""
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip().replace("_", "").replace(",", "")
    mult = 1.0
    if s and s[-1].lower() in _SUFFIX:
        mult, s = _SUFFIX[s[-1].lower()], s[:-1]
    try:
        return float(s) * mult
    except ValueError:
        raise ConfigError(f"cannot read {text!r} as a number (examples: 175B, 1.4T, 3e23)") from None
