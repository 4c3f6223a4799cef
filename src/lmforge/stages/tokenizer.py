"""`lmforge tokenizer`: train (or adopt) a byte-level BPE tokenizer and tokenize the corpus.

Outputs `tokenizer.json` (+ `tokenizer_config.json` with the chat template) and the token
shards `train.bin` / `val.bin` with their indexes, which pretraining memory-maps.
"""

from __future__ import annotations

import itertools

from pydantic import BaseModel, ConfigDict, Field

from ..data.shards import write_token_shards
from ..tokenizer import LMTokenizer, bytes_per_token, train_tokenizer
from .base import StageContext, define_stage
from .data import iter_output_texts


class TokenizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(4096, ge=300, le=1_000_000, description="including special tokens")
    min_frequency: int = Field(2, ge=1)
    max_train_docs: int | None = Field(None, ge=1, description="train BPE on at most this many documents")
    path: str | None = Field(
        None, description="use this tokenizer (folder or tokenizer.json) instead of training one"
    )


@define_stage(
    "tokenizer", TokenizerConfig, needs=("data",), help="train the BPE tokenizer and tokenize the corpus"
)
def tokenizer_stage(ctx: StageContext) -> dict:
    cfg: TokenizerConfig = ctx.cfg
    data_dir = ctx.input_dir("data")
    if cfg.path:
        tok = LMTokenizer.load(cfg.path)
        ctx.log(f"using tokenizer {cfg.path} (vocab {tok.vocab_size:,})")
    else:
        texts = iter_output_texts(data_dir, "train")
        if cfg.max_train_docs:
            texts = itertools.islice(texts, cfg.max_train_docs)
        tok = train_tokenizer(texts, cfg.vocab_size, cfg.min_frequency)
        ctx.log(f"trained byte-level BPE, vocab {tok.vocab_size:,}")
    tok.save(ctx.dir)
    metrics: dict[str, float] = {"vocab_size": tok.vocab_size}
    for split in ("train", "val"):
        index = write_token_shards(iter_output_texts(data_dir, split), tok, ctx.dir, split)
        metrics[f"{split}_tokens"] = index["n_tokens"]
        metrics[f"{split}_bytes"] = index["n_bytes"]
    val_sample = list(itertools.islice(iter_output_texts(data_dir, "val"), 2000))
    metrics["val_bytes_per_token"] = round(bytes_per_token(tok, val_sample), 4)
    ctx.log(
        f"train {metrics['train_tokens']:,} tokens, val {metrics['val_tokens']:,} tokens; "
        f"{metrics['val_bytes_per_token']:.2f} bytes/token on val"
    )
    return metrics
