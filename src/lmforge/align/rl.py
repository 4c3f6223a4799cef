"""On-policy RL for language models: PPO (RLHF) and GRPO, as an outer loop around the one
training engine.

One RL iteration = a rollout (sample completions for a batch of prompts, score them, compute
advantages; `align/rollout.py`) followed by `epochs` x `num_minibatches` optimizer steps on it,
each step `grad_accum` micro-batches of `batch_size` sequences. The engine's `max_steps`
counts optimizer steps; a rollout holds `batch_size * grad_accum * num_minibatches` sequences
(for GRPO: that / `group_size` prompts, `group_size` samples each). The losses and their
normalisations are in `train/objectives/rl.py`, the KL estimators, controller and guard in
`align/kl.py`, reward functions in `align/reward_functions.py`, prompt sources (built-in arithmetic,
GSM8K, JSONL) in `align/tasks.py`, the settings in `align/config.py`.

Models: the policy starts from `model_dir`, which the stage chooses (its `model`, or the run's
model before the stage: this module never looks at the pipeline), with full weights,
LoRA or QLoRA (`peft`). PPO puts a scalar value head (`v_head`, zero-initialised) on the
policy's final hidden state: one shared trunk, as in TRL's `AutoModelForCausalLMWithValueHead`.
The frozen reference (PPO always; GRPO when `grpo.beta > 0`) is `ref_model`, or the starting
policy: a second copy for full fine-tuning, the same weights with the adapters switched off for
LoRA/QLoRA (no extra memory). PPO's reward comes from a reward model (`reward_model`, default:
this run's `reward/model`) or reward functions; GRPO's from reward functions.

Evaluation (`align/heldout.py`): greedy completions of the held-out prompts, scored by the same
reward functions (exact-match accuracy on verifiable tasks), before training and every
`eval_every` steps (the curve lands in metrics.jsonl as `eval/...`), with the KL to the
reference and the reward-hacking signals (`align/signals.py`) of sampled held-out completions;
a warning when the reward rises while diversity or the held-out likelihood collapses. Outputs: `model/` (HF layout; LoRA merged), `adapter/` (LoRA/QLoRA),
`value_head.safetensors` (PPO), `samples.jsonl`, `metrics.jsonl`, `before.json`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import save_file

from ..chat import ChatFormat
from ..errors import ConfigError
from ..model.hf import load_pretrained, read_hf_config, save_pretrained
from ..model.transformer import Transformer
from ..peft.base_ref import base_model_ref
from ..peft.lora import apply_lora, merge_lora, save_adapter, trainable_summary
from ..peft.qlora import dequantize_model, load_quantized, nf4_bytes
from ..runs import atomic_path, atomic_write_json, atomic_write_text, read_jsonl
from ..train.device import autocast_dtype
from ..train.engine import Trainer
from ..train.objectives.rl import GRPOObjective, PPOObjective
from .backends import make_backend
from .config import GRPOSettings, PPOSettings
from .heldout import HeldOutEval
from .kl import FixedKLController, KLGuard, make_kl_controller
from .reward_functions import RewardModelScorer, RewardSet, build_rewards
from .rollout import EncodedPrompt, RolloutLoader
from .signals import hacking_warning
from .tasks import load_prompt_sets

__all__ = ["GRPOSettings", "PPOSettings", "run_rl"]  # the settings live in config.py


@dataclass
class _Setup:
    """What the checks of `run_rl` settle: the method's settings and the sequence budget."""

    method: str
    s: PPOSettings | GRPOSettings
    fmt: ChatFormat
    hf: dict
    seq_len: int
    eval_new: int
    n_seq: int


# ============================================================================= the run
def run_rl(ctx, cfg, *, model_dir: Path, reward_fns: dict[str, Callable] | None = None) -> dict:
    """Train `cfg.method` in {ppo, grpo} inside stage context `ctx`, starting from `model_dir`
    (the stage decides which model that is: `cfg.model` or the run's model before this stage);
    returns the stage metrics. `reward_fns` maps extra reward names to callables (Python API;
    configs use module:function)."""
    if getattr(cfg, "spike_factor", 0):
        # RL losses hover around zero and change sign, so "N x the running median" means nothing
        cfg = cfg.model_copy(update={"spike_factor": 0.0})
    st = _setup(ctx, cfg, Path(model_dir))
    method, s = st.method, st.s
    train, val, skipped = _prompts(ctx, cfg, st)
    rewards = _rewards(ctx, cfg, st, reward_fns)
    policy, note = build_policy(cfg, model_dir, ctx.device, ctx.seed)
    if method == "ppo":
        policy.v_head = torch.nn.Linear(policy.cfg.d_model, 1, device=ctx.device, dtype=torch.float32)
        torch.nn.init.zeros_(policy.v_head.weight)
        torch.nn.init.zeros_(policy.v_head.bias)
    ref, ref_is_base, ref_note = _reference(cfg, st, model_dir, ctx.device)
    summary = {"peft": cfg.peft, **trainable_summary(policy)}
    ctx.log(
        f"{method.upper()} on {model_dir}: {note}; {ref_note}; trainable {summary['trainable_params']:,} of "
        f"{summary['total_params']:,} parameters"
    )
    steps_per_rollout = s.epochs * s.num_minibatches
    _log_plan(ctx, cfg, st, steps_per_rollout)
    amp = autocast_dtype(ctx.device, ctx.dtype)
    backend = make_backend(
        s.backend, policy, model_dir=str(model_dir), seed=ctx.seed, batch_size=s.gen_batch_size, log=ctx.log
    )
    decode = lambda ids: st.fmt.tok.decode(ids, skip_special=True).strip()  # noqa: E731
    pad = st.fmt.tok.pad_id if st.fmt.tok.pad_id is not None else (st.fmt.tok.eos_id or 0)
    kl_ctl = make_kl_controller(s, st.n_seq) if method == "ppo" else FixedKLController(0.0)
    common = dict(policy=policy, backend=backend, rewards=rewards, decode=decode, stop_ids=st.fmt.stop_ids)
    loader = RolloutLoader(
        method=method,
        settings=s,
        prompts=train,
        pad_id=pad,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        seed=ctx.seed,
        device=ctx.device,
        amp=amp,
        ref=ref,
        ref_is_base=ref_is_base,
        kl_ctl=kl_ctl,
        kl_guard=_kl_guard(s) if method == "ppo" else None,
        max_bad_rollouts=cfg.max_bad_steps,
        log=ctx.log,
        log_every=max(1, cfg.log_every // steps_per_rollout),
        **common,
    )
    evaluator = HeldOutEval(
        s, val, rewards, backend, decode, st.fmt.stop_ids, pad, policy, ref, ref_is_base,
        cfg.batch_size, ctx.device, amp, ctx.seed, st.eval_new,
        kl_coef=(lambda: kl_ctl.value) if method == "ppo" else None,
    )  # fmt: skip
    before = _before(ctx, evaluator)
    warnings: list[str] = []

    def evaluate(_model) -> dict[str, float]:
        ev = evaluator.run()
        w = hacking_warning(before["metrics"], ev, **HELD_OUT_SIGNALS, where="held-out")
        if w:
            warnings.append(w)
            ctx.log(w)
        return ev

    objective = PPOObjective(s, s.temperature) if method == "ppo" else GRPOObjective(s, s.temperature)
    trainer = Trainer(
        policy, objective, loader, cfg, ctx.dir, device=ctx.device, dtype=ctx.dtype,
        evaluate=evaluate if val else None, log=ctx.log,
        optimizer=cfg.qlora.optimizer if cfg.peft == "qlora" else None,
    )  # fmt: skip
    # the rollout records go to the engine's metrics file, stamped with the step they feed
    loader.on_record = lambda rec: trainer._record({"step": trainer.step + 1, **rec})
    result = trainer.fit(resume=True)
    after = {k[len("eval_") :]: v for k, v in result.final.items() if k.startswith("eval_")}
    if val and (not after or (s.num_samples and not evaluator.last_answers)):
        # no eval ran in this process (a run resumed at its last step): score the final policy
        # again (deterministic) so the metrics and the sample answers are those of a clean run
        after = evaluator.run()
    _write_samples(ctx, val, s, before, evaluator)
    save_policy(policy, cfg, ctx.dir, model_dir, st.hf)
    return _summary(ctx, st, rewards, before["metrics"], after, loader, result, summary, train, val, skipped)


HELD_OUT_SIGNALS = dict(reward="sampled_reward", distinct="sampled_distinct_2", nll="start_answer_nll")


def _setup(ctx, cfg, model_dir: Path) -> _Setup:
    method, key = cfg.method, ctx.name
    if method not in ("ppo", "grpo"):
        raise ConfigError(f"{key}.method={method!r}: run_rl trains ppo or grpo")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            f"{key}: PPO/GRPO run in one process (rollouts are not sharded yet); run without torchrun"
        )
    s = cfg.ppo if method == "ppo" else cfg.grpo
    if not (model_dir / "config.json").exists():
        raise ConfigError(f"{key}.model: {model_dir} is not a model folder (no config.json)")
    hf = read_hf_config(model_dir)
    context = hf.get("max_position_embeddings", 2048)
    seq_len = min(cfg.seq_len or context, context)
    eval_new = s.eval_max_new_tokens or s.max_new_tokens
    if max(s.max_new_tokens, eval_new) >= seq_len:
        raise ConfigError(
            f"{key}.{method}.max_new_tokens={max(s.max_new_tokens, eval_new)} leaves no room for a "
            f"prompt in {seq_len} tokens ({key}.seq_len / the model's context)"
        )
    n_seq = cfg.batch_size * cfg.grad_accum * s.num_minibatches
    if method == "grpo" and n_seq % s.group_size:
        raise ConfigError(
            f"{key}: a rollout holds batch_size * grad_accum * grpo.num_minibatches = {n_seq} "
            f"sequences, not a multiple of grpo.group_size={s.group_size}; change one of them"
        )
    return _Setup(method, s, ChatFormat.from_dir(model_dir), hf, seq_len, eval_new, n_seq)


def _prompts(ctx, cfg, st: _Setup) -> tuple[list[EncodedPrompt], list[EncodedPrompt], int]:
    """Encoded train / held-out prompts and how many were skipped as too long."""
    key, method = ctx.name, st.method
    train_items, val_items = load_prompt_sets(cfg.data, cfg.val_data, cfg.val_fraction, ctx.seed)
    if cfg.max_examples:
        train_items = train_items[: cfg.max_examples]
    val_items = val_items[: cfg.max_val_examples]
    limit = st.seq_len - st.s.max_new_tokens
    train, too_long = _encode(train_items, st.fmt, limit)
    val, val_too_long = _encode(val_items, st.fmt, st.seq_len - st.eval_new)
    ctx.log(
        f"prompts: {len(train)} train, {len(val)} held-out"
        + (
            f"; skipped as longer than {limit} tokens (context {st.seq_len} - max_new_tokens): "
            f"{too_long} train, {val_too_long} held-out"
            if too_long or val_too_long
            else ""
        )
    )
    if not train:
        raise ConfigError(
            f"{key}: no training prompt fits {limit} tokens; lower {key}.{method}.max_new_tokens, "
            f"raise {key}.seq_len or check {key}.data"
        )
    return train, val, too_long + val_too_long


def _rewards(ctx, cfg, st: _Setup, reward_fns) -> RewardSet:
    key, method, s = ctx.name, st.method, st.s

    def reward_model_factory():
        folder = Path(cfg.reward_model) if cfg.reward_model else ctx.run_dir / "reward" / "model"
        if not (folder / "config.json").exists():
            raise ConfigError(
                f"{key}.reward_model: {folder} is not a reward model folder; train one with "
                f"`lmforge reward` or set {key}.reward_model=PATH (or use reward functions: "
                f"{key}.{method}.rewards=[...])"
            )
        ctx.log(f"reward model: {folder}")
        return RewardModelScorer(folder, ctx.device, batch_size=s.gen_batch_size)

    return build_rewards(
        s.rewards,
        key=f"{key}.{method}.rewards",
        format_pattern=s.format_pattern,
        reward_model=reward_model_factory,
        extra=reward_fns,
    )


def _frozen(path: Path, device) -> torch.nn.Module:
    ref = load_pretrained(path, device=device).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _reference(cfg, st: _Setup, model_dir: Path, device) -> tuple[torch.nn.Module | None, bool, str]:
    """(frozen reference or None, reference = the policy with adapters off, a note for the log)."""
    if not (st.method == "ppo" or cast(GRPOSettings, st.s).beta > 0):
        return None, False, "no reference model (grpo.beta = 0)"
    if cfg.ref_model:
        return _frozen(Path(cfg.ref_model), device), False, f"reference {cfg.ref_model}"
    if cfg.peft in ("lora", "qlora"):
        return None, True, "reference = the base model (adapters off)"
    return _frozen(model_dir, device), False, "reference = a frozen copy of the starting policy"


def _kl_guard(s: PPOSettings | GRPOSettings) -> KLGuard:
    """PPO's guard against a KL blow-up (only PPO's settings carry it)."""
    ppo = cast(PPOSettings, s)
    return KLGuard(ppo.kl_guard, ppo.target_kl)


def _log_plan(ctx, cfg, st: _Setup, steps_per_rollout: int) -> None:
    method, s = st.method, st.s
    n_rollouts = math.ceil(cfg.max_steps / steps_per_rollout)
    g = cast(GRPOSettings, s).group_size if method == "grpo" else 1
    ctx.log(
        f"{n_rollouts} rollouts of {st.n_seq // g} prompts x {g} sample(s), {steps_per_rollout} "
        f"optimizer step(s) each ({cfg.max_steps} steps)"
    )
    if method == "ppo":
        s_ppo = cast(PPOSettings, st.s)
        ctx.log(
            f"KL: penalty {s_ppo.kl_estimator} x kl_coef {s_ppo.kl_coef}"
            + (
                f", adaptive towards {s_ppo.target_kl} nats/sequence (k3), horizon "
                f"{s_ppo.kl_horizon or st.n_seq} samples"
                if s_ppo.adaptive_kl
                else ", fixed"
            )
            + (f"; guard at {s_ppo.kl_guard:g} x target" if s_ppo.kl_guard else "; no guard")
        )
    if cfg.checkpoint_every and cfg.checkpoint_every % steps_per_rollout:
        ctx.log(
            f"note: checkpoint_every={cfg.checkpoint_every} is not a multiple of the {steps_per_rollout} steps "
            f"per rollout; checkpoints inside a rollout store its buffer (larger trainer_state.json)"
        )


def _before(ctx, evaluator: HeldOutEval) -> dict:
    """The held-out scores of the starting policy, kept in before.json so a resumed run reports
    the same baseline (and the starting greedy answers, for the held-out NLL signal)."""
    f = ctx.dir / "before.json"
    if f.exists():
        before = json.loads(f.read_text())
        evaluator.start_ids = before.get("start_ids") or []
    else:
        metrics = evaluator.run()
        before = {"metrics": metrics, "answers": evaluator.last_answers, "start_ids": evaluator.start_ids}
        atomic_write_json(f, before)
    if before["metrics"]:
        ctx.log("held-out before: " + _fmt(before["metrics"]))
    return before


def _write_samples(ctx, val, s, before: dict, evaluator: HeldOutEval) -> None:
    b_ans, a_ans = before.get("answers") or [], evaluator.last_answers
    samples = [
        {
            "prompt": it.item.text,
            "reference": it.item.answer,
            "before": b_ans[i] if i < len(b_ans) else None,
            "after": a_ans[i] if i < len(a_ans) else None,
        }
        for i, it in enumerate(val[: s.num_samples])
    ]
    atomic_write_text(
        ctx.dir / "samples.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in samples)
    )


def _summary(ctx, st, rewards, b, a, loader, result, summary, train, val, skipped) -> dict:
    """The stage metrics: held-out before -> after, KL against its target, hacking signals, counts."""
    s = st.s
    metrics: dict = {"method": st.method}
    if "exact_match" in rewards.names:
        for k in ("accuracy", "sampled_accuracy"):
            metrics.update({f"{k}_before": b.get(k), f"{k}_after": a.get(k)})
    for k in ("reward", "sampled_reward", "sampled_reward_minus_kl", "sampled_distinct_2",
              "sampled_truncated_frac", "start_answer_nll"):  # fmt: skip
        if k in a or k in b:
            metrics.update({f"{k}_before": b.get(k), f"{k}_after": a.get(k)})
    if "kl" in a or "kl" in b:
        metrics.update(kl_before=b.get("kl"), kl_after=a.get("kl"), kl_unit="nats/sequence, k3 estimator")
    if st.method == "ppo":
        kl_after = a.get("kl")
        metrics.update(
            kl_target=s.target_kl,
            kl_to_target=round(kl_after / s.target_kl, 4) if kl_after is not None else None,
            kl_coef_final=loader.kl_ctl.value,
            kl_guard_trips=loader.kl_guard.trips,
        )
    metrics.update(
        {
            "hacking_warning": hacking_warning(b, a, **HELD_OUT_SIGNALS, where="held-out, end of training"),
            "hacking_warnings_rollouts": loader.totals["hacking_warnings"],
            "steps": result.step,
            "rollouts": loader.rollouts,
            "train_prompts": len(train),
            "val_prompts": len(val),
            "skipped_long_prompts": skipped,
            "samples_generated": loader.totals["samples"],
            "failed_reward_samples": loader.totals["failed_samples"],
            "truncated_completions": loader.totals["truncated"],
            **{f"failures_{k}": v for k, v in loader.failures.items() if v},
            "train_seconds": round(result.seconds, 2),
            **summary,
        }
    )
    if st.method == "grpo":
        t = loader.totals
        metrics.update(
            zero_std_group_frac=round(t["zero_std_groups"] / max(t["groups"], 1), 4),
            dropped_groups=t["dropped_groups"],
            zero_signal_rollouts=loader.zero_std_rollouts,
        )
    curve = [
        {"step": r["step"], **{k[5:]: v for k, v in r.items() if k.startswith("eval/")}}
        for r in _read_jsonl(ctx.dir / "metrics.jsonl")
        if any(k.startswith("eval/") for k in r)
    ]
    if curve:
        metrics["eval_curve"] = curve
    if result.resumed_from is not None:
        metrics["resumed_from_step"] = result.resumed_from
    if metrics["hacking_warning"]:
        ctx.log(metrics["hacking_warning"])
    ctx.log(
        "held-out: " + "  ".join(f"{k} {_v(b.get(k))} -> {_v(a.get(k))}" for k in sorted(set(a) | set(b)))
    )
    if loader.totals["failed_samples"]:
        ctx.log(
            f"{loader.totals['failed_samples']} of {loader.totals['samples']} samples had a failed reward "
            f"({dict(loader.failures)}); they were left out of the updates"
        )
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


# ============================================================================= pieces
def _encode(items, fmt, limit: int):
    out, too_long = [], 0
    for it in items:
        ids = fmt.prompt_ids(it.chat)
        if len(ids) > limit:
            too_long += 1
            continue
        out.append(EncodedPrompt(it, ids))
    return out, too_long


def _fmt(m: dict) -> str:
    return "  ".join(f"{k} {_v(v)}" for k, v in m.items())


def _v(x) -> str:
    return "n/a" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))


def _read_jsonl(path: Path) -> list[dict]:
    return read_jsonl(path) if path.exists() else []


def build_policy(cfg, model_dir: Path, device, seed: int):
    """The trainable policy for `cfg.peft` (full / lora / qlora) and a note for the log.
    LoRA dropout is switched off: the behaviour and update passes must agree exactly."""
    torch.manual_seed(seed)
    lora = cfg.lora.model_copy(update={"dropout": 0.0})
    if cfg.peft == "qlora":
        model = load_quantized(model_dir, cfg.qlora, device=device)
        apply_lora(model, lora)
        return model.train(), f"QLoRA (NF4 base {nf4_bytes(model) / 2**20:.1f} MiB, LoRA r={lora.r})"
    model = load_pretrained(model_dir, device=device).train()
    if cfg.peft == "lora":
        names = apply_lora(model, lora)
        return model, f"LoRA r={lora.r} alpha={lora.alpha} on {len(names)} layers"
    return model, "full weights"


def save_policy(policy, cfg, out: Path, model_dir: Path, hf: dict) -> None:
    """model/ (HF layout, LoRA merged, no value head), adapter/ for LoRA/QLoRA, and the PPO value
    head on its own (value_head.safetensors) so the model folder stays a plain causal LM."""
    v_head = getattr(policy, "v_head", None)
    if v_head is not None:
        with atomic_path(out / "value_head.safetensors") as tmp:
            save_file({k: t.detach().cpu().contiguous() for k, t in v_head.state_dict().items()}, str(tmp))
        del policy.v_head
    ids = dict(bos_id=hf.get("bos_token_id"), eos_id=hf.get("eos_token_id"))
    if cfg.peft == "full":
        save_pretrained(policy, out / "model", tokenizer_dir=model_dir, **ids)
    else:
        save_adapter(
            policy, out / "adapter", base_model=base_model_ref(model_dir, out / "adapter", out.parent)
        )
        merged = cast(Transformer, merge_lora(policy))  # a plain Transformer again
        if cfg.peft == "qlora":
            merged = dequantize_model(merged, torch.float32)
        save_pretrained(merged, out / "model", tokenizer_dir=model_dir, **ids)
