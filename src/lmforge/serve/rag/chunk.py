"""Cut documents into retrieval chunks: paragraphs packed up to `max_words`, long paragraphs
split at sentence ends, consecutive chunks sharing `overlap` words so an answer that straddles a
boundary is still whole in one of them."""

from __future__ import annotations

import re

_SENT = re.compile(r"(?<=[.!?])\s+")


def _pieces(text: str, max_words: int) -> list[list[str]]:
    """Paragraphs (as word lists), paragraphs over max_words split into sentences, sentences over
    max_words split into windows."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        words = para.split()
        if not words:
            continue
        if len(words) <= max_words:
            out.append(words)
            continue
        for sent in _SENT.split(para):
            w = sent.split()
            for i in range(0, len(w), max_words):
                if w[i : i + max_words]:
                    out.append(w[i : i + max_words])
    return out


def chunk_text(text: str, max_words: int = 120, overlap: int = 20) -> list[str]:
    """Chunks of at most `max_words` words (whitespace normalised within a paragraph)."""
    if max_words < 1 or not 0 <= overlap < max_words:
        raise ValueError("need max_words >= 1 and 0 <= overlap < max_words")
    chunks: list[list[str]] = []
    cur: list[str] = []
    for piece in _pieces(text, max_words):
        if cur and len(cur) + len(piece) > max_words:
            chunks.append(cur)
            tail = cur[-overlap:] if overlap else []
            cur = tail if len(tail) + len(piece) <= max_words else []
        cur = cur + piece
    if cur:
        chunks.append(cur)
    return [" ".join(c) for c in chunks]
