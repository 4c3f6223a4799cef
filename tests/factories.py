"""Tiny models, tokenizers and model folders made in a second: the one set of factories the
tests and benchmarks share (nothing downloaded; tokenizers trained on fixed text, weights random
and seeded, or trained for a few hundred steps on rows the caller gives).

Kept out of the product package (`src/lmforge`) on purpose, and free of pytest imports so that
benchmark scripts can use them on a machine without pytest. `tests/conftest.py` re-exports them.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from lmforge.model.config import ModelConfig
from lmforge.model.hf import save_pretrained
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import LMTokenizer, train_tokenizer

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
def single_thread():
    """Run torch on one CPU thread: tiny models gain nothing from more, and on a busy machine
    OpenMP threads spinning against each other make them many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------- model folders
def save_base_model(d, texts, vocab_size, *, seed=0, **model):
    """Train a BPE tokenizer on `texts` and save it with a fresh random Transformer (default
    init, seeded; 32 wide, 2 layers, 4 heads, 2 KV heads, 64 positions unless `model` says
    otherwise) as an HF-format model in `d`: the base the SFT / align / RL stage tests start
    from. Returns the tokenizer and the model."""
    tok = train_tokenizer(texts, vocab_size=vocab_size)
    tok.save(d)
    torch.manual_seed(seed)
    shape = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64, **model}
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, **shape))
    save_pretrained(model, d, tokenizer_dir=d, bos_id=tok.bos_id, eos_id=tok.eos_id)
    return tok, model


# a served model's text: short sentences a 384-token BPE learns whole words of
CORPUS = [
    "The function returns a list of the items in the mapping.",
    "A socket is one endpoint of a two-way communication link between two programs.",
    "This module provides regular expression matching operations similar to those in Perl.",
    "Return the absolute value of a number. The argument may be an integer or a float.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Open the file and return a stream; raise OSError upon failure.",
] * 8


def make_tiny_model(
    folder: str | Path,
    *,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vocab_size: int = 384,
    max_seq_len: int = 256,
    seed: int = 0,
) -> Path:
    """A real lmforge / Hugging Face model folder (config.json, model.safetensors, a byte-level BPE
    tokenizer with lmforge's chat template) of random seeded weights: gibberish text, real
    shapes. What the serving tests, the web-page test and the serving benchmarks load."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shape = dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads)
    save_base_model(folder, CORPUS, vocab_size, seed=seed, max_seq_len=max_seq_len, **shape)
    return folder
