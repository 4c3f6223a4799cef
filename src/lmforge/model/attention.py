"""The one attention entry point: causal, document-masked (packed rows) and sliding-window.

Why this file exists: packed training rows hold several documents, and a token must see only
earlier tokens of its own document. A dense [batch, 1, T, T] boolean mask says that, but on GPU
it keeps `scaled_dot_product_attention` off its flash kernels and costs O(T^2) memory per row.
So callers describe the mask instead of building it (`DocumentMask`: a document id per token,
optionally a prefix visible to every token), and `attend` picks how to run it:

* **FlexAttention** (`torch.nn.attention.flex_attention`) with a block mask built from the
  document ids: fully masked blocks are skipped, nothing T x T is stored, and the kernel is
  compiled with Triton. Used on CUDA. (On CPU, FlexAttention has no backward and compiling its
  forward costs seconds per shape while a dense-masked SDPA call over the same rows takes
  milliseconds, so CPU uses the dense fallback.)
* **Dense fallback**: the boolean mask is built from the document ids inside this function, once
  per forward (cached on the `DocumentMask` and shared by every layer), and handed to SDPA.
* **No mask at all** for plain causal rows (pretraining, right-padded unpacked rows): SDPA's
  `is_causal` path, flash kernels on GPU.

The mask semantics, for query position i and key position j of one row:
``j <= i`` and ``doc[i] == doc[j]`` (or ``j < prefix``), and, with a sliding ``window``,
``i - j < window`` (Hugging Face Mistral/Gemma-2 semantics: query i sees key j iff
``0 <= i - j < window``). Padding carries its own document id (the collators use -1), so pad
tokens attend only to pad tokens and never leak into a real document.

`set_attention_backend("flex" | "dense" | "auto")` (or ``LMFORGE_ATTENTION``) forces a path;
tests use it to check that both give the same logits.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

try:  # FlexAttention: torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    HAVE_FLEX = True
except ImportError:  # pragma: no cover - old torch
    create_block_mask = flex_attention = None  # type: ignore[assignment]
    HAVE_FLEX = False

BACKENDS = ("auto", "flex", "dense")
BLOCK = 128  # FlexAttention's block size: document-masked rows are padded to a multiple of it
_backend = os.environ.get("LMFORGE_ATTENTION", "auto")
_compiled_flex: Any = None


def set_attention_backend(name: str) -> str:
    """Force the document-mask path: 'auto' (flex on CUDA, dense elsewhere), 'flex', 'dense'.
    Returns the previous setting."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r}: use one of {', '.join(BACKENDS)}")
    old, _backend = _backend, name
    return old


def padded_length(n: int) -> int:
    """The row length a collator pads document-masked rows to: a multiple of `BLOCK`, so the
    compiled kernel sees few distinct shapes and no block is partial."""
    return -(-n // BLOCK) * BLOCK


def _flex_fn(device: torch.device):
    """FlexAttention, compiled on CUDA (eager FlexAttention materialises the scores). Default
    `dynamic`: the first shape is compiled static, a second one recompiles shape-generic."""
    global _compiled_flex
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


class DocumentMask:
    """Which keys each query of a packed batch may see: causal, same document, optional prefix.

    `doc_ids` [B, T] integer tensor: the document of each token (padding gets its own id).
    `prefix`: the first `prefix` positions (e.g. prompt-tuning's virtual tokens) are seen by
    every query. The block masks / dense masks derived from it are cached per window, so all
    layers of one forward share them."""

    def __init__(self, doc_ids: torch.Tensor, prefix: int = 0):
        if doc_ids.dim() != 2:
            raise ValueError(f"doc_ids must be [batch, seq], got shape {tuple(doc_ids.shape)}")
        self.doc_ids, self.prefix = doc_ids, prefix
        self._cache: dict[tuple[str, int | None], Any] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return self.doc_ids.shape[0], self.doc_ids.shape[1]

    def with_prefix(self, n: int, prefix_doc: int = -2) -> DocumentMask:
        """The same mask with `n` positions prepended that every token may attend to."""
        B = self.doc_ids.shape[0]
        head = torch.full((B, n), prefix_doc, dtype=self.doc_ids.dtype, device=self.doc_ids.device)
        return DocumentMask(torch.cat([head, self.doc_ids], dim=1), self.prefix + n)

    def _mask_mod(self, window: int | None):
        doc, prefix = self.doc_ids, self.prefix

        def mask_mod(b, h, q, k):
            ok = (k <= q) & ((doc[b, q] == doc[b, k]) | (k < prefix))
            if window is not None:
                ok = ok & (q - k < window)
            return ok

        return mask_mod

    def dense(self, window: int | None = None) -> torch.Tensor:
        """The boolean mask [B, 1, T, T] (True = may attend)."""
        key = ("dense", window)
        if key not in self._cache:
            T = self.doc_ids.shape[1]
            i = torch.arange(T, device=self.doc_ids.device)
            q, k = i[:, None], i[None, :]
            ok = (self.doc_ids[:, :, None] == self.doc_ids[:, None, :]) | (k < self.prefix)
            ok = ok & (k <= q)
            if window is not None:
                ok = ok & (q - k < window)
            self._cache[key] = ok[:, None]
        return self._cache[key]

    def block_mask(self, window: int | None = None):
        """FlexAttention's block mask (built once per forward, shared by the layers)."""
        key = ("block", window)
        if key not in self._cache:
            B, T = self.shape
            self._cache[key] = create_block_mask(
                self._mask_mod(window), B, None, T, T, device=self.doc_ids.device
            )
        return self._cache[key]


def use_flex(q: torch.Tensor) -> bool:
    """Whether `attend` runs a DocumentMask through FlexAttention for this query tensor."""
    if not HAVE_FLEX or _backend == "dense":
        return False
    if _backend == "flex":
        # FlexAttention has no CPU backward: a forced flex path still falls back when training on CPU
        return q.device.type != "cpu" or not torch.is_grad_enabled()
    return q.device.type == "cuda"


def _window_mask(Tq: int, Tk: int, window: int, device: torch.device) -> torch.Tensor:
    """Causal sliding-window mask [Tq, Tk] for queries at the last Tq of Tk positions."""
    q = torch.arange(Tk - Tq, Tk, device=device)[:, None]
    k = torch.arange(Tk, device=device)[None, :]
    d = q - k
    return (d >= 0) & (d < window)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: DocumentMask | torch.Tensor | None = None,
    *,
    window: int | None = None,
    enable_gqa: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of q [B, H, Tq, D] over k, v [B, Hkv, Tk, D] -> [B, H, Tq, D].

    `mask`: None = causal over a fresh sequence (or one query against a cache: no mask);
    a `DocumentMask` for packed rows; a dense boolean tensor (True = may attend) for callers
    that need arbitrary masks (left-padded generation). `window` limits every query to the
    last `window` positions (itself included). `scale` replaces 1/sqrt(head_dim) (Gemma's
    query_pre_attn_scalar)."""
    Tq, Tk = q.shape[2], k.shape[2]
    if isinstance(mask, DocumentMask):
        if use_flex(q):
            fn = _flex_fn(q.device)
            return fn(q, k, v, block_mask=mask.block_mask(window), enable_gqa=enable_gqa, scale=scale)
        dense = mask.dense(window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=enable_gqa, scale=scale)
    if mask is None:
        if window is None or Tk <= window and Tq == Tk:
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=Tq > 1, enable_gqa=enable_gqa, scale=scale
            )
        mask = _window_mask(Tq, Tk, window, q.device)
    elif window is not None:
        mask = mask & _window_mask(Tq, Tk, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa, scale=scale)
