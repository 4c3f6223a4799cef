"""Held-out evaluation of an RL policy: what the run reports before, during and after training.

Greedy completions of the held-out prompts scored by the run's reward functions (`reward`, and
`accuracy` = exact match when it is one of them), and one sampled completion per prompt at the
rollout temperature (`sampled_reward`, `sampled_accuracy`: what RL optimises directly, seeded so
every evaluation uses the same random draws). With a reference model, also `kl`: the mean
sequence KL(policy || reference) of those sampled completions, summed per token with the k3
estimator (unbiased, never negative), and `sampled_reward_minus_kl` = sampled_reward - kl_coef x kl,
the objective PPO maximises. The reward-hacking signals (`align/signals.py`): `sampled_distinct_2`
(diversity of the sampled answers), `sampled_truncated_frac`, and `start_answer_nll` (per-token NLL
under the policy of the starting model's greedy answers, a held-out likelihood that needs no
extra data).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..serve.request import GenParams
from ..train.objectives.kl import k3_kl
from ..train.objectives.rl import policy_forward
from .backends import GenerationBackend
from .buffer import adapters_off, build_sequences, micro_batch
from .config import RolloutSettings
from .reward_functions import RewardSet
from .signals import distinct_n


@dataclass
class HeldOutEval:
    s: RolloutSettings  # the method's settings
    val: list  # EncodedPrompt
    rewards: RewardSet
    backend: GenerationBackend
    decode: Callable[[list[int]], str]
    stop_ids: Sequence[int]
    pad: int
    policy: torch.nn.Module
    ref: torch.nn.Module | None
    ref_is_base: bool
    batch_size: int
    device: torch.device
    amp: torch.dtype | None
    seed: int
    max_new: int
    kl_coef: Callable[[], float] | None = None  # PPO: the current coefficient
    last_answers: list[str] = field(default_factory=list)
    start_ids: list[list[int]] | None = None  # the starting policy's greedy completions

    def _score(self, comps: list[list[int]], prefix: str) -> tuple[dict[str, float], list[str]]:
        content = [[t for t in c if t not in self.stop_ids] for c in comps]
        texts = [self.decode(c) for c in content]
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
        out[prefix + "distinct_2"] = distinct_n(content, 2)
        out[prefix + "truncated_frac"] = sum(not c or c[-1] not in self.stop_ids for c in comps) / len(comps)
        return out, texts

    def run(self) -> dict[str, float]:
        if not self.val:
            return {}
        self.backend.sync(self.policy)
        prompts = [v.ids for v in self.val]
        greedy = GenParams(max_tokens=self.max_new, temperature=0.0, stop_token_ids=self.stop_ids)
        g_comps = self.backend.generate(prompts, 1, greedy)
        out, texts = self._score(g_comps, "")
        self.last_answers = texts[: self.s.num_samples]
        if self.start_ids is None:
            self.start_ids = g_comps  # the first evaluation is of the starting policy
        # one sample per prompt at the rollout temperature (seeded: the same draws every time):
        # what RL optimises directly, and the completions the KL is measured on
        sampled = GenParams(
            max_tokens=self.max_new,
            temperature=self.s.temperature,
            top_k=self.s.top_k,
            top_p=self.s.top_p or 1.0,
            stop_token_ids=self.stop_ids,
            seed=self.seed + 99991,
        )
        comps = self.backend.generate(prompts, 1, sampled)
        out.update(self._score(comps, "sampled_")[0])
        lp, _ = self._logp(self.policy, prompts, self.start_ids, 1.0)
        out["start_answer_nll"] = float(-lp.sum() / max(sum(len(c) for c in self.start_ids), 1))
        if self.ref is not None or self.ref_is_base:
            pol, mask = self._logp(self.policy, prompts, comps, self.s.temperature)
            ref, _ = self._logp(None, prompts, comps, self.s.temperature)
            out["kl"] = float((k3_kl(pol, ref) * mask).sum()) / len(comps)
            if self.kl_coef is not None:
                out["sampled_reward_minus_kl"] = out["sampled_reward"] - self.kl_coef() * out["kl"]
        return out

    @torch.no_grad()
    def _logp(
        self, model: torch.nn.Module | None, prompts, comps, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs [N, L] (0 on padding) of `comps` under `model` (None: the
        reference) and the completion mask."""
        buf = build_sequences(prompts, comps, self.pad)
        out = torch.zeros(buf["mask"].shape)
        was = self.policy.training
        self.policy.eval()
        for i in range(0, len(comps), self.batch_size):
            rows = torch.arange(i, min(i + self.batch_size, len(comps)))
            mb = {k: v.to(self.device) for k, v in micro_batch(buf, rows).items()}
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                if model is None and self.ref_is_base:
                    with adapters_off(self.policy):
                        lp, _, _ = policy_forward(self.policy, mb, temperature, entropy=False)
                else:
                    scorer = model or self.ref
                    assert scorer is not None  # run() measures the KL only when there is a reference
                    lp, _, _ = policy_forward(scorer, mb, temperature, entropy=False)
            out[rows, : lp.shape[1]] = (lp.float() * mb["mask"]).cpu()
        self.policy.train(was)
        return out, buf["mask"]
