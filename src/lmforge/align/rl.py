"""On-policy RL for language models: PPO (RLHF) and GRPO, as an outer loop around the one
training engine.

One RL iteration = a rollout (sample completions for a batch of prompts, score them, compute
advantages; `align/rollout.py`) followed by `epochs` x `num_minibatches` optimizer steps on it,
each step `grad_accum` micro-batches of `batch_size` sequences. The engine's `max_steps`
counts optimizer steps; a rollout holds `batch_size * grad_accum * num_minibatches` sequences
(for GRPO: that / `group_size` prompts, `group_size` samples each). The losses and their
normalisations are in `align/rl_math.py`, reward functions in `align/rewards.py`, prompt
sources (built-in arithmetic, GSM8K, JSONL) in `align/tasks.py`.

Models: the policy starts from `model` (default: the run's latest model) with full weights,
LoRA or QLoRA (`peft`). PPO puts a scalar value head (`v_head`, zero-initialised) on the
policy's final hidden state: one shared trunk, as in TRL's `AutoModelForCausalLMWithValueHead`.
The frozen reference (PPO always; GRPO when `grpo.beta > 0`) is `ref_model`, or the starting
policy: a second copy for full fine-tuning, the same weights with the adapters switched off for
LoRA/QLoRA (no extra memory). PPO's reward comes from a reward model (`reward_model`, default:
this run's `reward/model`) or reward functions; GRPO's from reward functions.

Evaluation: greedy completions of the held-out prompts, scored by the same reward functions
(exact-match accuracy on verifiable tasks), before training and every `eval_every` steps (the
curve lands in metrics.jsonl as `eval/...`), and for PPO the KL to the reference of sampled
held-out completions. Outputs: `model/` (HF layout; LoRA merged), `adapter/` (LoRA/QLoRA),
`value_head.safetensors` (PPO), `samples.jsonl`, `metrics.jsonl`, `before.json`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .rewards import DEFAULT_FORMAT_PATTERN


class RolloutSettings(BaseModel):
    """Settings shared by PPO and GRPO (each method has its own copy under `ppo.` / `grpo.`)."""

    model_config = ConfigDict(extra="forbid")

    rewards: list[str] = Field(
        default_factory=lambda: ["exact_match"],
        description="reward terms: exact_match, format, reward_model, module:function; "
        "'W*name' weights a term",
    )
    format_pattern: str = Field(DEFAULT_FORMAT_PATTERN, description="regex of the `format` reward")
    max_new_tokens: int = Field(32, ge=1, description="completion budget per sample")
    temperature: float = Field(
        1.0, gt=0, description="sampling temperature of rollouts (and of the log-probs)"
    )
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    epochs: int = Field(
        1, ge=1, description="optimisation passes over each rollout (PPO epochs / GRPO iterations)"
    )
    num_minibatches: int = Field(1, ge=1, description="optimizer steps per pass over a rollout")
    mask_truncated: bool = Field(
        False, description="drop completions that hit max_new_tokens without stopping"
    )
    backend: Literal["lmforge", "vllm", "auto"] = Field(
        "lmforge",
        description="rollout generation: lmforge (KV cache), vllm, auto (vllm when importable + CUDA)",
    )
    gen_batch_size: int = Field(64, ge=1, description="sequences per generation call")
    eval_max_new_tokens: int | None = Field(
        None, ge=1, description="held-out completion budget; default max_new_tokens"
    )
    num_samples: int = Field(4, ge=0, description="held-out answers shown before/after in samples.jsonl")

    @model_validator(mode="after")
    def _rewards_nonempty(self):
        if not self.rewards:
            raise ValueError("rewards: give at least one reward term")
        return self


class PPOSettings(RolloutSettings):
    rewards: list[str] = Field(default_factory=lambda: ["reward_model"])
    epochs: int = Field(4, ge=1, description="PPO epochs per rollout")
    kl_coef: float = Field(0.05, ge=0, description="per-token KL penalty against the reference")
    adaptive_kl: bool = Field(False, description="adapt kl_coef so the KL tracks target_kl (Ziegler et al.)")
    target_kl: float = Field(
        6.0,
        gt=0,
        description="adaptive_kl: KL per sequence (nats) to aim for; also the bound the summary checks",
    )
    kl_horizon: int = Field(10000, ge=1, description="adaptive_kl: horizon in sequences")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="subtracted from the score of completions that never stop"
    )


class GRPOSettings(RolloutSettings):
    group_size: int = Field(4, ge=2, description="samples per prompt")
    scale: Literal["group", "batch", "none"] = "group"
    epsilon: float = Field(0.2, gt=0, description="lower clip of the ratio (1 - epsilon)")
    epsilon_high: float | None = Field(
        None,
        gt=0,
        description="upper clip (1 + epsilon_high); default epsilon (DAPO's clip-higher uses e.g. 0.28)",
    )
    beta: float = Field(0.0, ge=0, description="k3 KL coefficient; 0 = no reference model is loaded")
    loss_type: Literal["seq", "token", "dr_grpo"] = Field(
        "token",
        description="seq: per-sequence mean then mean; token: over all tokens; "
        "dr_grpo: sum / (sequences * max_new_tokens)",
    )


# ============================================================================= the run
def run_rl(ctx, cfg, *, reward_fns: dict[str, Callable] | None = None) -> dict:
    """Train `cfg.method` in {ppo, grpo} inside stage context `ctx`; returns the stage metrics.
    `reward_fns` maps extra reward names to callables (Python API; configs use module:function)."""
    import torch

    from ..chat import ChatFormat
    from ..errors import ConfigError
    from ..model.hf import read_hf_config
    from ..peft.lora import trainable_summary
    from ..runs import atomic_write_json
    from ..train.engine import Trainer, autocast_dtype
    from .rewards import RewardModelScorer, build_rewards
    from .rl_math import FixedKLController, GRPOObjective, PPOObjective
    from .rollout import RolloutLoader, make_backend, make_kl_controller
    from .tasks import load_prompt_sets

    method = cfg.method
    key = ctx.name
    if method not in ("ppo", "grpo"):
        raise ConfigError(f"{key}.method={method!r}: run_rl trains ppo or grpo")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            f"{key}: PPO/GRPO run in one process (rollouts are not sharded yet); run without torchrun"
        )
    s = cfg.ppo if method == "ppo" else cfg.grpo
    if getattr(cfg, "spike_factor", 0):
        # RL losses hover around zero and change sign, so "N x the running median" means nothing
        cfg = cfg.model_copy(update={"spike_factor": 0.0})
    model_dir = Path(cfg.model) if cfg.model else model_before(ctx)
    if not (model_dir / "config.json").exists():
        raise ConfigError(f"{key}.model: {model_dir} is not a model folder (no config.json)")
    fmt = ChatFormat.from_dir(model_dir)
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
    device = ctx.device

    # ------------------------------------------------------------------ prompts
    train_items, val_items = load_prompt_sets(cfg.data, cfg.val_data, cfg.val_fraction, ctx.seed)
    if cfg.max_examples:
        train_items = train_items[: cfg.max_examples]
    val_items = val_items[: cfg.max_val_examples]
    limit = seq_len - s.max_new_tokens
    train, too_long = _encode(train_items, fmt, limit)
    val, val_too_long = _encode(val_items, fmt, seq_len - eval_new)
    ctx.log(
        f"prompts: {len(train)} train, {len(val)} held-out"
        + (
            f"; skipped as longer than {limit} tokens (context {seq_len} - max_new_tokens): "
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

    # ------------------------------------------------------------------ rewards
    def reward_model_factory():
        folder = Path(cfg.reward_model) if cfg.reward_model else ctx.run_dir / "reward" / "model"
        if not (folder / "config.json").exists():
            raise ConfigError(
                f"{key}.reward_model: {folder} is not a reward model folder; train one with "
                f"`lmforge reward` or set {key}.reward_model=PATH (or use reward functions: "
                f"{key}.{method}.rewards=[...])"
            )
        ctx.log(f"reward model: {folder}")
        return RewardModelScorer(folder, device, batch_size=s.gen_batch_size)

    rewards = build_rewards(
        s.rewards,
        key=f"{key}.{method}.rewards",
        format_pattern=s.format_pattern,
        reward_model=reward_model_factory,
        extra=reward_fns,
    )

    # ------------------------------------------------------------------ models
    policy, note = build_policy(cfg, model_dir, device, ctx.seed)
    if method == "ppo":
        policy.v_head = torch.nn.Linear(policy.cfg.d_model, 1, device=device, dtype=torch.float32)
        torch.nn.init.zeros_(policy.v_head.weight)
        torch.nn.init.zeros_(policy.v_head.bias)
    needs_ref = method == "ppo" or s.beta > 0
    ref, ref_is_base = None, False
    if needs_ref:
        if cfg.ref_model:
            from ..model.hf import load_pretrained

            ref = load_pretrained(Path(cfg.ref_model), device=device).eval()
            for p in ref.parameters():
                p.requires_grad_(False)
            ref_note = f"reference {cfg.ref_model}"
        elif cfg.peft in ("lora", "qlora"):
            ref_is_base, ref_note = True, "reference = the base model (adapters off)"
        else:
            from ..model.hf import load_pretrained

            ref = load_pretrained(model_dir, device=device).eval()
            for p in ref.parameters():
                p.requires_grad_(False)
            ref_note = "reference = a frozen copy of the starting policy"
    else:
        ref_note = "no reference model (grpo.beta = 0)"
    summary = trainable_summary(policy)
    ctx.log(
        f"{method.upper()} on {model_dir}: {note}; {ref_note}; trainable {summary['trainable_params']:,} of "
        f"{summary['total_params']:,} parameters"
    )
    steps_per_rollout = s.epochs * s.num_minibatches
    n_rollouts = math.ceil(cfg.max_steps / steps_per_rollout)
    prompts_per = n_seq // (s.group_size if method == "grpo" else 1)
    ctx.log(
        f"{n_rollouts} rollouts of {prompts_per} prompts x {s.group_size if method == 'grpo' else 1} "
        f"sample(s), {steps_per_rollout} optimizer step(s) each ({cfg.max_steps} steps)"
    )
    if cfg.checkpoint_every and cfg.checkpoint_every % steps_per_rollout:
        ctx.log(
            f"note: checkpoint_every={cfg.checkpoint_every} is not a multiple of the {steps_per_rollout} steps "
            f"per rollout; checkpoints inside a rollout store its buffer (larger trainer_state.json)"
        )

    amp = autocast_dtype(device, ctx.dtype)
    backend = make_backend(
        s.backend, policy, model_dir=str(model_dir), seed=ctx.seed, batch_size=s.gen_batch_size, log=ctx.log
    )
    decode = lambda ids: fmt.tok.decode(ids, skip_special=True).strip()  # noqa: E731
    pad = fmt.tok.pad_id if fmt.tok.pad_id is not None else (fmt.tok.eos_id or 0)
    kl_ctl = make_kl_controller(s) if method == "ppo" else FixedKLController(0.0)
    loader = RolloutLoader(
        method=method,
        settings=s,
        policy=policy,
        backend=backend,
        prompts=train,
        rewards=rewards,
        decode=decode,
        stop_ids=fmt.stop_ids,
        pad_id=pad,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        seed=ctx.seed,
        device=device,
        amp=amp,
        ref=ref,
        ref_is_base=ref_is_base,
        kl_ctl=kl_ctl,
        max_bad_rollouts=cfg.max_bad_steps,
        log=ctx.log,
        log_every=max(1, cfg.log_every // steps_per_rollout),
    )

    evaluator = HeldOutEval(
        method,
        s,
        val,
        rewards,
        backend,
        decode,
        fmt.stop_ids,
        pad,
        policy,
        ref,
        ref_is_base,
        cfg.batch_size,
        device,
        amp,
        ctx.seed,
        eval_new,
    )
    before_file = ctx.dir / "before.json"
    if before_file.exists():
        before = json.loads(before_file.read_text())
    else:
        before = {"metrics": evaluator.run(), "answers": evaluator.last_answers}
        atomic_write_json(before_file, before)
    if before["metrics"]:
        ctx.log("held-out before: " + _fmt(before["metrics"]))

    objective = PPOObjective(s, s.temperature) if method == "ppo" else GRPOObjective(s, s.temperature)
    trainer = Trainer(
        policy,
        objective,
        loader,
        cfg,
        ctx.dir,
        device=device,
        dtype=ctx.dtype,
        evaluate=(lambda m: evaluator.run()) if val else None,
        log=ctx.log,
    )
    loader.bind(trainer)
    if cfg.peft == "qlora" and cfg.qlora.optimizer != "adamw":
        from ..peft.qlora import build_optimizer

        trainer.optimizer, opt_note = build_optimizer(
            policy.parameters(), cfg.qlora, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2)
        )
        ctx.log(f"optimizer: {opt_note}")
    result = trainer.fit(resume=True)
    after = {k[len("eval_") :]: v for k, v in result.final.items() if k.startswith("eval_")}
    if val and (not after or (s.num_samples and not evaluator.last_answers)):
        # no eval ran in this process (a run resumed at its last step): score the final policy
        # again (deterministic) so the metrics and the sample answers are those of a clean run
        after = evaluator.run()

    # ------------------------------------------------------------------ outputs
    samples = []
    b_ans, a_ans = before.get("answers") or [], evaluator.last_answers
    for i, it in enumerate(val[: s.num_samples]):
        samples.append(
            {
                "prompt": it.item.text,
                "reference": it.item.answer,
                "before": b_ans[i] if i < len(b_ans) else None,
                "after": a_ans[i] if i < len(a_ans) else None,
            }
        )
    from ..runs import atomic_write_text

    atomic_write_text(
        ctx.dir / "samples.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in samples)
    )
    save_policy(policy, cfg, ctx.dir, model_dir, hf)
    curve = [
        {"step": r["step"], **{k[5:]: v for k, v in r.items() if k.startswith("eval/")}}
        for r in _read_jsonl(ctx.dir / "metrics.jsonl")
        if any(k.startswith("eval/") for k in r)
    ]
    b, a = before["metrics"], after
    metrics: dict = {"method": method}
    if "exact_match" in rewards.names:
        metrics.update(
            accuracy_before=b.get("accuracy"),
            accuracy_after=a.get("accuracy"),
            sampled_accuracy_before=b.get("sampled_accuracy"),
            sampled_accuracy_after=a.get("sampled_accuracy"),
        )
    metrics.update(
        reward_before=b.get("reward"),
        reward_after=a.get("reward"),
        sampled_reward_before=b.get("sampled_reward"),
        sampled_reward_after=a.get("sampled_reward"),
    )
    if "kl" in a or "kl" in b:
        metrics.update(kl_before=b.get("kl"), kl_after=a.get("kl"))
    if method == "ppo":
        metrics.update(kl_target=s.target_kl, kl_coef_final=loader.kl_ctl.value)
    metrics.update(
        {
            "steps": result.step,
            "rollouts": loader.rollouts,
            "train_prompts": len(train),
            "val_prompts": len(val),
            "skipped_long_prompts": too_long + val_too_long,
            "samples_generated": loader.totals["samples"],
            "failed_reward_samples": loader.totals["failed_samples"],
            "truncated_completions": loader.totals["truncated"],
            **{f"failures_{k}": v for k, v in loader.failures.items() if v},
            "train_seconds": round(result.seconds, 2),
            "peft": cfg.peft,
            **summary,
        }
    )
    if method == "grpo":
        metrics.update(
            zero_std_group_frac=round(loader.totals["zero_std_groups"] / max(loader.totals["groups"], 1), 4),
            dropped_groups=loader.totals["dropped_groups"],
            zero_signal_rollouts=loader.zero_std_rollouts,
        )
    if curve:
        metrics["eval_curve"] = curve
    if result.resumed_from is not None:
        metrics["resumed_from_step"] = result.resumed_from
    metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    ctx.log(
        "held-out: " + "  ".join(f"{k} {_v(b.get(k))} -> {_v(a.get(k))}" for k in sorted(set(a) | set(b)))
    )
    if loader.totals["failed_samples"]:
        ctx.log(
            f"{loader.totals['failed_samples']} of {loader.totals['samples']} samples had a failed reward "
            f"({dict(loader.failures)}); they were left out of the updates"
        )
    return metrics


# ============================================================================= pieces
def model_before(ctx) -> Path:
    """The model of the last completed policy stage *before* this one in pipeline order."""
    return ctx.model_before()


def _encode(items, fmt, limit: int):
    from .rollout import EncodedPrompt

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
    from ..runs import read_jsonl

    return read_jsonl(path) if path.exists() else []


def build_policy(cfg, model_dir: Path, device, seed: int):
    """The trainable policy for `cfg.peft` (full / lora / qlora) and a note for the log.
    LoRA dropout is switched off: the behaviour and update passes must agree exactly."""
    import torch

    from ..model.hf import load_pretrained
    from ..peft.lora import apply_lora
    from ..peft.qlora import load_quantized, nf4_bytes

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
    import torch
    from safetensors.torch import save_file

    from ..model.hf import save_pretrained
    from ..peft.lora import merge_lora, save_adapter
    from ..runs import atomic_path

    v_head = getattr(policy, "v_head", None)
    if v_head is not None:
        with atomic_path(out / "value_head.safetensors") as tmp:
            save_file({k: t.detach().cpu().contiguous() for k, t in v_head.state_dict().items()}, str(tmp))
        del policy.v_head
    ids = dict(bos_id=hf.get("bos_token_id"), eos_id=hf.get("eos_token_id"))
    if cfg.peft == "full":
        save_pretrained(policy, out / "model", tokenizer_dir=model_dir, **ids)
    else:
        from ..peft.qlora import dequantize_model

        save_adapter(policy, out / "adapter", base_model=str(model_dir.resolve()))
        merged = merge_lora(policy)
        if cfg.peft == "qlora":
            merged = dequantize_model(merged, torch.float32)
        save_pretrained(merged, out / "model", tokenizer_dir=model_dir, **ids)


class HeldOutEval:
    """Greedy completions of the held-out prompts scored by the run's reward functions
    (`reward`, and `accuracy` = exact-match when it is one of them); the same for one sampled
    completion per prompt at the rollout temperature (`sampled_reward`, `sampled_accuracy`:
    what RL optimises directly, seeded so every evaluation uses the same random draws); with a
    reference model, also `kl`: the mean sequence KL(policy || reference) of those sampled
    completions, summed per token with the k3 estimator (unbiased like log(pi/ref) but never
    negative, so small KLs do not read as < 0)."""

    def __init__(
        self,
        method,
        s,
        val,
        rewards,
        backend,
        decode,
        stop_ids,
        pad,
        policy,
        ref,
        ref_is_base,
        batch_size,
        device,
        amp,
        seed,
        max_new,
    ):
        self.__dict__.update(locals())
        del self.__dict__["self"]
        self.last_answers: list[str] = []

    def _score(self, comps: list[list[int]], prefix: str) -> tuple[dict[str, float], list[str]]:
        import torch

        texts = [self.decode([t for t in c if t not in self.stop_ids]) for c in comps]
        res = self.rewards(
            [v.item.text for v in self.val],
            texts,
            [v.item.answer for v in self.val],
            messages=[v.item.chat for v in self.val],
            completion_ids=comps,
        )
        out: dict[str, float] = {}
        tot = torch.tensor(res.total)
        ok = torch.isfinite(tot)
        out[prefix + "reward"] = float(tot[ok].mean()) if ok.any() else float("nan")
        for name, vals in res.terms.items():
            v = torch.tensor(vals)
            g = torch.isfinite(v)
            out[prefix + ("accuracy" if name == "exact_match" else f"reward_{name}")] = (
                float(v[g].mean()) if g.any() else float("nan")
            )
        if sum(res.failures.values()):
            out[prefix + "failed_rewards"] = float(sum(not x for x in ok.tolist()))
        return out, texts

    def run(self) -> dict[str, float]:
        from ..model.generate import SamplingParams

        if not self.val:
            return {}
        self.backend.sync(self.policy)
        prompts = [v.ids for v in self.val]
        greedy = SamplingParams(max_new_tokens=self.max_new, temperature=0.0, stop_token_ids=self.stop_ids)
        out, texts = self._score(self.backend.generate(prompts, 1, greedy), "")
        self.last_answers = texts[: self.s.num_samples]
        # one sample per prompt at the rollout temperature (seeded: the same draws every time):
        # what RL optimises directly, and the completions the KL is measured on
        sampled = SamplingParams(
            max_new_tokens=self.max_new,
            temperature=self.s.temperature,
            top_k=self.s.top_k,
            top_p=self.s.top_p,
            stop_token_ids=self.stop_ids,
            seed=self.seed + 99991,
        )
        comps = self.backend.generate(prompts, 1, sampled)
        out.update(self._score(comps, "sampled_")[0])
        if self.ref is not None or self.ref_is_base:
            out["kl"] = self._kl(prompts, comps)
        return out

    def _kl(self, prompts, comps) -> float:
        import torch

        from .rl_math import k3_kl, policy_forward
        from .rollout import adapters_off, build_sequences, micro_batch

        buf = build_sequences(prompts, comps, self.pad)
        total, n = 0.0, 0
        was = self.policy.training
        self.policy.eval()
        with torch.no_grad():
            for i in range(0, len(comps), self.batch_size):
                rows = torch.arange(i, min(i + self.batch_size, len(comps)))
                mb = {k: v.to(self.device) for k, v in micro_batch(buf, rows).items()}
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    lp, _, _ = policy_forward(self.policy, mb, self.s.temperature, entropy=False)
                    if self.ref_is_base:
                        with adapters_off(self.policy):
                            rp, _, _ = policy_forward(self.policy, mb, self.s.temperature, entropy=False)
                    else:
                        rp, _, _ = policy_forward(self.ref, mb, self.s.temperature, entropy=False)
                total += float((k3_kl(lp.float(), rp.float()) * mb["mask"]).sum())
                n += len(rows)
        self.policy.train(was)
        return total / max(n, 1)
