"""`lmforge eval`: validation loss, perplexity and bits-per-byte of a trained model, next to
a unigram baseline on the same targets. Writes `eval/results.json`."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..data.shards import load_shard
from ..eval.perplexity import evaluate_shard, token_byte_lengths, unigram_bpb
from ..model.hf import load_pretrained
from ..pipeline import StageContext, register_stage
from ..runs import atomic_write_json
from ..tokenizer import LMTokenizer


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="model folder; default: the run's latest trained model")
    max_tokens: int | None = Field(None, ge=1, description="score at most this many val tokens (default: all)")
    batch_size: int = Field(16, ge=1)
    seq_len: int | None = Field(None, ge=8, description="default: the model's context length")


@register_stage("eval", EvalConfig, needs=("tokenizer", "pretrain"), help="perplexity and bits-per-byte on the val split",
                flags=(("--model", "model", "model folder to evaluate"),))
def eval_stage(ctx: StageContext) -> dict:
    cfg: EvalConfig = ctx.cfg
    model_dir = Path(cfg.model) if cfg.model else ctx.latest_model_dir()
    tok_dir = ctx.input_dir("tokenizer")
    model = load_pretrained(model_dir, device=ctx.device)
    tok = LMTokenizer.load(model_dir if (model_dir / "tokenizer.json").exists() else tok_dir)
    seq_len = cfg.seq_len or model.cfg.max_seq_len
    val, train = load_shard(tok_dir, "val"), load_shard(tok_dir, "train")
    tb = token_byte_lengths(tok)
    res = evaluate_shard(model, val, tb, seq_len=seq_len, batch_size=cfg.batch_size, device=ctx.device,
                         max_tokens=cfg.max_tokens)
    res["unigram_bpb"] = unigram_bpb(train.tokens, val, tb, seq_len=seq_len, max_tokens=cfg.max_tokens)
    res["model"] = str(model_dir)
    atomic_write_json(ctx.dir / "results.json", res)
    ctx.log(f"val loss {res['loss']:.4f}  ppl {res['ppl']:.2f}  bpb {res['bpb']:.4f}  "
            f"(unigram baseline {res['unigram_bpb']:.4f} bpb) on {res['tokens']:,} tokens")
    return {k: v for k, v in res.items() if k != "model"}
