"""`lmforge align`: preference alignment after SFT.

`align --method dpo|ipo|hinge|orpo` optimises the policy directly on the pairs; `--method
ppo|grpo` hands over to the on-policy RL loop (`lmforge.align.rl.run_rl`). Both start from the
run's latest model before them (the SFT model) unless `--model` is given, train through the one
engine (`Trainer`: checkpoints, exact resume, clipping, non-finite steps skipped), with full
weights, LoRA or QLoRA (`align.peft`). The reference of DPO/IPO/hinge is the starting policy (or
`align.ref_model`); with `precompute_ref` (default) it scores every pair once before training,
the numbers go to `ref_logps.safetensors` and no second model stays in memory.

The held-out figures are logged and recorded before and after training: preference accuracy
(chosen more likely than rejected), mean margin, the implicit-reward accuracy and the KL to the
reference; dropped pairs are counted by reason (see `align/preference.py`). Pair preparation and
model loading here are shared with the `reward` stage (`stages/reward.py`).
Outputs in `align/`: `model/` (HF folder; LoRA/QLoRA merged), `adapter/` (PEFT, for LoRA/QLoRA),
`before.json`, `metrics.jsonl`.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

import torch
from torch import nn

from ..align.config import RL_METHODS, AlignConfig
from ..align.pair_batches import PairLoader
from ..align.preference import PairStats, encode_pairs, load_preference_records
from ..align.reference import CACHE_FILE, pair_logps, precompute_reference
from ..align.rl import run_rl
from ..chat import ChatFormat
from ..data.builtin import split_by_key
from ..errors import ConfigError
from ..model.hf import load_pretrained, read_hf_config, save_pretrained
from ..model.transformer import Transformer
from ..peft.base_ref import base_model_ref
from ..peft.lora import apply_lora, merge_lora, save_adapter, trainable_summary
from ..peft.qlora import dequantize_model, load_quantized
from ..runs import atomic_write_json
from ..stats import wilson
from ..train.engine import Trainer
from ..train.objectives.preference import REFERENCE_METHODS, PreferenceObjective, preference_eval_metrics
from .base import StageContext, define_stage

M = TypeVar("M", bound=nn.Module)


# ----------------------------------------------------------------------------- shared helpers
def _log_stats(ctx: StageContext, split: str, st: PairStats) -> None:
    ctx.log(f"{split}: {st.line()}")
    for note in st.notes:
        ctx.log(f"  dropped {note}")


def prepare_pairs(ctx: StageContext, cfg, fmt: ChatFormat, seq_len: int):
    """Train / held-out pairs (a hashed split of `cfg.data` unless `cfg.val_data`), with stats."""
    records = load_preference_records(cfg.data, cfg.max_examples)
    if cfg.val_data:
        train_recs, val_recs = records, load_preference_records(cfg.val_data)
    else:  # a record's side depends only on its content and the seed: reward and align agree
        keys = [json.dumps(r, sort_keys=True, default=str) for _, r in records]
        train_recs, val_recs = split_by_key(records, keys, cfg.val_fraction, ctx.seed)
    if cfg.max_examples:
        train_recs = train_recs[: cfg.max_examples]
    kw = dict(max_prompt_len=cfg.max_prompt_len, truncation=cfg.truncation)
    train, tst = encode_pairs(train_recs, fmt, seq_len, **kw)
    val, vst = encode_pairs(val_recs[: cfg.max_val_examples], fmt, seq_len, **kw)
    _log_stats(ctx, "train", tst)
    _log_stats(ctx, "held-out", vst)
    if not train:
        raise ConfigError(
            f"{ctx.name}: no usable training pairs in {cfg.data} ({tst.line()}); check the data "
            f"format (docs/alignment.md) and {ctx.name}.seq_len"
        )
    return train, val, tst, vst


def pad_id_of(fmt: ChatFormat) -> int:
    tok = fmt.tok
    return tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)


def context_len(model_dir: Path, seq_len: int | None) -> int:
    return seq_len or read_hf_config(model_dir).get("max_position_embeddings", 2048)


def estimate_pair_time(ctx: StageContext, cfg, model_dir: Path, seq_len: int) -> None:
    """Before training on pairs (reward model, DPO family): two sequences of up to seq_len each."""
    ctx.estimate_time(
        model_dir,
        steps=cfg.max_steps,
        tokens_per_step=2 * cfg.batch_size * cfg.grad_accum * seq_len,
        seq_len=seq_len,
        keys=f"{ctx.name}.max_steps, {ctx.name}.batch_size x grad_accum x seq_len, the model's size",
    )


def estimate_rl_time(ctx: StageContext, cfg: AlignConfig, model_dir: Path) -> None:
    """Before PPO/GRPO: each optimizer step trains on batch_size sequences of prompt + completion
    (6N FLOPs a token) and, spread over the `epochs` passes of a rollout, generated them (2N)."""
    name = "ppo" if cfg.method == "ppo" else "grpo"
    s = cfg.ppo if name == "ppo" else cfg.grpo
    seq = min(
        context_len(model_dir, cfg.seq_len), (cfg.max_prompt_len or s.max_new_tokens) + s.max_new_tokens
    )
    ctx.estimate_time(
        model_dir,
        steps=cfg.max_steps,
        tokens_per_step=cfg.batch_size * cfg.grad_accum * seq * (1 + 1 / (3 * s.epochs)),
        seq_len=seq,
        keys=f"{ctx.name}.max_steps, {ctx.name}.batch_size, {ctx.name}.{name}.max_new_tokens, the model's size",
    )


def load_lm(cfg, model_dir: Path, device: torch.device, *, trainable: bool, seed: int = 0):
    """The causal LM for `cfg.peft`: full weights; frozen fp32 base + LoRA; NF4 base + LoRA.
    With trainable=False: the same base, frozen, without adapters (a reference model)."""
    torch.manual_seed(seed)
    if cfg.peft == "qlora":
        model = load_quantized(model_dir, cfg.qlora, device=device)
    else:
        model = load_pretrained(model_dir, device=device)
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval(), "frozen reference"
    model.train()
    if cfg.peft == "full":
        return model, "full weights"
    names = apply_lora(model, cfg.lora)
    base = "NF4 base" if cfg.peft == "qlora" else "frozen base"
    return (
        model,
        f"{cfg.peft.upper() if cfg.peft == 'qlora' else 'LoRA'} r={cfg.lora.r} on {len(names)} layers ({base})",
    )


def _save_policy(cfg, model: Transformer, out: Path, model_dir: Path) -> None:
    hf = read_hf_config(model_dir)
    ids = dict(bos_id=hf.get("bos_token_id"), eos_id=hf.get("eos_token_id"))
    if cfg.peft == "full":
        save_pretrained(model, out / "model", tokenizer_dir=model_dir, **ids)
        return
    save_adapter(model, out / "adapter", base_model=base_model_ref(model_dir, out / "adapter", out.parent))
    save_pretrained(merge_adapters(model, cfg.peft), out / "model", tokenizer_dir=model_dir, **ids)


def merge_adapters(model: M, peft: str) -> M:
    """`model` with its LoRA layers merged (and, for QLoRA, its NF4 base dequantised to fp32).
    Both steps rewrite the module in place and return it, so its type is kept."""
    if peft == "full":
        return model
    merged = merge_lora(model)
    if peft == "qlora":
        merged = dequantize_model(cast(Transformer, merged), torch.float32)
    return cast(M, merged)


def _free() -> None:
    """Return freed model memory now (call after dropping the last reference)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- align
@define_stage(
    "align",
    AlignConfig,
    needs=("sft", "reward"),
    help="preference alignment: DPO / IPO / hinge / ORPO, or PPO / GRPO",
    flags=(
        ("--model", "model", "policy to align (default: the SFT model)"),
        ("--data", "data", "preference JSONL (dpo/ipo/hinge/orpo) or prompts (ppo/grpo), or 'builtin'"),
        ("--method", "method", "dpo | ipo | hinge | orpo | ppo | grpo"),
    ),
)
def align_stage(ctx: StageContext) -> dict:
    cfg: AlignConfig = ctx.cfg
    if cfg.method in RL_METHODS:
        model_dir = Path(cfg.model) if cfg.model else ctx.model_before()
        estimate_rl_time(ctx, cfg, model_dir)
        return run_rl(ctx, cfg, model_dir=model_dir)
    return run_preference(ctx, cfg)


def run_preference(ctx: StageContext, cfg: AlignConfig) -> dict:
    model_dir, ref_dir = _model_dirs(ctx, cfg)
    fmt = ChatFormat.from_dir(model_dir)
    seq_len = context_len(model_dir, cfg.seq_len)
    estimate_pair_time(ctx, cfg, model_dir, seq_len)
    device = ctx.device
    train, val, tst, vst = prepare_pairs(ctx, cfg, fmt, seq_len)
    pad = pad_id_of(fmt)

    policy, note = load_lm(cfg, model_dir, device, trainable=True, seed=ctx.seed)
    summary = trainable_summary(policy)
    ctx.log(
        f"{cfg.method} (beta {cfg.beta}) on {model_dir}: {note}; trainable {summary['trainable_params']:,} of "
        f"{summary['total_params']:,} parameters"
    )
    table, ref_model, ref_kind, ref_cached = _reference(ctx, cfg, policy, model_dir, ref_dir, train, val, pad)
    ref_c = torch.tensor([table[p.key()][0] for p in val])
    ref_r = torch.tensor([table[p.key()][1] for p in val])

    def evaluate(m):
        if not val:
            return {}
        pc, pr, nc, nr = pair_logps(m, val, pad, device, cfg.eval_batch_size)
        return preference_eval_metrics(
            pc, pr, nc, nr, ref_c, ref_r, cfg.method, cfg.beta, cfg.label_smoothing
        )

    before = _before(ctx, evaluate, policy)
    loader = PairLoader(
        train, cfg.batch_size, pad, seed=ctx.seed, ref=table if ref_cached else None, packed=True
    )
    objective = PreferenceObjective(cfg.method, cfg.beta, cfg.label_smoothing, ref_model=ref_model)
    result = Trainer(
        policy,
        objective,
        loader,
        cfg,
        ctx.dir,
        device=device,
        dtype=ctx.dtype,
        evaluate=evaluate if val else None,
        log=ctx.log,
        optimizer=cfg.qlora.optimizer if cfg.peft == "qlora" else None,
    ).fit(resume=True)
    after = {k[len("eval_") :]: v for k, v in result.final.items() if k.startswith("eval_")}
    if val and "accuracy" not in after:
        after = evaluate(policy)
    if ref_model is not None:
        ref_model = objective.ref_model = None
        _free()
    _save_policy(cfg, policy, ctx.dir, model_dir)

    # the first five numbers are what `lmforge run`'s summary table shows for this stage
    metrics = {
        "method": cfg.method,
        "val_reward_accuracy_before": before.get("reward_accuracy"),
        "val_reward_accuracy_after": after.get("reward_accuracy"),
        "val_accuracy_before": before.get("accuracy"),
        "val_accuracy_after": after.get("accuracy"),
        "val_log_ratio_chosen_after": after.get("log_ratio_chosen"),
        "val_accuracy_norm_before": before.get("accuracy_norm"),
        "val_accuracy_norm_after": after.get("accuracy_norm"),
        "val_margin_before": before.get("margin"),
        "val_margin_after": after.get("margin"),
        "val_reward_margin_before": before.get("reward_margin"),
        "val_reward_margin_after": after.get("reward_margin"),
        "val_loss_before": before.get("loss"),
        "val_loss_after": after.get("loss"),
        "val_pairs": len(val),
        "train_pairs": len(train),
        "beta": cfg.beta,
        "peft": cfg.peft,
        "reference": ref_kind,
        "steps": result.step,
        "train_loss": result.final.get("loss"),
        "train_seconds": round(result.seconds, 2),
        **result.speed_metrics(),
        "trainable_params": summary["trainable_params"],
        **{f"train_{k}": v for k, v in tst.as_dict().items() if k.startswith(("dropped", "truncated"))},
        **{f"val_{k}": v for k, v in vst.as_dict().items() if k.startswith("dropped")},
    }
    if after:
        metrics["val_accuracy_ci_low"], metrics["val_accuracy_ci_high"] = _log_after(
            ctx, before, after, len(val)
        )
    if result.resumed_from is not None:
        metrics["resumed_from_step"] = result.resumed_from
    return metrics


def _model_dirs(ctx: StageContext, cfg: AlignConfig) -> tuple[Path, Path]:
    """The policy's starting model and the reference model, both checked to be model folders."""
    model_dir = Path(cfg.model) if cfg.model else ctx.model_before()
    if not (model_dir / "config.json").exists():
        raise ConfigError(f"align.model: {model_dir} is not a model folder (no config.json)")
    ref_dir = Path(cfg.ref_model) if cfg.ref_model else model_dir
    if not (ref_dir / "config.json").exists():
        raise ConfigError(f"align.ref_model: {ref_dir} is not a model folder (no config.json)")
    return model_dir, ref_dir


class _Reference(NamedTuple):
    table: dict  # pair key -> (chosen, rejected) reference log-probs
    model: Any  # the live reference model, or None when its numbers are cached
    kind: str  # "none" | "live" | "cached", as recorded in the metrics
    cached: bool  # training pairs read their reference log-probs from `table`


def _reference(
    ctx, cfg: AlignConfig, policy, model_dir: Path, ref_dir: Path, train, val, pad: int
) -> _Reference:
    """Score the reference: log-probs of held-out pairs always (KL, implicit rewards), of training
    pairs too when cached. When it is the starting policy, the policy itself scores them before any
    update (LoRA starts with B = 0), so no second model is loaded at all."""
    device = ctx.device
    uses_ref = cfg.method in REFERENCE_METHODS
    live = uses_ref and not cfg.precompute_ref
    same = ref_dir.resolve() == model_dir.resolve()
    ref_model = None if same and not live else load_lm(cfg, ref_dir, device, trainable=False)[0]
    scorer = policy if same else ref_model
    assert scorer is not None  # a reference other than the policy was loaded just above
    to_score = (train + val) if uses_ref and not live else val
    table = precompute_reference(
        scorer,
        to_score,
        ctx.dir / CACHE_FILE,
        pad,
        device,
        batch_size=cfg.eval_batch_size,
        note=str(ref_dir),
        log=ctx.log,
    )
    scorer = None
    if not live and ref_model is not None:
        ref_model = None  # the reference is no longer needed: its numbers are in the cache
        _free()
    elif live and ref_model is None:
        ref_model = load_lm(cfg, ref_dir, device, trainable=False)[0]
    kind = "none" if not uses_ref else "live" if live else "cached"
    return _Reference(table, ref_model, kind, cached=uses_ref and not live)


def _before(ctx: StageContext, evaluate, policy) -> dict:
    """Held-out figures of the starting policy: measured once, then read back on resume."""
    before_file = ctx.dir / "before.json"
    if before_file.exists():
        before = json.loads(before_file.read_text())
    else:
        before = evaluate(policy)
        atomic_write_json(before_file, before)
    if before:
        ctx.log(
            f"held-out before: preference accuracy {before['accuracy']:.3f}, margin {before['margin']:.3f} nats"
        )
    return before


def _log_after(ctx: StageContext, before: dict, after: dict, n: int) -> tuple[float, float]:
    """Log held-out accuracy before -> after; return its 95% interval."""
    lo, hi = wilson(after["accuracy"] * n, n)
    ctx.log(
        f"held-out preference accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} "
        f"(95% CI {lo:.3f}-{hi:.3f}, {n} pairs); margin {before['margin']:.3f} -> "
        f"{after['margin']:.3f} nats; implicit-reward accuracy {after['reward_accuracy']:.3f}, "
        f"reward margin {after['reward_margin']:.3f}; mean log-ratio to the reference on the chosen answers {after['log_ratio_chosen']:.4f} nats/token"
    )
    return lo, hi
