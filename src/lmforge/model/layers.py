"""The small building blocks every model family shares: norms, activations, feed-forward layers,
embeddings and the output head.

They live apart from `transformer.py` so that the MoE layer (`moe.py`) and the decoder both
build on them without importing each other. Each family feature is a module here, not a branch
in the decoder's forward, and keeps the parameter names `transformers` uses, so a state dict
moves between lmforge and the HF layout without renaming (GPT-2 and Phi-3 excepted: their
converters in `families/` rename and split):

- `RMSNorm` (Llama, Qwen, Mistral, Phi-3) and `OffsetRMSNorm`, Gemma's `x * (1 + weight)` form,
  computed in fp32 as Gemma does; GPT-2 uses `torch.nn.LayerNorm` (mean, bias).
- `MLP`: gated (SwiGLU with SiLU, GeGLU with tanh-GELU) or plain (GPT-2: up, activation, down),
  with or without biases.
- `ScaledEmbedding`: Gemma multiplies token embeddings by sqrt(d_model) (rounded to the
  activation dtype first, as `transformers` does); it is part of the embedding module so every
  caller of `embed_tokens` (prompt tuning included) gets it.
- `LMHead`: the output projection, with Gemma 2's final logit soft-capping `c * tanh(z / c)`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class OffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: scale by (1 + weight), weight initialised to 0, computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), 1.0 + self.weight.float(), self.eps)
        return y.to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.d_model
    if cfg.norm == "layer":
        return nn.LayerNorm(dim, eps=cfg.norm_eps)
    if cfg.norm == "rms_offset":
        return OffsetRMSNorm(dim, cfg.norm_eps)
    return RMSNorm(dim, cfg.norm_eps)


class MLP(nn.Module):
    """Gated: down(act(gate(x)) * up(x)); plain (`gated_mlp=False`): down(act(up(x)))."""

    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or cfg.ff_dim
        self.act = ACTIVATIONS[cfg.activation]
        self.gated = cfg.gated_mlp
        if self.gated:
            self.gate_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class ScaledEmbedding(nn.Embedding):
    """Token embedding times sqrt(d_model) (Gemma); the factor is rounded to the output dtype."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = super().forward(ids)
        return x * torch.tensor(self.embedding_dim**0.5, dtype=x.dtype)


class LMHead(nn.Linear):
    """Output projection; with `softcap`, logits are squashed to c * tanh(z / c) (Gemma 2)."""

    def __init__(self, d: int, vocab: int, softcap: float | None = None):
        super().__init__(d, vocab, bias=False)
        self.softcap = softcap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = super().forward(x)
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z
