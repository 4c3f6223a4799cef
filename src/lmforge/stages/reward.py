"""`lmforge reward`: a reward model on preference pairs, after SFT.

`reward` trains a reward model (the SFT model's trunk + a scalar head, Bradley-Terry loss) on
preference pairs and reports held-out pairwise accuracy with a 95% interval, always next to the
length-only baseline (what a model that just prefers the longer or shorter answer would score);
output `reward/model/` (the family's Hugging Face `*ForSequenceClassification` folder) for PPO,
best-of-n and evaluation. It shares pair preparation and model loading with `align`
(`stages/align.py`), so both stages split the same pairs the same way.

Outputs in `reward/`: `model/`, `before.json` (held-out figures of the untrained head),
`metrics.jsonl`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..align.config import RewardConfig
from ..align.pair_batches import PairLoader
from ..align.reward import RewardModel, evaluate_reward, length_baseline, save_reward_model
from ..chat import ChatFormat
from ..errors import ConfigError
from ..model.hf import read_hf_config
from ..peft.lora import trainable_summary
from ..runs import atomic_write_json
from ..train.engine import Trainer
from ..train.objectives.reward import RewardObjective
from .align import context_len, estimate_pair_time, load_lm, merge_adapters, pad_id_of, prepare_pairs
from .base import StageContext, define_stage


def _log_reward_accuracy(ctx: StageContext, before: dict, after: dict, lb: dict, n: int) -> None:
    """Held-out accuracy before -> after, always next to the length-only baseline."""
    ctx.log(
        f"held-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} "
        f"(95% CI {after['accuracy_ci_low']:.3f}-{after['accuracy_ci_high']:.3f}, {n} pairs) against "
        f"the length-only baseline {lb['best']:.3f} ('prefer the {lb['rule']} answer', 95% CI "
        f"{lb['ci_low']:.3f}-{lb['ci_high']:.3f}); mean score margin {after['margin']:.3f}"
    )
    if after["accuracy_ci_low"] <= lb["best"]:
        ctx.log(
            "note: the reward model's accuracy is not above the length-only baseline beyond its interval: "
            "what it learned may be answer length, not preference"
        )


@define_stage(
    "reward",
    RewardConfig,
    needs=("sft",),
    help="reward model (Bradley-Terry) on preference pairs",
    flags=(
        ("--model", "model", "model whose trunk starts the reward model (default: the SFT model)"),
        ("--data", "data", "preference JSONL file (prompt/chosen/rejected, messages, HH-RLHF), or 'builtin'"),
    ),
)
def reward_stage(ctx: StageContext) -> dict:
    cfg: RewardConfig = ctx.cfg
    model_dir = Path(cfg.model) if cfg.model else ctx.model_before()
    if not (model_dir / "config.json").exists():
        raise ConfigError(f"reward.model: {model_dir} is not a model folder (no config.json)")
    fmt = ChatFormat.from_dir(model_dir)
    seq_len = context_len(model_dir, cfg.seq_len)
    estimate_pair_time(ctx, cfg, model_dir, seq_len)
    device = ctx.device
    train, val, tst, vst = prepare_pairs(ctx, cfg, fmt, seq_len)
    pad = pad_id_of(fmt)

    lm, note = load_lm(cfg, model_dir, device, trainable=True, seed=ctx.seed)
    rm = RewardModel.from_causal_lm(lm, seed=ctx.seed)
    rm.score.weight.requires_grad_(True)  # the head always trains (PEFT's modules_to_save)
    del lm
    summary = trainable_summary(rm)
    ctx.log(
        f"reward model on {model_dir}: {note}; trainable {summary['trainable_params']:,} of "
        f"{summary['total_params']:,} parameters"
    )

    def evaluate(m):
        return evaluate_reward(m, val, pad, device, cfg.eval_batch_size, cfg.use_margin)

    before_file = ctx.dir / "before.json"
    if before_file.exists():
        before = json.loads(before_file.read_text())
    else:
        before = evaluate(rm) if val else {}
        atomic_write_json(before_file, before)
    if before:
        ctx.log(f"held-out accuracy before: {before['accuracy']:.3f} (untrained head; chance is 0.5)")
    loader = PairLoader(train, cfg.batch_size, pad, seed=ctx.seed)
    result = Trainer(
        rm,
        RewardObjective(cfg.use_margin),
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
    if val and "accuracy" not in after:  # resumed at the last step: the engine did not evaluate
        after = evaluate(rm)

    rm = merge_adapters(rm, cfg.peft)
    hf = read_hf_config(model_dir)
    save_reward_model(
        rm,
        ctx.dir / "model",
        tokenizer_dir=model_dir,
        bos_id=hf.get("bos_token_id"),
        eos_id=hf.get("eos_token_id"),
        pad_id=pad,
    )
    lb = length_baseline(val)
    if after:
        _log_reward_accuracy(ctx, before, after, lb, len(val))
    metrics = {
        "val_accuracy_before": before.get("accuracy"),
        "val_accuracy_after": after.get("accuracy"),
        "val_accuracy_ci_low": after.get("accuracy_ci_low"),
        "val_accuracy_ci_high": after.get("accuracy_ci_high"),
        "val_length_baseline": lb.get("best"),
        "val_length_baseline_rule": lb.get("rule"),
        "val_length_baseline_ci_low": lb.get("ci_low"),
        "val_length_baseline_ci_high": lb.get("ci_high"),
        "val_prefer_shorter_accuracy": lb.get("shorter"),
        "val_pairs": len(val),
        "val_margin_before": before.get("margin"),
        "val_margin_after": after.get("margin"),
        "val_loss_before": before.get("loss"),
        "val_loss_after": after.get("loss"),
        "train_pairs": len(train),
        "peft": cfg.peft,
        "steps": result.step,
        "train_loss": result.final.get("loss"),
        "train_seconds": round(result.seconds, 2),
        **result.speed_metrics(),
        "trainable_params": summary["trainable_params"],
        **{f"train_{k}": v for k, v in tst.as_dict().items() if k.startswith(("dropped", "truncated"))},
        **{f"val_{k}": v for k, v in vst.as_dict().items() if k.startswith("dropped")},
    }
    if result.resumed_from is not None:
        metrics["resumed_from_step"] = result.resumed_from
    return metrics
