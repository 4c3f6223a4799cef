"""A lean forward pass for the engine's prefill and decode steps (same math as the model).

Decoding a small model on a CPU is bound by per-operation overhead, not FLOPs: a d=192, 4-layer
model does ~2.6 MFLOP per token but ~200 tensor operations and ~50 module calls in eager
PyTorch. This path computes exactly what `model.transformer.Transformer` computes, with fewer
operations:
- q/k/v projections fused into one matmul, and gate/up into one (the modules' weights become
  views into the fused tensor, so memory is not doubled and the model stays usable as is);
- RoPE applied to queries and keys in one go; no module hooks (`F.linear`, `F.rms_norm`);
- K/V written into the slot cache with a slice copy when all rows are at the same position
  (a paged cache, paged.py, writes and gathers through its `update`, the attention unchanged);
- grouped-query attention by SDPA (`enable_gqa=True`), not by copying K/V heads
  (`repeat_interleave` of the whole cache, per layer, per token);
- the LM head only on the last position (prefill never computes logits for the prompt).

It is used only when every module is exactly lmforge's own class (a LoRA-wrapped, quantised or
future variant falls back to calling the model) and after a self-check that its logits match
the model's on a random input. (The model's own `Attention` uses SDPA's `enable_gqa` too, so
the fallback path needs no patching.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.transformer import MLP, Attention, Block, RMSNorm, Transformer


def _has_gqa() -> bool:
    return "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


_Layer = tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor | None,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    int,
    torch.Tensor,
]


class FastDecoder:
    def __init__(self, model: Transformer):
        cfg = model.cfg
        self.model, self.cfg = model, cfg
        self.H, self.KV, self.D = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.eps = cfg.norm_eps
        # per layer: input norm, fused qkv weight and bias, out proj, post norm, fused gate/up, split, down
        self.layers: list[_Layer] = []
        with torch.no_grad():
            for blk in cast(Iterable[Block], model.model.layers):
                a, m = blk.self_attn, cast(MLP, blk.mlp)  # build() admits plain MLPs only
                wqkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).contiguous()
                bqkv = (
                    torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]).contiguous()
                    if a.q_proj.bias is not None
                    else None
                )
                wgu = torch.cat([m.gate_proj.weight, m.up_proj.weight]).contiguous()
                # let the modules see views of the fused tensors: one copy of the weights
                nq, nk = a.q_proj.weight.shape[0], a.k_proj.weight.shape[0]
                a.q_proj.weight = nn.Parameter(wqkv[:nq], requires_grad=False)
                a.k_proj.weight = nn.Parameter(wqkv[nq : nq + nk], requires_grad=False)
                a.v_proj.weight = nn.Parameter(wqkv[nq + nk :], requires_grad=False)
                if bqkv is not None:
                    a.q_proj.bias = nn.Parameter(bqkv[:nq], requires_grad=False)
                    a.k_proj.bias = nn.Parameter(bqkv[nq : nq + nk], requires_grad=False)
                    a.v_proj.bias = nn.Parameter(bqkv[nq + nk :], requires_grad=False)
                nf = m.gate_proj.weight.shape[0]
                m.gate_proj.weight = nn.Parameter(wgu[:nf], requires_grad=False)
                m.up_proj.weight = nn.Parameter(wgu[nf:], requires_grad=False)
                self.layers.append(
                    (
                        cast(RMSNorm, blk.input_layernorm).weight,  # build() admits RMSNorm only
                        wqkv,
                        bqkv,
                        a.o_proj.weight,
                        cast(RMSNorm, blk.post_attention_layernorm).weight,
                        wgu,
                        nf,
                        m.down_proj.weight,
                    )
                )
        self.embed = model.model.embed_tokens.weight
        self.norm = cast(RMSNorm, model.model.norm).weight
        self.head = model.lm_head.weight
        self.rotary = model.model.rotary

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        # registered buffers, replaced when the rotary module grows them: read them each time
        return cast(torch.Tensor, self.rotary.cos), cast(torch.Tensor, self.rotary.sin)

    @classmethod
    def build(cls, model: nn.Module) -> FastDecoder | None:
        """A FastDecoder for `model`, or None when the model is not plain lmforge modules."""
        if type(model) is not Transformer or not _has_gqa():
            return None
        for blk in model.model.layers:
            if (
                type(blk) is not Block
                or type(blk.self_attn) is not Attention
                or type(blk.mlp) is not MLP
                or type(blk.input_layernorm) is not RMSNorm
                or type(blk.post_attention_layernorm) is not RMSNorm
            ):
                return None
            lins = [
                blk.self_attn.q_proj,
                blk.self_attn.k_proj,
                blk.self_attn.v_proj,
                blk.self_attn.o_proj,
                blk.mlp.gate_proj,
                blk.mlp.up_proj,
                blk.mlp.down_proj,
            ]
            if any(type(x) is not nn.Linear for x in lins) or blk.mlp.down_proj.bias is not None:
                return None
        if type(model.model.norm) is not RMSNorm or type(model.lm_head) is not nn.Linear:
            return None
        return cls(model)

    def _cos_sin(
        self, pos: torch.Tensor, dtype: torch.dtype, static: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # static: the caller guarantees the tables are long enough (no `.max()` read back: a host
        # sync, and not allowed inside a CUDA graph)
        if not static and int(pos.max()) + 1 > self._tables()[0].shape[0]:
            self.rotary(pos, dtype)  # grows the tables
        cos, sin = self._tables()
        return cos[pos].to(dtype).unsqueeze(-2), sin[pos].to(dtype).unsqueeze(-2)

    @torch.no_grad()
    def forward(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        cache,
        *,
        slot: int | torch.Tensor | None = None,
        k_len: int | None = None,
        mask: torch.Tensor | None = None,
        static: bool = False,
        last: torch.Tensor | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Logits [B, V] of the last position. Prefill: `slot` given, ids [1, T], pos [1, T].
        Decode: ids [B, 1] for slots 0..B-1, pos [B, 1]; keys 0..k_len-1; `mask` [B,1,1,k_len] or None.
        `static`: no value is read back to the host (shapes fixed by B and k_len alone), so the
        step can be captured as a CUDA graph (static_decode.py). Prefill of several slots (prefill.py):
        `slot` a tensor [B] of slots, ids [B, T] right-padded, `last` [B] each row's last real position.
        A prompt chunk (chunked prefill): `slot` an int, `start` > 0 positions already in its row."""
        B, T = ids.shape
        H, KV, D, eps = self.H, self.KV, self.D, self.eps
        x = F.embedding(ids, self.embed)
        dim = x.shape[-1]
        cos, sin = self._cos_sin(pos, x.dtype, static)  # [B, T, 1, D]
        paged = getattr(cache, "paged", False)  # paged.py: the cache writes and gathers
        same = slot is None and mask is None and not static and not paged
        p0 = int(pos[0, 0]) if same else 0
        gqa = KV != H
        chunk = None  # a chunk after `start` cached positions: causal over the row's first start+T keys
        if start:
            chunk = torch.ones(T, start + T, dtype=torch.bool, device=ids.device).tril(start)
        if paged:
            if slot is None:
                cache.decode(slice(0, B), pos[:, 0], cast(int, k_len))
            elif torch.is_tensor(slot):
                cache.prefill_rows(slot, T)
            else:
                cache.prefill(cast(int, slot), T, start)
        for li, (w_in, wqkv, bqkv, wo, w_post, wgu, nf, wdown) in enumerate(self.layers):
            h = F.rms_norm(x, (dim,), w_in, eps)
            qkv = F.linear(h, wqkv, bqkv).view(B, T, H + 2 * KV, D)
            qk = _rotate(qkv[:, :, : H + KV], cos, sin)
            q = qk[:, :, :H].transpose(1, 2)
            k = qk[:, :, H:].transpose(1, 2)
            v = qkv[:, :, H + KV :].transpose(1, 2)
            if paged:
                ka, va = cache.update(li, k, v)
                y = F.scaled_dot_product_attention(
                    q, ka, va, attn_mask=mask if chunk is None else chunk, enable_gqa=gqa,
                    is_causal=slot is not None and chunk is None and T > 1,
                )  # fmt: skip
            elif chunk is not None:
                kc, vc = cache.k[li], cache.v[li]
                kc[slot, :, start : start + T] = k[0]
                vc[slot, :, start : start + T] = v[0]
                row = cast(int, slot)
                ka, va = kc[row : row + 1, :, : start + T], vc[row : row + 1, :, : start + T]
                y = F.scaled_dot_product_attention(q, ka, va, attn_mask=chunk, enable_gqa=gqa)
            elif slot is not None:  # prefill one slot, or rows of slots
                kc, vc = cache.k[li], cache.v[li]
                kc[slot, :, :T] = k if torch.is_tensor(slot) else k[0]
                vc[slot, :, :T] = v if torch.is_tensor(slot) else v[0]
                y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
            else:
                kc, vc = cache.k[li], cache.v[li]
                if same:
                    kc[:B, :, p0 : p0 + 1] = k
                    vc[:B, :, p0 : p0 + 1] = v
                else:
                    b = torch.arange(B, device=ids.device)
                    kc[b, :, pos[:, 0]] = k[:, :, 0]
                    vc[b, :, pos[:, 0]] = v[:, :, 0]
                y = F.scaled_dot_product_attention(
                    q, kc[:B, :, :k_len], vc[:B, :, :k_len], attn_mask=mask, enable_gqa=gqa
                )
            x = x + F.linear(y.transpose(1, 2).reshape(B, T, H * D), wo)
            h = F.rms_norm(x, (dim,), w_post, eps)
            gu = F.linear(h, wgu)
            x = x + F.linear(F.silu(gu[..., :nf]) * gu[..., nf:], wdown)
        x = x[:, -1] if last is None else x[torch.arange(B, device=x.device), last]
        x = F.rms_norm(x, (dim,), self.norm, eps)
        return F.linear(x, self.head)


def self_check(model, fast: FastDecoder, cache_factory) -> bool:
    """Prefill + 3 decode steps through `fast` against the model's own forward."""
    g = torch.Generator().manual_seed(0)
    dev = next(model.parameters()).device
    ids = torch.randint(0, model.cfg.vocab_size, (1, 10), generator=g).to(dev)
    with torch.no_grad():
        ref = model(ids).float()
        cache = cache_factory()
        out = [fast.forward(ids[:, :7], torch.arange(7, device=dev)[None], cache, slot=0).float()]
        for t in range(7, 10):
            out.append(
                fast.forward(ids[:, t : t + 1], torch.tensor([[t]], device=dev), cache, k_len=t + 1).float()
            )
    got = torch.cat(out)
    want = ref[0, 6:10]
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 3e-2  # bf16/fp16: ~3 digits
    return bool(torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max())))
