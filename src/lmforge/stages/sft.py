"""`lmforge sft`: supervised fine-tuning on chat data -- full, LoRA, QLoRA or prompt tuning.

Input: a model folder (default: this run's `pretrain/model`; or any imported HF checkpoint via
`sft.model=PATH`) with its tokenizer and chat template, and chat data: `builtin` (questions and
answers derived offline from the standard library, see `data/instruct.py`) and/or JSONL files of
`messages` or `prompt`/`completion` records. Loss is on assistant tokens only (`chat.py`);
short examples are packed into `seq_len` rows with document masking.

Training runs through the shared engine (`train/engine.py`): the objective is `SFTObjective`,
checkpoints and exact resume come for free. The summary reports the held-out assistant-token
loss before and after, and greedy answers to a few held-out questions.

Outputs in `sft/`: `model/` (full weights, HF layout: for LoRA/QLoRA the adapter merged in),
`adapter/` (PEFT-format LoRA or prompt-tuning adapter), `samples.jsonl`, `metrics.jsonl`.
Prompt tuning writes no `model/` (the base is unchanged; load the adapter with it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, cast

import torch
from pydantic import Field, field_validator

from ..chat import ChatFormat, EncodeStats, encode_records, read_jsonl_records, record_to_messages
from ..data.builtin import split_by_key
from ..data.instruct import builtin_instructions
from ..errors import ConfigError, DataError
from ..model.config import ModelConfig
from ..model.generate import SamplingParams, generate
from ..model.hf import from_hf_config, load_pretrained, read_hf_config, save_pretrained
from ..model.transformer import Transformer
from ..peft.base_ref import base_model_ref
from ..peft.lora import (
    LoraSettings,
    apply_lora,
    merge_lora,
    resolve_base_dtype,
    save_adapter,
    trainable_summary,
)
from ..peft.prompt import PromptSettings, PromptTuned, init_ids_for
from ..peft.qlora import (
    QLoraSettings,
    check_quantizable,
    dequantize_model,
    load_quantized,
    nf4_bytes,
)
from ..runs import atomic_write_json, atomic_write_text
from ..serve.batch import generate_batch
from ..serve.request import GenParams
from ..sft.rows import assistant_loss, example_row, pack, row_loader
from ..train.config import TrainConfig
from ..train.engine import Trainer
from ..train.objectives.sft import SFTObjective
from .base import StageContext, define_stage


class SFTConfig(TrainConfig):
    model: str | None = Field(
        None, description="model folder (lmforge or HF); default: this run's pretrain/model"
    )
    data: list[str] = Field(
        default_factory=lambda: ["builtin"],
        description="'builtin' (stdlib Q&A) and/or JSONL files of messages / prompt+completion",
    )
    val_data: list[str] | None = Field(
        None, description="held-out JSONL files; default: a hashed split of `data`"
    )
    val_fraction: float = Field(0.05, gt=0, lt=1)
    max_examples: int | None = Field(None, ge=1, description="cap on training conversations")
    max_val_examples: int = Field(128, ge=1, description="held-out conversations scored before/after")
    seq_len: int | None = Field(
        None,
        ge=8,
        description="default: the model's context (capped by a memory estimate); checked against it",
    )
    packing: bool = Field(
        True,
        description="pack short conversations into seq_len rows (document-masked); false: one per row, "
        "batched by batch_size x seq_len tokens",
    )
    truncation: Literal["truncate", "drop"] = "truncate"
    special_tokens_in_content: Literal["text", "control"] = Field(
        "text", description="special-token strings inside message contents: plain text, or control tokens"
    )
    on_bad_record: Literal["error", "skip"] = "error"
    method: Literal["full", "lora", "qlora", "prompt"] = "full"
    base_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype of the frozen base for lora / prompt; auto = bfloat16 on CUDA (half the "
        "memory), float32 elsewhere",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    qlora: QLoraSettings = Field(default_factory=QLoraSettings)
    prompt_tuning: PromptSettings = Field(default_factory=PromptSettings)
    num_samples: int = Field(4, ge=0, description="held-out questions answered (greedy) in the summary")
    sample_max_new_tokens: int = Field(48, ge=1)
    # SFT-sized defaults for the shared optimisation settings
    max_steps: int = Field(60, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    eval_every: int = Field(0, ge=0)
    checkpoint_every: int = Field(50, ge=0)

    @field_validator("data", "val_data", mode="before")
    @classmethod
    def _listify(cls, v):
        return [v] if isinstance(v, str) else v


def load_records(sources: list[str], max_examples: int | None = None) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for src in sources:
        if src == "builtin":
            out += [(f"builtin:{r['source']}", r) for r in builtin_instructions(max_examples=max_examples)]
        else:
            out += list(read_jsonl_records(src))
    return out


def choose_seq_len(cfg: SFTConfig, mcfg: ModelConfig, model_dir: Path, device, log) -> int:
    """`sft.seq_len`, checked against the model's context; unset, the context, halved while the
    estimated activations of a batch exceed half the free memory (never below 256)."""
    context = mcfg.max_seq_len
    if cfg.seq_len is not None:
        if cfg.seq_len > context:
            raise ConfigError(
                f"sft.seq_len={cfg.seq_len} exceeds the model's context ({context} positions in "
                f"{model_dir / 'config.json'}); set sft.seq_len <= {context}, or leave it unset"
            )
        return cfg.seq_len
    dev = torch.device(device)
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return context
    per_token = mcfg.activation_bytes_per_token(2 if dev.type == "cuda" else 4)
    seq = context
    while seq > 256 and cfg.batch_size * seq * per_token > free / 2:
        seq //= 2
    if seq < context:
        log(
            f"sft.seq_len: the model's context is {context}, capped to {seq} so that a batch of "
            f"{cfg.batch_size} rows (~{cfg.batch_size * seq * per_token / 2**30:.1f} GiB of activations, "
            f"estimated) fits in half the free memory ({free / 2**30:.1f} GiB); set sft.seq_len to choose"
        )
    return seq


def build_model(cfg: SFTConfig, model_dir: Path, fmt: ChatFormat, device: torch.device, seed: int):
    """The model to train for `cfg.method`, and a note for the log."""
    torch.manual_seed(seed)
    if cfg.method == "qlora":
        model = load_quantized(model_dir, cfg.qlora, device=device)
        apply_lora(model, cfg.lora)
        return (
            model,
            f"QLoRA: NF4 base ({nf4_bytes(model) / 2**20:.1f} MiB), compute {cfg.qlora.compute_dtype}",
        )
    base_dtype = resolve_base_dtype(cfg.base_dtype, device)
    frozen = cfg.method in ("lora", "prompt") and base_dtype != "float32"
    model = load_pretrained(model_dir, device=device, dtype=base_dtype if frozen else None).train()
    if cfg.method == "full":
        return model, "full fine-tuning"
    if cfg.method == "lora":
        names = apply_lora(model, cfg.lora)
        return model, f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} on {len(names)} layers"
    pt = PromptTuned(
        model, cfg.prompt_tuning.num_virtual_tokens, init_ids_for(cfg.prompt_tuning, fmt.tok), seed
    )
    return pt.to(device), f"prompt tuning: {cfg.prompt_tuning.num_virtual_tokens} virtual tokens"


def answer(
    model, fmt: ChatFormat, conversations: list[list[dict]], max_new: int, *, reference: bool = False
) -> list[str]:
    """Greedy answers to `conversations`, generated by the serving engine (`reference=True`: by
    the cache-free reference decoder instead, which tests compare against)."""
    room = model.cfg.max_seq_len - getattr(model, "n_virtual", 0)
    max_new = max(1, min(max_new, room // 2))  # leave at least half the context to the prompt
    limit = room - max_new
    prompts = [fmt.prompt_ids(c)[-limit:] for c in conversations]
    model.eval()
    if not reference:  # the serving engine on the model being tuned (its weights left as they are)
        greedy = GenParams(max_tokens=max_new, temperature=0.0, stop_token_ids=fmt.stop_ids)
        outs = [c.token_ids for c in generate_batch(model, prompts, greedy, stop_token_ids=fmt.stop_ids)]
    else:  # the reference decoder, re-running the whole sequence each step
        params = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop_token_ids=fmt.stop_ids)
        outs = generate(model, prompts, params, use_cache=False)
    return [fmt.tok.decode(o, skip_special=True).strip() for o in outs]


def _stats_log(ctx, split: str, st: EncodeStats) -> None:
    skipped = sum(st.skipped.values())
    ctx.log(
        f"{split}: {st.examples} conversations, {st.tokens:,} tokens ({st.assistant_tokens:,} assistant); "
        f"{st.truncated} truncated, {skipped} skipped" + (f" {dict(st.skipped)}" if skipped else "")
    )


@define_stage(
    "sft",
    SFTConfig,
    needs=("pretrain",),
    help="supervised fine-tuning on chat data (full / LoRA / QLoRA / prompt tuning)",
    flags=(
        ("--model", "model", "model folder to fine-tune (lmforge, or an imported HF family: see docs)"),
        ("--data", "data", "JSONL chat data file, or 'builtin'"),
        ("--method", "method", "full | lora | qlora | prompt"),
    ),
)
def sft_stage(ctx: StageContext) -> dict:
    cfg: SFTConfig = ctx.cfg
    model_dir = Path(cfg.model) if cfg.model else ctx.input_dir("pretrain") / "model"
    if not (model_dir / "config.json").exists():
        raise ConfigError(f"sft.model: {model_dir} is not a model folder (no config.json)")
    fmt = ChatFormat.from_dir(model_dir)
    fmt.literal_content = cfg.special_tokens_in_content == "text"
    mcfg = from_hf_config(read_hf_config(model_dir), str(model_dir / "config.json"))
    if cfg.method == "qlora":  # before any data is read: NF4 shape problems name the tensor
        check_quantizable(mcfg, str(model_dir))
    context = mcfg.max_seq_len
    seq_len = choose_seq_len(cfg, mcfg, model_dir, ctx.device, ctx.log)
    if cfg.method == "prompt":
        seq_len = min(seq_len, context - cfg.prompt_tuning.num_virtual_tokens)
    tokens = cfg.batch_size * cfg.grad_accum * seq_len
    keys = "sft.max_steps, sft.batch_size x grad_accum x seq_len, the model's size"
    ctx.estimate_time(mcfg, steps=cfg.max_steps, tokens_per_step=tokens, seq_len=seq_len, keys=keys)
    device = ctx.device

    train_recs, val_recs = _split_records(cfg, ctx.seed)
    train, tst, val, vst = _encode(ctx, cfg, fmt, seq_len, train_recs, val_recs)

    sample_recs = _valid(val_recs[: cfg.max_val_examples])[: cfg.num_samples]
    model, note = build_model(cfg, model_dir, fmt, device, ctx.seed)
    summary = trainable_summary(model)
    ctx.log(
        f"{note}; trainable {summary['trainable_params']:,} of {summary['total_params']:,} parameters "
        f"({100 * summary['trainable_fraction']:.2f}%), optimizer state {summary['optimizer_state_bytes'] / 2**20:.1f} MiB"
    )
    pad = fmt.tok.pad_id if fmt.tok.pad_id is not None else (fmt.tok.eos_id or 0)

    before = _before(ctx, cfg, model, fmt, val, pad, sample_recs)
    if before["val_loss"] is not None:
        ctx.log(f"held-out assistant loss before: {before['val_loss']:.4f}")

    rows = pack(train, seq_len) if cfg.packing else [example_row(e) for e in train]
    ctx.log(
        f"{len(train)} conversations -> {len(rows)} rows of <= {seq_len} tokens"
        + (
            " (packed, document-masked)"
            if cfg.packing
            else f" (batched by {cfg.batch_size * seq_len:,} tokens)"
        )
    )
    loader = row_loader(rows, cfg.batch_size, seq_len, pad, packed=cfg.packing, seed=ctx.seed)

    def evaluate(m):
        return {"loss": assistant_loss(m, val, pad, device)} if val else {}

    trainer = Trainer(
        model,
        SFTObjective(),
        loader,
        cfg,
        ctx.dir,
        device=device,
        dtype=ctx.dtype,
        evaluate=evaluate,
        log=ctx.log,
        optimizer=cfg.qlora.optimizer if cfg.method == "qlora" else None,
    )
    opt_note = type(trainer.optimizer).__name__ if cfg.method == "qlora" else None
    result = trainer.fit(resume=True)
    after_loss = result.final.get("eval_loss")

    samples = []
    if cfg.num_samples and val:
        samples = _after_samples(ctx, cfg, model, fmt, sample_recs, before.get("answers", []))
    atomic_write_text(
        ctx.dir / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    )
    _save_outputs(ctx, cfg, model, model_dir)
    if before["val_loss"] is not None and after_loss is not None:
        ctx.log(f"held-out assistant loss: {before['val_loss']:.4f} -> {after_loss:.4f}")
    metrics = {
        "method": cfg.method,
        "train_examples": tst.examples,
        "val_examples": vst.examples,
        "val_loss_before": before["val_loss"],
        "val_loss_after": after_loss,
        "steps": result.step,
        **result.speed_metrics(),
        "train_loss": result.final.get("loss"),
        "train_seconds": round(result.seconds, 2),
        **summary,
        **{f"train_{k}": v for k, v in tst.as_dict().items() if k.startswith(("truncated", "skipped"))},
        "samples": len(samples),
    }
    if opt_note:
        metrics["optimizer"] = opt_note
    if result.resumed_from is not None:
        metrics["resumed_from_step"] = result.resumed_from
    return metrics


def _encode(ctx: StageContext, cfg: SFTConfig, fmt: ChatFormat, seq_len: int, train_recs, val_recs):
    """Training and held-out examples (assistant-only labels) with their encode statistics."""
    on_error = "skip" if cfg.on_bad_record == "skip" else "raise"
    train, tst = encode_records(train_recs, fmt, seq_len, truncation=cfg.truncation, on_error=on_error)
    val, vst = encode_records(
        val_recs[: cfg.max_val_examples], fmt, seq_len, truncation=cfg.truncation, on_error=on_error
    )
    _stats_log(ctx, "train", tst)
    _stats_log(ctx, "held-out", vst)
    if not train:
        raise ConfigError("sft: no training examples left after filtering; check sft.data / sft.seq_len")
    return train, tst, val, vst


def _before(ctx: StageContext, cfg: SFTConfig, model, fmt: ChatFormat, val, pad: int, sample_recs) -> dict:
    """Held-out loss and sample answers of the starting model, computed once and kept in
    before.json so a resumed stage reports the same 'before'."""
    before_file = ctx.dir / "before.json"
    if before_file.exists():
        return json.loads(before_file.read_text())
    before: dict[str, Any] = {"val_loss": assistant_loss(model, val, pad, ctx.device) if val else None}
    if cfg.num_samples and val:
        convs = [_question_of(r) for _, r in sample_recs]
        before["answers"] = answer(model, fmt, convs, cfg.sample_max_new_tokens)
    atomic_write_json(before_file, before)
    return before


def _split_records(cfg: SFTConfig, seed: int):
    """Training and held-out records: `val_data` when given, else a hashed split (a record's
    side depends only on its own content and the seed)."""
    records = load_records(cfg.data, cfg.max_examples)
    if cfg.val_data:
        train_recs, val_recs = records, load_records(cfg.val_data)
    else:
        keys = [json.dumps(r, sort_keys=True, default=str) for _, r in records]
        train_recs, val_recs = split_by_key(records, keys, cfg.val_fraction, seed)
    if cfg.max_examples:
        train_recs = train_recs[: cfg.max_examples]
    return train_recs, val_recs


def _after_samples(
    ctx: StageContext, cfg: SFTConfig, model, fmt: ChatFormat, sample_recs, before: list
) -> list:
    """Greedy answers to the held-out sample questions after training, next to the reference and
    the answers before (logged and returned for samples.jsonl)."""
    convs = [_question_of(r) for _, r in sample_recs]
    outs = answer(model, fmt, convs, cfg.sample_max_new_tokens)
    samples = []
    for c, ref, b, a in zip(convs, [_reference(r) for _, r in sample_recs], before, outs):
        samples.append({"question": c[-1]["content"], "reference": ref, "before": b, "after": a})
        ctx.log(f"Q: {c[-1]['content']}\n   before: {b}\n   after:  {a}\n   ref:    {ref}")
    return samples


def _save_outputs(ctx: StageContext, cfg: SFTConfig, model, model_dir: Path) -> None:
    """model/ (full weights; LoRA/QLoRA merged in, dequantised) and adapter/ (PEFT format)."""
    hf = read_hf_config(model_dir)
    ids = dict(bos_id=hf.get("bos_token_id"), eos_id=hf.get("eos_token_id"))
    if cfg.method == "full":
        save_pretrained(model, ctx.dir / "model", tokenizer_dir=model_dir, **ids)
    elif cfg.method in ("lora", "qlora"):
        save_adapter(
            model, ctx.dir / "adapter", base_model=base_model_ref(model_dir, ctx.dir / "adapter", ctx.run_dir)
        )
        merged = cast(Transformer, merge_lora(model))  # the base model with the adapters folded in
        if cfg.method == "qlora":
            merged = dequantize_model(merged, torch.float32)
        save_pretrained(merged, ctx.dir / "model", tokenizer_dir=model_dir, **ids)
    else:
        model.save_adapter(
            ctx.dir / "adapter",
            base_model=base_model_ref(model_dir, ctx.dir / "adapter", ctx.run_dir),
            settings=cfg.prompt_tuning,
            tokenizer=base_model_ref(model_dir, ctx.dir / "adapter", ctx.run_dir),
        )


def _messages(rec) -> list[dict]:
    return record_to_messages(rec)


def _valid(recs) -> list:
    out = []
    for w, r in recs:
        try:
            record_to_messages(r, w)
        except DataError:
            continue
        out.append((w, r))
    return out


def _question_of(rec) -> list[dict]:
    """The conversation up to (not including) its first assistant turn."""
    msgs = _messages(rec)
    first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:first]


def _reference(rec) -> str:
    return next(m["content"] for m in _messages(rec) if m["role"] == "assistant")
