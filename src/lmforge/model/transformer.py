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
- The other families are the same decoder with flags (`ModelConfig`): q/k norms (Qwen3), Gemma's
  (1 + w) norms, GeGLU, sqrt(d) embedding scale, sandwich norms, soft-capped attention scores
  and logits and alternating sliding-window / global layers (Gemma 2), learned positions,
  LayerNorm, biases and a plain GELU MLP (GPT-2). The pieces are in `layers.py`; the family
  converters in `families/` map the checkpoints.
- Sliding-window attention is a per-layer `window` on `Attention`, applied as a band mask on the
  cache slots (training, prefill and decoding alike), so a window layer matches `transformers`
  beyond the window length too.

The forward pass takes optional `position_ids` (for packed sequences and KV-cache decoding), an
optional `attn_mask` -- a `DocumentMask` (document ids of packed rows; FlexAttention on GPU, see
`attention.py`) or a dense boolean tensor (True = may attend; left-padded generation) -- and an
optional `KVCache` which it fills and reads during generation.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import DocumentMask, attend
from .config import ModelConfig
from .layers import MLP, LMHead, RMSNorm, ScaledEmbedding, make_norm
from .moe import MoE
from .output import linear_cross_entropy, loss_chunk

__all__ = [
    "MLP",
    "Attention",
    "Block",
    "SlidingAttention",
    "Decoder",
    "KVCache",
    "RMSNorm",
    "Transformer",
    "apply_rotary",
]


class Rotary(nn.Module):
    """cos/sin tables for RoPE, computed once in fp32 and grown on demand."""

    inv_freq: torch.Tensor  # buffers (register_buffer), typed for the checker
    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, theta: float, max_seq_len: int, factor: float = 1.0):
        super().__init__()
        self.factor = factor  # linear scaling: position p rotates as p / factor
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)) / factor
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


def window_band(q_index: torch.Tensor, n_keys: int, window: int) -> torch.Tensor:
    """Boolean [..., Tq, Tk]: query at cache slot i may see key slot j iff 0 <= i - j < window
    (Hugging Face's sliding-window semantics, causal included)."""
    d = q_index[..., :, None] - torch.arange(n_keys, device=q_index.device)
    return (d >= 0) & (d < window)


class Attention(nn.Module):
    """Multi-head / grouped-query attention with RoPE (or none, for learned positions), optional
    q/k norms (Qwen3), score soft-capping (Gemma 2) and a per-layer sliding `window`.

    The window is applied as a band on the cache slots the keys occupy: without a cache the
    queries are the last T of the keys; an `lmforge` KVCache appends, so the same holds; a
    duck-typed cache (the serve engine's slot cache) passes `q_index`, the slot of each query."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        qkv_bias = cfg.qkv_bias or cfg.bias
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.hd, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.d_model, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm = make_norm(cfg, self.hd)
            self.k_norm = make_norm(cfg, self.hd)
        self.qk_norm = cfg.qk_norm
        self.rope = cfg.positions == "rope"
        self.window = cfg.window_of(layer_idx)
        self.softcap = cfg.attn_softcap
        self.scale = cfg.query_scale**-0.5 if cfg.query_scale else None

    def forward(self, x, cos, sin, attn_mask=None, cache: KVCache | None = None, q_index=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if self.rope:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        S = k.shape[2]
        if isinstance(attn_mask, DocumentMask):  # packed rows: the window is part of the mask
            y = self._attend_documents(q, k, v, attn_mask)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))
        if self.window is not None and S > self.window:
            if q_index is None:
                q_index = torch.arange(S - T, S, device=x.device)
            band = window_band(q_index, S, self.window)
            band = band[:, None] if band.dim() == 3 else band
            attn_mask = band if attn_mask is None else attn_mask & band
        y = self._attend(q, k, v, attn_mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))

    def _attend_documents(self, q, k, v, mask: DocumentMask):
        """Packed rows through the one attention entry point (FlexAttention on CUDA); soft-capped
        scores (Gemma 2) take the explicit path over the mask's dense form."""
        if self.softcap:
            return self._softcapped(q, k, v, mask.dense(self.window))
        return attend(
            q, k, v, mask, window=self.window, enable_gqa=self.n_kv != self.n_heads, scale=self.scale
        )

    def _attend(self, q, k, v, attn_mask):
        gqa = self.n_kv != self.n_heads  # SDPA shares each K/V head among n_heads/n_kv queries
        T, S = q.shape[2], k.shape[2]
        if self.softcap:
            return self._softcapped(q, k, v, attn_mask)
        if attn_mask is None and 1 < T < S:  # a chunk appended to a filled cache
            attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if attn_mask is None:
            # Plain causal attention over a fresh sequence (training, or a prefill into an
            # empty cache). One query against the cache needs no mask at all.
            return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.scale, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale, enable_gqa=gqa)

    def _softcapped(self, q, k, v, attn_mask):
        """Explicit attention: scores -> c * tanh(s / c) -> mask -> fp32 softmax (Gemma 2)."""
        T, S = q.shape[2], k.shape[2]
        if self.n_kv != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        scale = self.scale if self.scale is not None else self.hd**-0.5
        s = (q @ k.transpose(-1, -2)) * scale
        s = torch.tanh(s / self.softcap) * self.softcap
        if attn_mask is None and T > 1:
            attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, float("-inf"))
        return s.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


class SlidingAttention(Attention):
    """`Attention` of a layer with a sliding window. The computation is the base class's; the
    distinct type keeps code that replaces full-attention layers by exact class (the serve
    engine's fused decoder and its grouped-query switch) away from windowed layers."""


class Block(nn.Module):
    """Pre-norm residual block; with `sandwich_norm` (Gemma 2) the attention and MLP outputs are
    normed too, under Gemma 2's names (`post_attention_layernorm` then norms the attention
    output, and `pre_feedforward_layernorm` is the MLP's input norm)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.sandwich = cfg.sandwich_norm
        self.input_layernorm = make_norm(cfg)
        self.self_attn = (SlidingAttention if cfg.window_of(layer_idx) else Attention)(cfg, layer_idx)
        self.post_attention_layernorm = make_norm(cfg)
        if self.sandwich:
            self.pre_feedforward_layernorm = make_norm(cfg)
            self.post_feedforward_layernorm = make_norm(cfg)
        self.mlp = MoE(cfg) if cfg.n_experts else MLP(cfg)

    def forward(self, x, cos, sin, attn_mask=None, cache=None, q_index=None):
        extra = {"q_index": q_index} if q_index is not None else {}
        h = self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache, **extra)
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The trunk (`model.` prefix in HF naming)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        emb = ScaledEmbedding if cfg.embed_scale else nn.Embedding
        self.embed_tokens = emb(cfg.vocab_size, cfg.d_model)
        if cfg.positions == "learned":
            self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.max_seq_len, cfg.rope_linear_factor)
        if cfg.rope_theta_local is not None:  # sliding layers rotate with their own base (Gemma 3)
            self.rotary_local = Rotary(cfg.head_dim, cfg.rope_theta_local, cfg.max_seq_len)


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of `module`, each shared (tied) tensor counted once."""
    seen, n = set(), 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        if cfg.logit_softcap:
            self.lm_head: nn.Linear = LMHead(cfg.d_model, cfg.vocab_size, cfg.logit_softcap)
        else:
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
                else:  # norm weights: 1, or 0 for Gemma's (1 + w) form
                    p.fill_(0.0 if self.cfg.norm == "rms_offset" else 1.0)
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
        if self.cfg.positions == "learned":
            if (need or int(position_ids.max()) + 1) > self.cfg.max_seq_len:
                raise ValueError(
                    f"position {int(position_ids.max())} beyond the learned position table "
                    f"({self.cfg.max_seq_len} positions)"
                )
            x = x + self.model.embed_positions(position_ids)
        cos, sin = self.model.rotary(position_ids, x.dtype, need)
        local = self.model.rotary_local(position_ids, x.dtype, need) if self.cfg.rope_theta_local else None
        # a duck-typed cache (serve's slot cache) takes position ids equal to its slots
        windowed = self.cfg.sliding_window is not None
        q_index = position_ids if windowed and cache is not None and not isinstance(cache, KVCache) else None
        for i, layer in enumerate(self.model.layers):
            rope = local if local is not None and self.cfg.window_of(i) else (cos, sin)
            x = layer(x, *rope, attn_mask, cache, q_index)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def forward(
        self, input_ids, position_ids=None, attn_mask=None, cache: KVCache | None = None, targets=None
    ):
        """Logits [B, T, vocab] (computed in the activation dtype); with `targets` [B, T] the
        summed next-token cross-entropy instead (fp32, positions with target -100 carry none),
        through `linear_cross_entropy`: when the fp32 logits would be large the output projection
        runs in checkpointed chunks, so they never exist whole. Inside `forward` so DDP, FSDP and
        `torch.compile` see the whole step."""
        h = self.hidden_states(input_ids, position_ids, attn_mask, cache)
        if targets is None:
            return self.lm_head(h)
        n = h.shape[0] * h.shape[1]
        return linear_cross_entropy(
            h.flatten(0, 1), self.lm_head, targets.reshape(-1), loss_chunk(n, self.cfg.vocab_size)
        )

    def loss(self, input_ids, targets, ignore_index: int = -100, **kw) -> torch.Tensor:
        """Mean next-token cross-entropy over targets != ignore_index (fp32 softmax): the summed
        loss of `forward(targets=)` (chunked when large) over the count of scored positions."""
        if ignore_index != -100:
            targets = targets.masked_fill(targets == ignore_index, -100)
        return self(input_ids, targets=targets, **kw) / (targets != -100).sum()

    def moe_aux_loss(self) -> torch.Tensor | None:
        """Weighted load-balancing + z-loss of the last forward (None for dense models)."""
        if not self.cfg.n_experts:
            return None
        layers = [l.mlp for l in self.model.layers if isinstance(l.mlp, MoE)]
        # sums of tensors (layers is not empty when n_experts is set), not the int start value
        aux = cast(torch.Tensor, sum(m.aux_loss for m in layers)) / len(layers)
        z = cast(torch.Tensor, sum(m.z_loss for m in layers)) / len(layers)
        return self.cfg.aux_loss_coef * aux + self.cfg.z_loss_coef * z

    def moe_stats(self) -> dict[str, float]:
        out = {}
        for i, l in enumerate(self.model.layers):
            if isinstance(l.mlp, MoE):
                for k, v in l.mlp.stats.items():
                    out[f"moe/{k}/layer{i}"] = v
        return out

    def num_params(self, trainable_only: bool = False) -> int:
        return count_params(self, trainable_only)
