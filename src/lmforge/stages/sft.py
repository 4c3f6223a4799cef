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
from typing import Literal

import torch
from pydantic import Field, field_validator

from ..chat import (
    ChatFormat,
    EncodeStats,
    SFTObjective,
    assistant_loss,
    encode_records,
    example_row,
    pack,
    read_jsonl_records,
    record_to_messages,
    row_loader,
)
from ..data.builtin import split_by_key, split_train_val
from ..data.instruct import builtin_instructions
from ..errors import ConfigError, DataError
from ..model.config import ModelConfig
from ..model.generate import SamplingParams, generate
from ..model.hf import from_hf_config, load_pretrained, read_hf_config, save_pretrained
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
    build_optimizer,
    check_quantizable,
    dequantize_model,
    load_quantized,
    nf4_bytes,
)
from ..runs import atomic_write_json, atomic_write_text
from ..train.engine import TrainConfig, Trainer
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
    model, fmt: ChatFormat, conversations: list[list[dict]], max_new: int, use_cache: bool
) -> list[str]:
    room = model.cfg.max_seq_len - getattr(model, "n_virtual", 0)
    max_new = max(1, min(max_new, room // 2))  # leave at least half the context to the prompt
    limit = room - max_new
    prompts = [fmt.prompt_ids(c)[-limit:] for c in conversations]
    model.eval()
    outs = generate(
        model,
        prompts,
        SamplingParams(max_new_tokens=max_new, temperature=0.0, stop_token_ids=fmt.stop_ids),
        use_cache=use_cache,
    )
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
    device = ctx.device

    records = load_records(cfg.data, cfg.max_examples)
    if cfg.val_data:
        train_recs, val_recs = records, load_records(cfg.val_data)
    else:  # a hashed split: a record's side depends only on its own content and the seed
        keys = [json.dumps(r, sort_keys=True, default=str) for _, r in records]
        train_recs, val_recs = split_by_key(records, keys, cfg.val_fraction, ctx.seed)
    if cfg.max_examples:
        train_recs = train_recs[: cfg.max_examples]
    on_error = "skip" if cfg.on_bad_record == "skip" else "raise"
    train, tst = encode_records(train_recs, fmt, seq_len, truncation=cfg.truncation, on_error=on_error)
    val, vst = encode_records(
        val_recs[: cfg.max_val_examples], fmt, seq_len, truncation=cfg.truncation, on_error=on_error
    )
    _stats_log(ctx, "train", tst)
    _stats_log(ctx, "held-out", vst)
    if not train:
        raise ConfigError("sft: no training examples left after filtering; check sft.data / sft.seq_len")

    sample_recs = _valid(val_recs[: cfg.max_val_examples])[: cfg.num_samples]
    model, note = build_model(cfg, model_dir, fmt, device, ctx.seed)
    summary = trainable_summary(model)
    ctx.log(
        f"{note}; trainable {summary['trainable_params']:,} of {summary['total_params']:,} parameters "
        f"({100 * summary['trainable_fraction']:.2f}%), optimizer state {summary['optimizer_state_bytes'] / 2**20:.1f} MiB"
    )
    pad = fmt.tok.pad_id if fmt.tok.pad_id is not None else (fmt.tok.eos_id or 0)

    before_file = ctx.dir / "before.json"
    if before_file.exists():
        before = json.loads(before_file.read_text())
    else:
        before = {"val_loss": assistant_loss(model, val, pad, device) if val else None}
        if cfg.num_samples and val:
            convs = [_question_of(r) for _, r in sample_recs]
            before["answers"] = answer(model, fmt, convs, cfg.sample_max_new_tokens, cfg.method != "prompt")
        atomic_write_json(before_file, before)
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
    )
    opt_note = None
    if cfg.method == "qlora" and cfg.qlora.optimizer != "adamw":
        trainer.optimizer, opt_note = build_optimizer(
            model.parameters(), cfg.qlora, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2)
        )
        ctx.log(f"optimizer: {opt_note}")
    result = trainer.fit(resume=True)
    after_loss = result.final.get("eval_loss")

    samples = []
    if cfg.num_samples and val:
        convs = [_question_of(r) for _, r in sample_recs]
        outs = answer(model, fmt, convs, cfg.sample_max_new_tokens, cfg.method != "prompt")
        for c, ref, b, a in zip(
            convs, [_reference(r) for _, r in sample_recs], before.get("answers", []), outs
        ):
            samples.append({"question": c[-1]["content"], "reference": ref, "before": b, "after": a})
            ctx.log(f"Q: {c[-1]['content']}\n   before: {b}\n   after:  {a}\n   ref:    {ref}")
    atomic_write_text(
        ctx.dir / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    )

    hf = read_hf_config(model_dir)
    ids = dict(bos_id=hf.get("bos_token_id"), eos_id=hf.get("eos_token_id"))
    if cfg.method == "full":
        save_pretrained(model, ctx.dir / "model", tokenizer_dir=model_dir, **ids)
    elif cfg.method in ("lora", "qlora"):
        save_adapter(model, ctx.dir / "adapter", base_model=str(model_dir.resolve()))
        merged = merge_lora(model)
        if cfg.method == "qlora":
            merged = dequantize_model(merged, torch.float32)
        save_pretrained(merged, ctx.dir / "model", tokenizer_dir=model_dir, **ids)
    else:
        model.save_adapter(
            ctx.dir / "adapter",
            base_model=str(model_dir.resolve()),
            settings=cfg.prompt_tuning,
            tokenizer=str(model_dir.resolve()),
        )
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


# =============================================================================================
# `lmforge cpt`: continued pretraining on a new domain, with replay and an annealing phase.
# (Lives here because it shares the model-loading path; it is its own stage.)
# =============================================================================================
class CPTConfig(TrainConfig):
    model: str | None = Field(None, description="model folder; default: this run's pretrain/model")
    domain: list[str] = Field(
        default_factory=list,
        description="new-domain text: files/folders/globs (.txt/.jsonl/...); empty = skip stage",
    )
    domain_val_fraction: float = Field(0.05, gt=0, lt=1)
    replay: str | None = Field(
        None,
        description="folder with the original corpus' token shards (train/val.bin); "
        "default: this run's tokenizer stage",
    )
    replay_fraction: float = Field(
        0.25, ge=0, lt=1, description="share of every batch drawn from the original corpus"
    )
    seq_len: int = Field(256, ge=8)
    eval_tokens: int = Field(32768, ge=0, description="tokens scored per domain at each eval (0 = all)")
    anneal_steps: int = Field(0, ge=0, description="extra steps with the LR decaying linearly to zero")
    anneal_data: list[str] | None = Field(
        None, description="curated high-quality text for annealing; default: domain"
    )
    anneal_replay_fraction: float = Field(0.5, ge=0, lt=1)
    max_steps: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "constant"
    eval_every: int = Field(50, ge=0)

    @field_validator("domain", "anneal_data", mode="before")
    @classmethod
    def _listify(cls, v):
        return [v] if isinstance(v, str) else v


class MixLoader:
    """Every batch = rows from each loader (new domain, replay), concatenated; resumable."""

    def __init__(self, loaders: list):
        self.loaders = loaders

    def __iter__(self):
        return self

    def __next__(self):
        xs, ys = zip(*(next(ld) for ld in self.loaders))
        return torch.cat(xs), torch.cat(ys)

    def state_dict(self) -> dict:
        return {"loaders": [ld.state_dict() for ld in self.loaders]}

    def load_state_dict(self, state: dict) -> None:
        for ld, s in zip(self.loaders, state["loaders"]):
            ld.load_state_dict(s)


def _tokenize_texts(spec: list[str], tok, out: Path, name: str, val_fraction: float | None, seed: int):
    from ..data.readers import iter_documents
    from ..data.shards import load_shard, write_token_shards

    texts = [d.text for d in iter_documents(spec) if d.text.strip()]
    if not texts:
        raise DataError(f"cpt: {spec} holds no text")
    if val_fraction is None:
        write_token_shards(texts, tok, out, name)
        return load_shard(out, name), None
    train, val = split_train_val(texts, val_fraction, seed)
    write_token_shards(train, tok, out, f"{name}_train")
    write_token_shards(val or train[:1], tok, out, f"{name}_val")
    return load_shard(out, f"{name}_train"), load_shard(out, f"{name}_val")


def _mix(cfg: CPTConfig, main, replay, fraction: float, seed: int) -> MixLoader:
    from ..data.shards import TokenLoader

    n_replay = round(cfg.batch_size * fraction) if replay is not None else 0
    if fraction > 0 and replay is not None and n_replay == 0:
        n_replay = 1
    n_main = cfg.batch_size - n_replay
    if n_main < 1:
        raise ConfigError(
            f"cpt.batch_size={cfg.batch_size} leaves no rows for the new domain at replay fraction {fraction}"
        )
    loaders = [TokenLoader(main, cfg.seq_len, n_main, seed=seed)]
    if n_replay:
        loaders.append(TokenLoader(replay, cfg.seq_len, n_replay, seed=seed + 1))
    return MixLoader(loaders)


@define_stage(
    "cpt",
    CPTConfig,
    needs=("tokenizer", "pretrain"),
    help="continued pretraining on a new domain (replay, annealing); skipped without cpt.domain",
    flags=(
        ("--model", "model", "model folder to continue"),
        ("--domain", "domain", "new-domain text file or folder"),
    ),
)
def cpt_stage(ctx: StageContext) -> dict:
    from ..data.shards import load_shard
    from ..eval.perplexity import evaluate_shard, token_byte_lengths
    from ..runs import file_sha256
    from ..tokenizer import LMTokenizer
    from ..train.engine import pretrain_objective

    cfg: CPTConfig = ctx.cfg
    if not cfg.domain:
        ctx.log("no cpt.domain configured; nothing to do (set cpt.domain=PATH to continue pretraining)")
        return {"skipped": True}
    model_dir = Path(cfg.model) if cfg.model else ctx.input_dir("pretrain") / "model"
    tok = LMTokenizer.load(model_dir)
    device = ctx.device
    data_dir = ctx.dir / "data"
    dom_train, dom_val = _tokenize_texts(
        cfg.domain, tok, data_dir, "domain", cfg.domain_val_fraction, ctx.seed
    )

    replay_dir = Path(cfg.replay) if cfg.replay else None
    if replay_dir is None:
        try:
            replay_dir = ctx.input_dir("tokenizer")
        except Exception:
            replay_dir = None
    orig_train = orig_val = None
    if replay_dir is not None and (replay_dir / "train.json").exists():
        a, b = replay_dir / "tokenizer.json", model_dir / "tokenizer.json"
        if a.exists() and b.exists() and file_sha256(a) != file_sha256(b):
            raise ConfigError(
                f"cpt.replay: {replay_dir} was tokenized with a different tokenizer than "
                f"{model_dir}; point cpt.replay at shards made with the model's tokenizer or set "
                f"cpt.replay_fraction=0"
            )
        orig_train, orig_val = load_shard(replay_dir, "train"), load_shard(replay_dir, "val")
    elif cfg.replay_fraction > 0:
        raise ConfigError(
            "cpt.replay_fraction > 0 needs the original corpus' token shards: run the tokenizer "
            "stage or set cpt.replay=FOLDER (or cpt.replay_fraction=0)"
        )

    model = load_pretrained(model_dir, device=device).train()
    token_bytes = token_byte_lengths(tok)

    def evaluate(m):
        kw = dict(
            seq_len=cfg.seq_len, batch_size=cfg.batch_size, device=device, max_tokens=cfg.eval_tokens or None
        )
        out = {"loss": evaluate_shard(m, dom_val, token_bytes, **kw)["loss"]}
        if orig_val is not None:
            out["orig_loss"] = evaluate_shard(m, orig_val, token_bytes, **kw)["loss"]
        return out

    before = evaluate(model)
    ctx.log(
        f"before: new-domain loss {before['loss']:.4f}"
        + (f", original-corpus loss {before['orig_loss']:.4f}" if "orig_loss" in before else "")
    )
    loader = _mix(cfg, dom_train, orig_train, cfg.replay_fraction, ctx.seed)
    result = Trainer(
        model,
        pretrain_objective(),
        loader,
        cfg,
        ctx.dir,
        device=device,
        dtype=ctx.dtype,
        evaluate=evaluate,
        log=ctx.log,
    ).fit(resume=True)
    after = {"loss": result.final.get("eval_loss"), "orig_loss": result.final.get("eval_orig_loss")}
    metrics = {
        "domain_loss_before": before["loss"],
        "orig_loss_before": before.get("orig_loss"),
        "domain_loss_after": after["loss"],
        "orig_loss_after": after["orig_loss"],
        "replay_fraction": cfg.replay_fraction,
        "steps": result.step,
        **result.speed_metrics(),
        "domain_train_tokens": dom_train.n_tokens,
    }
    if cfg.anneal_steps:
        src = dom_train
        if cfg.anneal_data:
            src, _ = _tokenize_texts(cfg.anneal_data, tok, data_dir, "anneal", None, ctx.seed)
        acfg = cfg.model_copy(
            update={
                "max_steps": cfg.anneal_steps,
                "schedule": "wsd",
                "decay_fraction": 1.0,
                "min_lr_ratio": 0.0,
                "warmup_steps": 0,
            }
        )
        aloader = _mix(acfg, src, orig_train, cfg.anneal_replay_fraction, ctx.seed + 7)
        ares = Trainer(
            model,
            pretrain_objective(),
            aloader,
            acfg,
            ctx.dir / "anneal",
            device=device,
            dtype=ctx.dtype,
            evaluate=evaluate,
            log=ctx.log,
        ).fit(resume=True)
        metrics.update(
            domain_loss_after_anneal=ares.final.get("eval_loss"),
            orig_loss_after_anneal=ares.final.get("eval_orig_loss"),
            anneal_steps=ares.step,
        )
    hf = read_hf_config(model_dir)
    save_pretrained(
        model,
        ctx.dir / "model",
        tokenizer_dir=model_dir,
        bos_id=hf.get("bos_token_id"),
        eos_id=hf.get("eos_token_id"),
    )
    ctx.log(
        "new-domain loss {:.4f} -> {:.4f}; original-corpus loss {} -> {}".format(
            before["loss"],
            metrics.get("domain_loss_after_anneal") or after["loss"],
            _f(before.get("orig_loss")),
            _f(metrics.get("orig_loss_after_anneal") or after["orig_loss"]),
        )
    )
    return metrics


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"
