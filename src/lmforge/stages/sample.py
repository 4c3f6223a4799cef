"""`lmforge sample`: print completions of a few prompts from a trained model (KV-cache
sampling with temperature / top-k / top-p). Writes `sample/samples.jsonl`."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..model.generate import SamplingParams, generate
from ..model.hf import load_pretrained
from ..runs import atomic_write_text
from ..tokenizer import LMTokenizer
from .base import StageContext, define_stage


class SampleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None,
        description="model folder or training checkpoint folder; default: the run's latest trained model",
    )
    prompts: list[str] = Field(
        default_factory=lambda: ["The function returns", "A list is", "This module provides"]
    )
    num_samples: int = Field(1, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.8, ge=0)
    top_k: int | None = Field(50, ge=1)
    top_p: float | None = Field(0.95, gt=0, le=1)
    seed: int | None = None


@define_stage(
    "sample",
    SampleConfig,
    needs=("pretrain",),
    uses_model=True,
    help="print sample completions",
    flags=(
        ("--model", "model", "model folder to sample from"),
        ("--prompt", "prompts", "a prompt (repeatable)"),
    ),
)
def sample_stage(ctx: StageContext) -> dict:
    cfg: SampleConfig = ctx.cfg
    model_dir = Path(cfg.model) if cfg.model else ctx.model_before()
    model = load_pretrained(model_dir, device=ctx.device)
    tok = LMTokenizer.load(
        model_dir if (model_dir / "tokenizer.json").exists() else ctx.input_dir("tokenizer")
    )
    stops = [t for t in (tok.eos_id, tok.end_id) if t is not None]
    params = SamplingParams(
        max_new_tokens=min(cfg.max_new_tokens, model.cfg.max_seq_len - 1),
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        stop_token_ids=stops,
        seed=cfg.seed if cfg.seed is not None else ctx.seed,
    )
    rows = []
    for prompt in cfg.prompts:
        ids = tok.encode(prompt, add_bos=True)[-(model.cfg.max_seq_len - params.max_new_tokens) :]
        outs = generate(model, [ids] * cfg.num_samples, params)
        for out in outs:
            text = tok.decode(out)
            rows.append({"prompt": prompt, "completion": text})
            ctx.log(f"{prompt} ▸{text}")
    atomic_write_text(
        ctx.dir / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    return {"samples": len(rows)}
