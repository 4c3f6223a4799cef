"""Tiny models and tokenizers built in a second, for tests and benchmarks of the evaluation code.

Nothing here is downloaded: the tokenizer is trained on a fixed paragraph, models are random or
trained for a few hundred steps on text the caller gives.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence

import torch

from ..model.config import ModelConfig
from ..model.transformer import Transformer
from ..tokenizer import LMTokenizer, train_tokenizer

WORDS = (
    "apple river stone cloud music garden silver window forest candle paper bridge ocean "
    "tiger pencil mirror rocket valley castle orange winter summer number letter yellow "
    "purple market doctor island planet engine button pocket circle square"
).split()

PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog. A list is a mutable sequence of items, and lists "
    "are ordered. Return the sum of the numbers in the iterable. Question: what is two plus two? "
    "Answer: four. The function returns None when the key is missing. " + " ".join(WORDS) + ". "
)


def tiny_tokenizer(vocab_size: int = 320, extra: Sequence[str] = ()) -> LMTokenizer:
    """A byte-level BPE trained on a fixed paragraph (and `extra` texts): deterministic, < 1 s."""
    return train_tokenizer([PARAGRAPH] * 20 + list(extra), vocab_size)


def tiny_model(
    vocab_size: int,
    *,
    d_model: int = 32,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    max_seq_len: int = 64,
    init_std: float = 0.2,
    seed: int = 0,
) -> Transformer:
    """A random lmforge Transformer; a large init_std makes its predictions far from uniform, so
    tests comparing scores are sensitive to any mistake."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        max_seq_len=max_seq_len,
        init_std=init_std,
        tie_embeddings=False,
    )
    return Transformer(cfg).eval()


def random_sentences(n: int, seed: int, words_per: tuple[int, int] = (4, 7)) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words_per))).capitalize() + "."
        for _ in range(n)
    ]


def train_on(
    model: Transformer,
    token_rows: Sequence[Sequence[int]],
    *,
    steps: int = 200,
    lr: float = 3e-3,
    batch_size: int = 8,
    seed: int = 0,
) -> Transformer:
    """Next-token training on fixed rows (each at most max_seq_len + 1 tokens), AdamW, seeded."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.tensor(list(r)) for r in token_rows]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(rows), (batch_size,), generator=g).tolist()
        L = min(len(rows[i]) for i in idx)
        batch = torch.stack([rows[i][:L] for i in idx])
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@contextlib.contextmanager
def one_thread():
    """Run torch on one CPU thread: tiny models gain nothing from more, and on a busy machine
    OpenMP threads spinning against each other make them many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
