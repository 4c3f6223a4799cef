"""Rollouts for PPO / GRPO: generation backends, scoring, advantages, and the loader that
feeds the training engine.

How RL fits the one engine: `RolloutLoader` is the engine's data iterator. When its buffer is
used up it *makes* the next one -- draws prompts, samples completions through a generation
backend, scores them, runs the frozen reference and the policy once without gradients (the
behaviour log-probs, so the first update's ratio is exactly 1), computes advantages -- and then
yields the buffer's micro-batches, `epochs` passes of `num_minibatches` optimizer steps of
`grad_accum` micro-batches. The engine supplies everything else: AdamW, schedule, clipping,
non-finite step skipping, metrics.jsonl, evaluation and checkpoints.

Resume: the loader's `state_dict` (saved in every checkpoint by the engine) holds the RL state
-- rollouts made, the prompt stream position, the KL coefficient, the position in the current
buffer -- and, only when a checkpoint falls inside a buffer, the buffer itself (as plain lists:
no pickle). A rollout made after the last checkpoint is regenerated on resume from the same
weights with the same seed (every random draw here uses a generator seeded by (seed, rollout)),
so a resumed run produces the weights of an uninterrupted one.

Generation backends implement `generate(prompts, n, params) -> completions` (n samples per
prompt, prompt-major; a completion keeps its stop token so the policy learns to stop) and
`sync(model)` (weights changed). `LmforgeBackend` runs `lmforge.model.generate` (KV cache,
batched, left-padded, seeded); `VLLMBackend` is used only when asked for and `vllm` imports on
a CUDA machine.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..model.generate import SamplingParams, stream_generate
from ..train.tracking import MetricsWriter
from .rewards import RewardSet
from .rl_math import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    group_advantages,
    kl_penalty_rewards,
    masked_mean,
    masked_whiten,
    policy_forward,
)
from .tasks import PromptItem

_MIX = 1_000_003


def _seed(*parts: int) -> int:
    s = 0
    for p in parts:
        s = (s * _MIX + int(p)) % (2**62)
    return s


# ----------------------------------------------------------------------------- backends
class GenerationBackend(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams) -> list[list[int]]:
        """n completions per prompt, prompt-major (out[i * n + j]); each ends with its stop
        token when one was sampled."""

    def sync(self, model: torch.nn.Module) -> None:
        """The policy's weights changed; refresh the backend's copy (if it keeps one)."""


class LmforgeBackend:
    """`lmforge.model.generate.stream_generate` on the policy itself: KV cache, left padding,
    a seeded generator per chunk of `batch_size` sequences."""

    name = "lmforge"

    def __init__(self, model: torch.nn.Module, batch_size: int = 64):
        self.model, self.batch_size = model, batch_size

    def sync(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams) -> list[list[int]]:
        seqs = [list(p) for p in prompts for _ in range(n)]
        stops = set(params.stop_token_ids)
        out: list[list[int]] = []
        was = self.model.training
        self.model.eval()
        try:
            for c, i in enumerate(range(0, len(seqs), self.batch_size)):
                chunk = seqs[i : i + self.batch_size]
                p = SamplingParams(
                    **{**params.__dict__, "seed": None if params.seed is None else _seed(params.seed, c)}
                )
                got: list[list[int]] = [[] for _ in chunk]
                done = [False] * len(chunk)
                for step in stream_generate(self.model, chunk, p, use_cache=True):
                    for j, t in enumerate(step.tolist()):
                        if not done[j]:
                            got[j].append(t)
                            done[j] = t in stops
                out += got
        finally:
            self.model.train(was)
        return out


class VLLMBackend:
    """vLLM for rollouts on a GPU machine (optional; never needed by tests). The policy's
    weights are pushed into the vLLM engine before each rollout (`sync`). vLLM's internal API
    for this has moved between versions; the paths tried are listed in `_load_weights`."""

    name = "vllm"

    def __init__(
        self, model_dir: str, model: torch.nn.Module, seed: int, gpu_memory_utilization: float = 0.3
    ):
        from vllm import LLM  # noqa: F401  (guarded by make_backend)

        self.llm = LLM(
            model=str(model_dir),
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=True,
        )
        self.sync(model)

    def sync(self, model: torch.nn.Module) -> None:
        state = _merged_state(model)
        self._load_weights(list(state.items()))

    def _load_weights(self, items) -> None:
        eng = self.llm.llm_engine
        paths = (
            lambda: eng.model_executor.driver_worker.model_runner.model,
            lambda: eng.model_executor.driver_worker.worker.model_runner.model,
        )
        for get in paths:
            try:
                target = get()
            except AttributeError:
                continue
            target.load_weights(items)
            return
        if hasattr(self.llm, "collective_rpc"):
            self.llm.collective_rpc(lambda self_: self_.model_runner.model.load_weights(items))
            return
        raise ConfigError(
            "rl backend vllm: this vLLM version offers no known way to load updated weights; "
            "use backend=lmforge"
        )

    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams) -> list[list[int]]:
        from vllm import SamplingParams as VSP

        vp = VSP(
            n=n,
            temperature=params.temperature,
            top_p=params.top_p or 1.0,
            top_k=params.top_k or -1,
            max_tokens=params.max_new_tokens,
            stop_token_ids=list(params.stop_token_ids),
            seed=params.seed,
            skip_special_tokens=False,
        )
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], vp, use_tqdm=False)
        stops = set(params.stop_token_ids)
        res = []
        for o in outs:
            for c in o.outputs:
                ids = list(c.token_ids)
                if c.finish_reason == "stop" and (not ids or ids[-1] not in stops) and stops:
                    ids.append(min(stops))
                res.append(ids)
        return res


def _merged_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF-named weights of the policy with any LoRA update folded in (for an external engine)."""
    from ..peft.lora import LoraLinear

    out = {}
    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    for name, m in lora.items():
        out[f"{name}.weight"] = m.merged_weight()
    for k, v in model.state_dict().items():
        if ".lora_" in k or k.startswith("v_head") or ".base_layer." in k:
            continue
        out[k] = v
    return out


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001  (any import failure means: not usable here)
        return False
    return torch.cuda.is_available()


def make_backend(
    kind: str,
    model: torch.nn.Module,
    *,
    model_dir: str,
    seed: int,
    batch_size: int,
    log: Callable[[str], None],
) -> GenerationBackend:
    if kind == "vllm" or (kind == "auto" and vllm_available()):
        if not vllm_available():
            raise ConfigError("backend=vllm needs the `vllm` package and a CUDA GPU; use backend=lmforge")
        log("generation backend: vLLM")
        return VLLMBackend(model_dir, model, seed)
    return LmforgeBackend(model, batch_size)


# ----------------------------------------------------------------------------- references
@contextlib.contextmanager
def adapters_off(model: torch.nn.Module):
    """Run a LoRA/QLoRA policy as its frozen base model: the reference for KL, with no copy."""
    from ..peft.lora import LoraLinear

    mods = [m for m in model.modules() if isinstance(m, LoraLinear) and not m.merged]
    for m in mods:
        m.merged = True  # LoraLinear.forward returns the base layer's output when merged
    try:
        yield model
    finally:
        for m in mods:
            m.merged = False


# ----------------------------------------------------------------------------- the buffer
def micro_batch(buf: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows of the buffer, trimmed to the longest sequence / completion among them. The same
    function builds the no-grad behaviour pass and the training pass, so their shapes match."""
    end = int(buf["seq_end"][rows].max())
    L = max(1, int(buf["mask_len"][rows].max()))
    out = {"input_ids": buf["input_ids"][rows, :end]}
    for k in ("idx", "targets", "mask", "advantages", "old_logp", "ref_logp", "old_values", "returns"):
        if k in buf:
            out[k] = buf[k][rows, :L] if buf[k].dim() == 2 else buf[k][rows]
    return out


def build_sequences(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion rows and completion-aligned gather indices."""
    N = len(completions)
    ends = [len(p) + len(c) for p, c in zip(prompts, completions)]
    T, L = max(ends), max(1, max(len(c) for c in completions))
    ids = torch.full((N, T), pad_id, dtype=torch.long)
    idx = torch.zeros((N, L), dtype=torch.long)
    targets = torch.full((N, L), pad_id, dtype=torch.long)
    mask = torch.zeros((N, L))
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, : len(p) + len(c)] = torch.tensor(list(p) + list(c))
        k = len(c)
        if k:
            idx[i, :k] = torch.arange(len(p) - 1, len(p) - 1 + k)
            targets[i, :k] = torch.tensor(list(c))
            mask[i, :k] = 1.0
    return {
        "input_ids": ids,
        "idx": idx,
        "targets": targets,
        "mask": mask,
        "seq_end": torch.tensor(ends),
        "mask_len": mask.sum(1).long(),
    }  # mask_len: completion lengths


def _to_state(buf: dict[str, torch.Tensor]) -> dict:
    return {
        k: {
            "dtype": str(v.dtype).removeprefix("torch."),
            "shape": list(v.shape),
            "data": v.reshape(-1).tolist(),
        }
        for k, v in buf.items()
    }


def _from_state(state: dict) -> dict[str, torch.Tensor]:
    return {
        k: torch.tensor(v["data"], dtype=getattr(torch, v["dtype"])).reshape(v["shape"])
        for k, v in state.items()
    }


# ----------------------------------------------------------------------------- the loader
@dataclass
class EncodedPrompt:
    item: PromptItem
    ids: list[int]


class RolloutLoader:
    """The engine's data iterator for PPO / GRPO (see the module docstring)."""

    def __init__(
        self,
        *,
        method: str,
        settings,
        policy: torch.nn.Module,
        backend: GenerationBackend,
        prompts: list[EncodedPrompt],
        rewards: RewardSet,
        decode: Callable[[list[int]], str],
        stop_ids: Sequence[int],
        pad_id: int,
        batch_size: int,
        grad_accum: int,
        seed: int,
        device: torch.device,
        amp: torch.dtype | None,
        ref: torch.nn.Module | None,
        ref_is_base: bool,
        kl_ctl,
        max_bad_rollouts: int,
        log: Callable[[str], None],
        log_every: int = 10,
    ):
        self.method, self.s, self.policy, self.backend = method, settings, policy, backend
        self.prompts, self.rewards, self.decode = prompts, rewards, decode
        self.stop_ids, self.pad_id = list(stop_ids), pad_id
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.device, self.amp, self.ref, self.ref_is_base = device, amp, ref, ref_is_base
        self.kl_ctl, self.max_bad_rollouts, self.log, self.log_every = (
            kl_ctl,
            max_bad_rollouts,
            log,
            log_every,
        )
        self.G = settings.group_size if method == "grpo" else 1
        self.n_seq = batch_size * grad_accum * settings.num_minibatches
        self.n_prompts = self.n_seq // self.G
        self.needs_old = method == "ppo" or settings.epochs > 1 or settings.num_minibatches > 1
        self.needs_ref = ref is not None or ref_is_base
        # state
        self.rollouts = 0
        self.prompt_pos = 0
        self.cursor = 0
        self.buf: dict[str, torch.Tensor] | None = None
        self.schedule: list[torch.Tensor] = []
        self.bad_rollouts = 0
        self.zero_std_rollouts = 0
        self.totals = {
            "samples": 0,
            "failed_samples": 0,
            "dropped_groups": 0,
            "zero_std_groups": 0,
            "groups": 0,
            "truncated": 0,
        }
        self.failures: dict[str, int] = {}
        self.reported_errors: set[str] = set()
        self.step_fn: Callable[[], int] = lambda: 0
        self.metrics: MetricsWriter | None = None
        self.last: dict[str, float] = {}

    def bind(self, trainer) -> None:
        """Learn the trainer's step (for metric lines) and metrics file."""
        self.step_fn = lambda: trainer.step
        self.metrics = trainer.metrics

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        st = {
            "rollouts": self.rollouts,
            "prompt_pos": self.prompt_pos,
            "cursor": self.cursor,
            "kl_coef": self.kl_ctl.value,
            "bad_rollouts": self.bad_rollouts,
            "zero_std_rollouts": self.zero_std_rollouts,
            "totals": dict(self.totals),
            "failures": dict(self.failures),
        }
        if self.buf is not None and self.cursor < len(self.schedule):
            st["buffer"] = _to_state(self.buf)  # mid-buffer: it cannot be regenerated
        return st

    def load_state_dict(self, st: dict) -> None:
        self.rollouts, self.prompt_pos, self.cursor = (
            int(st["rollouts"]),
            int(st["prompt_pos"]),
            int(st["cursor"]),
        )
        self.kl_ctl.value = float(st["kl_coef"])
        self.bad_rollouts = int(st.get("bad_rollouts", 0))
        self.zero_std_rollouts = int(st.get("zero_std_rollouts", 0))
        self.totals.update(st.get("totals", {}))
        self.failures.update(st.get("failures", {}))
        if "buffer" in st:
            self.buf = _from_state(st["buffer"])
            self.schedule = self._schedule(self.rollouts - 1)
        else:
            self.buf, self.schedule = None, []

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        while self.buf is None or self.cursor >= len(self.schedule):
            self._new_rollout()
        rows = self.schedule[self.cursor]
        self.cursor += 1
        return micro_batch(self.buf, rows)

    def _schedule(self, rollout: int) -> list[torch.Tensor]:
        """Micro-batch row lists: epoch 0 in order (as the behaviour pass), later epochs shuffled."""
        out = []
        for e in range(self.s.epochs):
            if e == 0:
                order = torch.arange(self.n_seq)
            else:
                g = torch.Generator().manual_seed(_seed(self.seed, rollout, e, 7))
                order = torch.randperm(self.n_seq, generator=g)
            out += [order[i : i + self.batch_size] for i in range(0, self.n_seq, self.batch_size)]
        return out

    def _draw_prompts(self) -> list[EncodedPrompt]:
        n = len(self.prompts)
        out = []
        for _ in range(self.n_prompts):
            epoch, k = divmod(self.prompt_pos, n)
            perm = np.random.default_rng([self.seed, epoch, 11]).permutation(n)
            out.append(self.prompts[perm[k]])
            self.prompt_pos += 1
        return out

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    @torch.no_grad()
    def _forward_all(self, model, buf, *, values: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and values) of the whole buffer, micro-batch by micro-batch as epoch 0."""
        N, L = buf["mask"].shape
        logp = torch.zeros(N, L)
        vals = torch.zeros(N, L) if values else None
        was = model.training
        model.train()  # the mode of the update (no dropout anywhere, but keep it identical)
        for i in range(0, N, self.batch_size):
            rows = torch.arange(i, min(i + self.batch_size, N))
            mb = {k: v.to(self.device) for k, v in micro_batch(buf, rows).items()}
            with self._autocast():
                lp, _, v = policy_forward(model, mb, self.s.temperature, values=values, entropy=False)
            Lb = lp.shape[1]
            logp[rows, :Lb] = lp.float().cpu()
            if values:
                vals[rows, :Lb] = v.float().cpu()
        model.train(was)
        return logp, vals

    def _new_rollout(self) -> None:
        s = self.s
        r = self.rollouts
        self.rollouts += 1
        self.cursor = 0
        self.backend.sync(self.policy)
        batch = self._draw_prompts()
        params = SamplingParams(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            stop_token_ids=self.stop_ids,
            seed=_seed(self.seed, r, 3),
        )
        comps = self.backend.generate([p.ids for p in batch], self.G, params)
        items = [p for p in batch for _ in range(self.G)]
        prompt_ids = [p.ids for p in items]
        texts = [self.decode([t for t in c if t not in self.stop_ids]) for c in comps]
        truncated = torch.tensor([not c or c[-1] not in self.stop_ids for c in comps])
        res = self.rewards(
            [p.item.text for p in items],
            texts,
            [p.item.answer for p in items],
            messages=[p.item.chat for p in items],
            completion_ids=comps,
        )
        rewards = torch.tensor(res.total, dtype=torch.float32)
        valid = torch.isfinite(rewards)
        for name, n in res.failures.items():
            self.failures[name] = self.failures.get(name, 0) + n
        for name, err in res.errors.items():
            if name not in self.reported_errors:
                self.reported_errors.add(name)
                self.log(
                    f"reward {name!r} failed on some samples ({err}); those samples are dropped from the "
                    f"update and counted (failures_{name} in the metrics); further errors are not shown"
                )
        buf = build_sequences(prompt_ids, comps, self.pad_id)
        if s.mask_truncated:
            valid &= ~truncated

        rec: dict[str, float] = {}
        if self.needs_old:
            buf["old_logp"], vals = self._forward_all(self.policy, buf, values=self.method == "ppo")
            if vals is not None:
                buf["old_values"] = vals
        if self.needs_ref:
            if self.ref_is_base:
                with adapters_off(self.policy):
                    buf["ref_logp"], _ = self._forward_all(self.policy, buf, values=False)
            else:
                buf["ref_logp"], _ = self._forward_all(self.ref, buf, values=False)

        if self.method == "grpo":
            adv, kept, zero_std = group_advantages(rewards, self.G, s.scale, valid)
            buf["mask"] = buf["mask"] * kept[:, None].float()
            buf["advantages"] = adv
            n_groups = self.n_prompts
            groups_kept = int(kept.reshape(-1, self.G).any(1).sum())
            rec.update(
                {
                    "frac_zero_std_groups": float(zero_std.sum()) / max(groups_kept, 1),
                    "groups_dropped": n_groups - groups_kept,
                }
            )
            self.totals["zero_std_groups"] += int(zero_std.sum())
            self.totals["groups"] += groups_kept
            self.totals["dropped_groups"] += n_groups - groups_kept
            if groups_kept and int(zero_std.sum()) == groups_kept:
                self.zero_std_rollouts += 1
                vals_seen = sorted({round(float(x), 4) for x in rewards[kept]})
                note = " (the KL term alone moves the policy)" if s.beta > 0 else ""
                self.log(
                    f"rollout {r}: every group's {self.G} samples got the same reward "
                    f"({', '.join(map(str, vals_seen[:4]))}), so every advantage is 0 and the policy loss of "
                    f"the next {len(self._schedule(r))} micro-batch(es) is exactly 0{note}: not a bug, no "
                    f"learning signal. Easier prompts, a larger group_size or a higher temperature help "
                    f"({self.zero_std_rollouts} such rollout(s) so far)."
                )
        else:
            keep = valid.float()
            buf["mask"] = buf["mask"] * keep[:, None]
            scores = torch.where(valid, rewards, torch.zeros_like(rewards))
            if s.missing_eos_penalty is not None:
                scores = torch.where(truncated & valid, scores - s.missing_eos_penalty, scores)
            m = buf["mask"]
            tok_rewards, kl = kl_penalty_rewards(
                buf["old_logp"], buf["ref_logp"], scores, m, self.kl_ctl.value
            )
            if s.whiten_rewards:
                tok_rewards = masked_whiten(tok_rewards, m, shift_mean=False)
            adv, ret = gae(tok_rewards, buf["old_values"], m, s.gamma, s.lam)
            buf["advantages"] = masked_whiten(adv, m) if m.sum() > 1 else adv
            buf["returns"] = ret
            live = m.sum(1) > 0
            seq_kl = kl.sum(1)[live]
            mean_kl = float(seq_kl.mean()) if live.any() else float("nan")
            rec.update(
                {
                    "objective/kl": mean_kl,
                    "objective/kl_coef": self.kl_ctl.value,
                    "objective/non_score_reward": float((-self.kl_ctl.value * seq_kl).mean())
                    if live.any()
                    else 0.0,
                    "objective/rlhf_reward": float((scores[live] - self.kl_ctl.value * seq_kl).mean())
                    if live.any()
                    else 0.0,
                    "val/ret_mean": float(masked_mean(ret, m)),
                }
            )
            self.kl_ctl.update(mean_kl, int(live.sum()))
        if "ref_logp" in buf and self.method == "grpo" and "old_logp" in buf:
            m = buf["mask"]
            rec["objective/kl"] = (
                float(((buf["old_logp"] - buf["ref_logp"]) * m).sum(1)[m.sum(1) > 0].mean())
                if m.sum()
                else 0.0
            )
        self.buf = buf
        self.schedule = self._schedule(r)

        n_failed = int((~torch.isfinite(rewards)).sum())
        lens = torch.tensor([len(c) for c in comps], dtype=torch.float32)
        ok = torch.isfinite(rewards)
        rec.update(
            {
                "reward": float(rewards[ok].mean()) if ok.any() else float("nan"),
                "reward_std": float(rewards[ok].std()) if int(ok.sum()) > 1 else 0.0,
                "completion_length": float(lens.mean()),
                "truncated_frac": float(truncated.float().mean()),
                "failed_samples": n_failed,
                "kept_samples": int((buf["mask"].sum(1) > 0).sum()),
            }
        )
        if self.needs_old:
            m = buf["mask"]
            rec["objective/entropy"] = (
                float((-buf["old_logp"] * m).sum(1)[m.sum(1) > 0].mean()) if m.sum() else 0.0
            )
        for name, vals in res.terms.items():
            v = torch.tensor(vals)
            good = torch.isfinite(v)
            rec[f"rewards/{name}"] = float(v[good].mean()) if good.any() else float("nan")
        self.totals["samples"] += len(comps)
        self.totals["failed_samples"] += n_failed
        self.totals["truncated"] += int(truncated.sum())
        self.last = rec
        if self.metrics is not None:
            self.metrics.write(
                {
                    "step": self.step_fn() + 1,
                    "rollout": r,
                    **{
                        k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
                        for k, v in rec.items()
                    },
                },
            )
        if r == 0 or (r + 1) % self.log_every == 0:
            extra = (
                f", kl {rec['objective/kl']:.3f} (coef {self.kl_ctl.value:.4f})"
                if "objective/kl" in rec
                else ""
            )
            zs = (
                f", zero-std groups {rec['frac_zero_std_groups']:.0%}"
                if "frac_zero_std_groups" in rec
                else ""
            )
            self.log(
                f"rollout {r}: reward {rec['reward']:.3f} +- {rec['reward_std']:.3f}, "
                f"length {rec['completion_length']:.1f}{zs}{extra}"
                + (f", {n_failed} failed reward(s)" if n_failed else "")
            )
        if not int(buf["mask"].sum()):
            self.bad_rollouts += 1
            self.buf = None
            self.log(
                f"rollout {r}: no sample is usable (every reward failed or every group was dropped); "
                f"drawing the next prompts ({self.bad_rollouts}/{self.max_bad_rollouts})"
            )
            if self.bad_rollouts >= self.max_bad_rollouts:
                raise DataError(
                    f"{self.bad_rollouts} rollouts in a row had no usable sample; the reward "
                    f"functions fail on everything ({dict(self.failures)}): fix them (the first "
                    f"error is in the log) and run again to resume"
                )
        else:
            self.bad_rollouts = 0


def make_kl_controller(s) -> FixedKLController | AdaptiveKLController:
    """PPO's KL coefficient: adaptive (Ziegler et al.) or fixed."""
    if s.adaptive_kl:
        return AdaptiveKLController(s.kl_coef, s.target_kl, s.kl_horizon)
    return FixedKLController(s.kl_coef)
