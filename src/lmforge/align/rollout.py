"""Rollouts for PPO / GRPO: sampling, scoring, advantages, and the loader that feeds the
training engine.

How RL fits the one engine: `RolloutLoader` is the engine's data iterator. When its buffer is
used up it *makes* the next one -- draws prompts, samples completions through a generation
backend, scores them, runs the frozen reference and the policy once without gradients (the
behaviour log-probs, so the first update's ratio is exactly 1), computes advantages -- and then
yields the buffer's micro-batches, `epochs` passes of `num_minibatches` optimizer steps of
`grad_accum` micro-batches. The engine supplies everything else: AdamW, schedule, clipping,
non-finite step skipping, metrics.jsonl, evaluation and checkpoints. Each rollout's record
(reward, KL, length, truncation, diversity; see `align/signals.py`) goes to the `on_record`
callback: the caller decides where it is written, the loader never sees the trainer.

Resume: the loader's `state_dict` (saved in every checkpoint by the engine) holds the RL state
-- rollouts made, the prompt stream position, the KL coefficient, the position in the current
buffer -- and, only when a checkpoint falls inside a buffer, the buffer itself (as plain lists:
no pickle). A rollout made after the last checkpoint is regenerated on resume from the same
weights with the same seed (every random draw here uses a generator seeded by (seed, rollout)),
so a resumed run produces the weights of an uninterrupted one.

Generation backends (`generate(prompts, n, params)`, `sync(model)`) are in `align/backends.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError
from ..serve.request import GenParams
from ..train.objectives.kl import sequence_kl
from ..train.objectives.rl import (
    gae,
    group_advantages,
    kl_penalty_rewards,
    masked_mean,
    masked_whiten,
    policy_forward,
)
from .backends import GenerationBackend, mix_seed
from .buffer import adapters_off, build_sequences, from_state, micro_batch, to_state
from .kl import KLGuard
from .reward_functions import RewardSet
from .signals import distinct_n, hacking_warning
from .tasks import PromptItem


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
        kl_guard: KLGuard | None = None,
        on_record: Callable[[dict], None] | None = None,
    ):
        self.method, self.s, self.policy, self.backend = method, settings, policy, backend
        self.prompts, self.rewards, self.decode = prompts, rewards, decode
        self.stop_ids, self.pad_id = list(stop_ids), pad_id
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.device, self.amp, self.ref, self.ref_is_base = device, amp, ref, ref_is_base
        self.kl_ctl, self.max_bad_rollouts, self.log = kl_ctl, max_bad_rollouts, log
        self.log_every = log_every
        self.kl_guard = kl_guard or KLGuard(0.0, 1.0)
        self.on_record = on_record or (lambda rec: None)
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
            "hacking_warnings": 0,
        }
        self.failures: dict[str, int] = {}
        self.reported_errors: set[str] = set()
        self.first: dict[str, float] = {}  # the first rollout's signals: the baseline of the warning
        self.last: dict[str, float] = {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        st = {
            "rollouts": self.rollouts,
            "prompt_pos": self.prompt_pos,
            "cursor": self.cursor,
            "kl_coef": self.kl_ctl.value,
            "kl_guard_trips": self.kl_guard.trips,
            "bad_rollouts": self.bad_rollouts,
            "zero_std_rollouts": self.zero_std_rollouts,
            "totals": dict(self.totals),
            "failures": dict(self.failures),
            "first": dict(self.first),
        }
        if self.buf is not None and self.cursor < len(self.schedule):
            st["buffer"] = to_state(self.buf)  # mid-buffer: it cannot be regenerated
        return st

    def load_state_dict(self, st: dict) -> None:
        self.rollouts, self.prompt_pos, self.cursor = (
            int(st["rollouts"]),
            int(st["prompt_pos"]),
            int(st["cursor"]),
        )
        self.kl_ctl.value = float(st["kl_coef"])
        self.kl_guard.trips = int(st.get("kl_guard_trips", 0))
        self.bad_rollouts = int(st.get("bad_rollouts", 0))
        self.zero_std_rollouts = int(st.get("zero_std_rollouts", 0))
        self.totals.update(st.get("totals", {}))
        self.failures.update(st.get("failures", {}))
        self.first = dict(st.get("first", {}))
        if "buffer" in st:
            self.buf = from_state(st["buffer"])
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
                g = torch.Generator().manual_seed(mix_seed(self.seed, rollout, e, 7))
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
            if vals is not None:
                assert v is not None  # values were asked for whenever `vals` exists
                vals[rows, :Lb] = v.float().cpu()
        model.train(was)
        return logp, vals

    # ------------------------------------------------------------------ one rollout
    def _new_rollout(self) -> None:
        r = self.rollouts
        self.rollouts += 1
        self.cursor = 0
        batch = self._draw_prompts()
        items = [p for p in batch for _ in range(self.G)]
        comps = self._sample(batch, r)
        rewards, truncated, res = self._score(items, comps)
        valid = torch.isfinite(rewards)
        if self.s.mask_truncated:
            valid &= ~truncated
        buf = build_sequences([p.ids for p in items], comps, self.pad_id)
        self._behaviour_pass(buf)
        if self.method == "grpo":
            rec = self._grpo_advantages(buf, rewards, valid, r)
        else:
            rec = self._ppo_advantages(buf, rewards, valid, truncated, r)
        rec.update(self._signals(buf, comps, rewards, truncated, res))
        self.buf = buf
        self.schedule = self._schedule(r)
        self._report(r, rec)
        self._check_usable(r, buf)

    def _sample(self, batch: list[EncodedPrompt], r: int) -> list[list[int]]:
        s = self.s
        self.backend.sync(self.policy)
        params = GenParams(
            max_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p or 1.0,
            stop_token_ids=self.stop_ids,
            seed=mix_seed(self.seed, r, 3),
        )
        return self.backend.generate([p.ids for p in batch], self.G, params)

    def _score(self, items: list[EncodedPrompt], comps: list[list[int]]):
        """(rewards [N] with NaN where a reward failed, truncated [N] bool, the RewardSet result)."""
        texts = [self.decode([t for t in c if t not in self.stop_ids]) for c in comps]
        truncated = torch.tensor([not c or c[-1] not in self.stop_ids for c in comps])
        res = self.rewards(
            [p.item.text for p in items],
            texts,
            [p.item.answer for p in items],
            messages=[p.item.chat for p in items],
            completion_ids=comps,
        )
        for name, n in res.failures.items():
            self.failures[name] = self.failures.get(name, 0) + n
        for name, err in res.errors.items():
            if name not in self.reported_errors:
                self.reported_errors.add(name)
                self.log(
                    f"reward {name!r} failed on some samples ({err}); those samples are dropped from the "
                    f"update and counted (failures_{name} in the metrics); further errors are not shown"
                )
        return torch.tensor(res.total, dtype=torch.float32), truncated, res

    def _behaviour_pass(self, buf: dict[str, torch.Tensor]) -> None:
        """The policy's log-probs (and values) and the reference's, once, without gradients."""
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

    def _kl_record(self, buf: dict[str, torch.Tensor]) -> tuple[dict[str, float], torch.Tensor]:
        """Sequence KL (k3, never negative) and log-ratio (k1) of the sampled completions, and the
        mask of sequences that take part in the update."""
        m = buf["mask"]
        live = m.sum(1) > 0
        if "ref_logp" not in buf or "old_logp" not in buf or not live.any():
            return {}, live
        kl, lr = sequence_kl(buf["old_logp"], buf["ref_logp"], m)
        return {
            "objective/kl_k3": float(kl[live].mean()),
            "objective/log_ratio": float(lr[live].mean()),
        }, live

    def _grpo_advantages(self, buf, rewards, valid, r: int) -> dict[str, float]:
        s = self.s
        adv, kept, zero_std = group_advantages(rewards, self.G, s.scale, valid)
        buf["mask"] = buf["mask"] * kept[:, None].float()
        buf["advantages"] = adv
        groups_kept = int(kept.reshape(-1, self.G).any(1).sum())
        rec: dict[str, float] = {
            "frac_zero_std_groups": float(zero_std.sum()) / max(groups_kept, 1),
            "groups_dropped": self.n_prompts - groups_kept,
        }
        self.totals["zero_std_groups"] += int(zero_std.sum())
        self.totals["groups"] += groups_kept
        self.totals["dropped_groups"] += self.n_prompts - groups_kept
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
        rec.update(self._kl_record(buf)[0])
        return rec

    def _ppo_advantages(self, buf, rewards, valid, truncated, r: int) -> dict[str, float]:
        s = self.s
        buf["mask"] = buf["mask"] * valid.float()[:, None]
        m = buf["mask"]
        scores = torch.where(valid, rewards, torch.zeros_like(rewards))
        if s.missing_eos_penalty is not None:
            scores = torch.where(truncated & valid, scores - s.missing_eos_penalty, scores)
        rec, live = self._kl_record(buf)
        kl = rec.get("objective/kl_k3", float("nan"))
        guarded = self.kl_guard.check(kl)
        if guarded:
            self.log(self.kl_guard.message(r, kl, self.kl_ctl.value))
        coef = self.kl_ctl.value
        train_scores = torch.zeros_like(scores) if guarded else scores
        tok_rewards, pen = kl_penalty_rewards(
            buf["old_logp"], buf["ref_logp"], train_scores, m, coef, s.kl_estimator
        )
        if s.whiten_rewards:
            tok_rewards = masked_whiten(tok_rewards, m, shift_mean=False)
        adv, ret = gae(tok_rewards, buf["old_values"], m, s.gamma, s.lam)
        buf["advantages"] = masked_whiten(adv, m) if m.sum() > 1 else adv
        buf["returns"] = ret
        pen_seq = pen.sum(1)[live]
        rec.update(
            {
                "objective/kl_coef": coef,
                "objective/non_score_reward": float((-coef * pen_seq).mean()) if live.any() else 0.0,
                "objective/rlhf_reward": float((scores[live] - coef * pen_seq).mean()) if live.any() else 0.0,
                "val/ret_mean": float(masked_mean(ret, m)),
                "kl_guard_tripped": float(guarded),
            }
        )
        self.kl_ctl.update(kl, int(live.sum()))
        return rec

    def _signals(self, buf, comps, rewards, truncated, res) -> dict[str, float]:
        """Reward, length, truncation, diversity and failure counts of the rollout."""
        ok = torch.isfinite(rewards)
        n_failed = int((~ok).sum())
        lens = torch.tensor([len(c) for c in comps], dtype=torch.float32)
        content = [[t for t in c if t not in self.stop_ids] for c in comps]
        rec: dict[str, float] = {
            "reward": float(rewards[ok].mean()) if ok.any() else float("nan"),
            "reward_std": float(rewards[ok].std()) if int(ok.sum()) > 1 else 0.0,
            "completion_length": float(lens.mean()),
            "truncated_frac": float(truncated.float().mean()),
            "distinct_1": distinct_n(content, 1),
            "distinct_2": distinct_n(content, 2),
            "failed_samples": n_failed,
            "kept_samples": int((buf["mask"].sum(1) > 0).sum()),
        }
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
        return rec

    def _report(self, r: int, rec: dict[str, float]) -> None:
        self.last = rec
        if not self.first:
            self.first = {k: rec[k] for k in ("reward", "distinct_2") if k in rec}
        warning = hacking_warning(
            self.first, rec, reward="reward", distinct="distinct_2", where=f"rollout {r}"
        )
        if warning:
            self.totals["hacking_warnings"] += 1
        self.on_record(
            {
                "rollout": r,
                **{
                    k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
                    for k, v in rec.items()
                },
            }
        )
        if warning and self.totals["hacking_warnings"] == 1:
            self.log(warning + " (later rollouts: counted in hacking_warnings, not repeated)")
        if r == 0 or (r + 1) % self.log_every == 0:
            extra = (
                f", kl {rec['objective/kl_k3']:.3f} nats/seq (k3)"
                + (f" (coef {self.kl_ctl.value:.4f})" if self.method == "ppo" else "")
                if "objective/kl_k3" in rec
                else ""
            )
            zs = (
                f", zero-std groups {rec['frac_zero_std_groups']:.0%}"
                if "frac_zero_std_groups" in rec
                else ""
            )
            n_failed = rec["failed_samples"]
            self.log(
                f"rollout {r}: reward {rec['reward']:.3f} +- {rec['reward_std']:.3f}, "
                f"length {rec['completion_length']:.1f}, truncated {rec['truncated_frac']:.0%}, "
                f"distinct-2 {rec['distinct_2']:.3f}{zs}{extra}"
                + (f", {n_failed} failed reward(s)" if n_failed else "")
            )

    def _check_usable(self, r: int, buf: dict[str, torch.Tensor]) -> None:
        if int(buf["mask"].sum()):
            self.bad_rollouts = 0
            return
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
