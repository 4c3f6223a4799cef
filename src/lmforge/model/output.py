"""Output projection + log-softmax in chunks, so the [tokens, vocab] logits never exist whole.

Why: with a 50k-150k vocabulary the logits (fp32 for a stable softmax) are the largest tensor of
a training step -- 16k tokens x 128k vocab x 4 bytes is 8 GiB, more than the rest of a small
model's activations together. The loss needs only one number per token, so the projection is
run over `chunk` rows at a time and each chunk is wrapped in activation checkpointing: forward
keeps the per-token log-probs, backward recomputes one chunk's logits at a time. Peak memory for
the head drops from O(tokens x vocab) to O(chunk x vocab) at the price of one more head matmul.

`token_logprobs` is exact (the same log-softmax, the same fp32 upcast), so the summed loss and
the gradients equal the plain path (tested); `head` is any module (a plain `nn.Linear`, a LoRA
or NF4-quantised one), called on a slice of the hidden states.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 4096
# fp32 logits up to this size are computed whole (one head matmul, no recomputation); above it the
# head runs in DEFAULT_CHUNK-row pieces. 1 GiB: a tiny CPU model never chunks, a 16k-token step
# with a 32k+ vocabulary does.
LOGITS_BUDGET = 1 << 30


def loss_chunk(n_rows: int, vocab: int, budget: int | None = None) -> int:
    """Rows per output-projection chunk for `n_rows` hidden states: all of them while their fp32
    logits fit `budget` bytes (default LOGITS_BUDGET), else DEFAULT_CHUNK."""
    budget = LOGITS_BUDGET if budget is None else budget
    return n_rows if n_rows * vocab * 4 <= budget else DEFAULT_CHUNK


def _chunk_logprobs(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, t: torch.Tensor):
    return -F.cross_entropy(head(h).float(), t, reduction="none")


def token_logprobs(
    h: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """log p(targets[i] | h[i]) in fp32 for hidden states h [N, d] and targets [N] -> [N].

    Rows are processed `chunk` at a time; under autograd each chunk is recomputed in backward,
    so at most one chunk of logits is alive at any time."""
    n = h.shape[0]
    if n <= chunk:
        return _chunk_logprobs(head, h, targets)
    parts = []
    for s in range(0, n, chunk):
        hc, tc = h[s : s + chunk], targets[s : s + chunk]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logprobs, head, hc, tc, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(head, hc, tc))
    return torch.cat(parts)


def linear_cross_entropy(
    h: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Cross-entropy of head(h) against targets, *summed* over rows; a row whose target is -100
    (`F.cross_entropy`'s ignore index) adds 0, but still costs its share of the projection, so
    select the rows that carry a target first where most do not."""
    return -token_logprobs(h, head, targets, chunk).sum()
