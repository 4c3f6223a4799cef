"""A Llama-style decoder-only Transformer, written to be read.

Architecture choices (and why):
- Pre-norm residual blocks with RMSNorm (no mean subtraction, no bias): stable and cheap.
- Rotary position embeddings (RoPE) on queries and keys, "rotate-half" layout as in Hugging Face
  Llama, so weights move between lmforge and `transformers` without permuting rows.
- Grouped-query attention (n_kv_heads <= n_heads) through `F.scaled_dot_product_attention`,
  which dispatches to FlashAttention / memory-efficient kernels on GPU and a fused kernel on CPU.
- SwiGLU feed-forward (gate, up, down projections), no biases anywhere except optional q/k/v
  biases (Qwen2 checkpoints have them).
- Optional tied input/output embeddings (the default for small models, where the embedding
  matrix is a large share of the parameters).
- Module and parameter names mirror `transformers`' LlamaForCausalLM (`model.layers.0.self_attn
  .q_proj.weight`, `lm_head.weight`, ...): a state dict is a valid HF state dict and vice versa.

The forward pass takes optional `position_ids` (for packed sequences and KV-cache decoding), an
optional `attn_mask` -- a `DocumentMask` (document ids of packed rows; FlexAttention on GPU, see
`attention.py`) or a dense boolean tensor (True = may attend; left-padded generation) -- and an
optional `KVCache` which it fills and reads during generation.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attend
from .config import ModelConfig
from .moe import MoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Rotary(nn.Module):
    """cos/sin tables for RoPE, computed once in fp32 and grown on demand."""

    def __init__(self, head_dim: int, theta: float, max_seq_len: int):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._build(max_seq_len)

    def _build(self, n: int) -> None:
        t = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype, need: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`need` = 1 + the largest position when the caller knows it on the host; then no
        `.max()` is read back (a device sync per forward on GPU, a graph break under compile)."""
        if need is None:  # explicit position ids (packing, padded decoding)
            need = int(position_ids.max()) + 1
        if need > self.cos.shape[0]:
            self._build(max(need, 2 * self.cos.shape[0]))
        # position_ids: [T] or [B, T] -> cos/sin broadcastable to [B, H, T, D]
        cos, sin = self.cos[position_ids].to(dtype), self.sin[position_ids].to(dtype)
        if cos.dim() == 3:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Pre-allocated per-layer key/value buffers for incremental decoding.

    Shape per layer: [batch, n_kv_heads, max_len, head_dim]. `length` is the number of filled
    positions (shared by all rows; rows of different prompt lengths are left-padded by the
    generator and masked).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} > {self.max_len} positions")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, attn_mask=None, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        gqa = self.n_kv != self.n_heads  # SDPA shares each K/V head among n_heads/n_kv queries
        y = attend(q, k, v, attn_mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or cfg.ff_dim
        self.gate_proj = nn.Linear(cfg.d_model, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.n_experts else MLP(cfg)

    def forward(self, x, cos, sin, attn_mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The trunk (`model.` prefix in HF naming)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.max_seq_len)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, std) everywhere, residual output projections scaled down by
        sqrt(2 * n_layers) so the residual stream's variance does not grow with depth."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                if name.endswith("bias"):
                    p.zero_()
                else:
                    p.fill_(1.0)  # norm weights
                continue
            s = (
                std / math.sqrt(2 * self.cfg.n_layers)
                if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj"))
                else std
            )
            nn.init.normal_(p, mean=0.0, std=s)

    def hidden_states(self, input_ids, position_ids=None, attn_mask=None, cache: KVCache | None = None):
        B, T = input_ids.shape
        need = None
        if position_ids is None:
            start = cache.length if cache is not None else 0
            need = start + T
            position_ids = torch.arange(start, need, device=input_ids.device)
        elif cache is None:
            # training rows (packed or padded): a position never exceeds its index in the row,
            # so the table size is known on the host and no `.max()` is read back
            need = T
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary(position_ids, x.dtype, need)
        for layer in self.model.layers:
            x = layer(x, cos, sin, attn_mask, cache)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def forward(self, input_ids, position_ids=None, attn_mask=None, cache: KVCache | None = None):
        """Logits [B, T, vocab] (computed in the activation dtype)."""
        return self.lm_head(self.hidden_states(input_ids, position_ids, attn_mask, cache))

    def loss(self, input_ids, targets, ignore_index: int = -100, **kw) -> torch.Tensor:
        """Mean next-token cross-entropy over targets != ignore_index (fp32 softmax)."""
        logits = self(input_ids, **kw)
        return F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index
        )

    def moe_aux_loss(self) -> torch.Tensor | None:
        """Weighted load-balancing + z-loss of the last forward (None for dense models)."""
        if not self.cfg.n_experts:
            return None
        layers = [l.mlp for l in self.model.layers if isinstance(l.mlp, MoE)]
        aux = sum(m.aux_loss for m in layers) / len(layers)
        z = sum(m.z_loss for m in layers) / len(layers)
        return self.cfg.aux_loss_coef * aux + self.cfg.z_loss_coef * z

    def moe_stats(self) -> dict[str, float]:
        out = {}
        for i, l in enumerate(self.model.layers):
            if isinstance(l.mlp, MoE):
                for k, v in l.mlp.stats.items():
                    out[f"moe/{k}/layer{i}"] = v
        return out

    def num_params(self, trainable_only: bool = False) -> int:
        seen, n = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            n += p.numel()
        return n
