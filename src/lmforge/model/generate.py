"""The reference decoder: one static batch, left-padded, with or without the model's KV cache.

Not the product's generation path: the serving engine (`serve/engine.py`, `serve/batch.py`) is,
for the server, chat, RL rollouts, evaluation, sampling, synthesis and the SFT stage's answers
(prompt-tuned models included). This module stays as the simple, independent decoder the engine
is tested against token for token (`use_cache=False` re-runs the whole sequence each step).

One code path serves a single prompt and a batch of prompts of different lengths: prompts are
left-padded, every row gets its own position ids (so padding never shifts RoPE positions) and
a boolean mask hides the pad keys. With `use_cache=False` the same masks and positions are
used to re-run the whole sequence at each step; greedy decoding must then produce exactly the
tokens the cached path produces (tested), which is the check that the cache is right.

Sampling: temperature (0 = greedy), top-k, top-p (nucleus), repetition penalty (CTRL-style:
logits of already-seen tokens divided by the penalty when positive, multiplied when negative),
a seeded `torch.Generator`, stop tokens and a max-token budget. `stream_generate` yields one
step of new tokens at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .transformer import KVCache, Transformer


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")


def sample_next(
    logits: torch.Tensor,
    p: SamplingParams,
    generator: torch.Generator | None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row from logits [B, V] (float32)."""
    if p.repetition_penalty != 1.0 and seen is not None:
        picked = torch.gather(logits, 1, seen)
        picked = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        logits = logits.scatter(1, seen, picked)
    if p.temperature < 1e-5:  # greedy; also keeps logits / 1e-80 from overflowing to inf (NaN softmax)
        return logits.argmax(dim=-1)
    logits = logits / p.temperature
    if p.top_k is not None and p.top_k < logits.size(-1):
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p is not None and p.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (always keeps the first)
        drop = probs.cumsum(-1) - probs >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _masks(pad: torch.Tensor, q_pos: torch.Tensor, k_len: int) -> torch.Tensor:
    """Boolean attention mask [B, 1, Tq, Tk]: causal and hiding left-padding keys.
    Padded query rows may see themselves so that no row is fully masked (NaN-free)."""
    k_idx = torch.arange(k_len, device=pad.device)
    key_ok = k_idx[None, :] >= pad[:, None]  # [B, Tk]
    causal = k_idx[None, :] <= q_pos[:, None]  # [Tq, Tk]
    mask = causal[None] & key_ok[:, None, :]
    mask |= (k_idx[None, :] == q_pos[:, None])[None]
    return mask[:, None]


@torch.no_grad()
def stream_generate(
    model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams, use_cache: bool = True
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (tensor [B]) until all rows stopped or the budget ends.
    Rows that already stopped keep yielding their last stop token; callers cut at the first stop."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    total = P + params.max_new_tokens
    if total > model.cfg.max_seq_len:
        # RoPE extrapolates, but past the trained context quality collapses; say so plainly.
        raise ValueError(
            f"prompt ({P}) + max_new_tokens ({params.max_new_tokens}) exceeds the "
            f"model context ({model.cfg.max_seq_len})"
        )
    pad = torch.tensor([P - len(p) for p in prompts], device=device)
    tokens = torch.zeros(B, total, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p) : P] = torch.tensor(list(p), device=device)
    padded = bool(pad.any())
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=device).manual_seed(params.seed)
    stop = torch.tensor(list(params.stop_token_ids) or [-1], device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = KVCache(model.cfg, B, total, device, next(model.parameters()).dtype) if use_cache else None

    cur = P
    for _ in range(params.max_new_tokens):
        if cache is not None and cache.length > 0:
            inp, q_pos = tokens[:, cur - 1 : cur], torch.arange(cur - 1, cur, device=device)
        else:
            inp, q_pos = tokens[:, :cur], torch.arange(cur, device=device)
        pos = (q_pos[None, :] - pad[:, None]).clamp(min=0)
        mask = _masks(pad, q_pos, cur) if padded else None
        logits = model(inp, position_ids=pos, attn_mask=mask, cache=cache)[:, -1].float()
        seen = None
        if params.repetition_penalty != 1.0:  # penalise real tokens only, not the left padding
            seen = tokens[:, :cur]
            seen = torch.where(torch.arange(cur, device=device)[None, :] < pad[:, None], seen[:, -1:], seen)
        nxt = sample_next(logits, params, gen, seen)
        last = tokens[:, cur - 1]
        nxt = torch.where(done, last, nxt)
        tokens[:, cur] = nxt
        cur += 1
        done |= torch.isin(nxt, stop)
        yield nxt
        if bool(done.all()):
            break


def generate(
    model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams, use_cache: bool = True
) -> list[list[int]]:
    """New tokens per prompt, cut before the first stop token."""
    out: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    stops = set(params.stop_token_ids)
    for step in stream_generate(model, prompts, params, use_cache):
        for i, t in enumerate(step.tolist()):
            if finished[i]:
                continue
            if t in stops:
                finished[i] = True
            else:
                out[i].append(t)
    return out
