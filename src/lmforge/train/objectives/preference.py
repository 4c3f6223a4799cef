"""Preference losses as pure functions, the log-prob helper they feed on, and the engine objective.

Every loss takes per-pair *summed* completion log-probs (prompt tokens never count) of the
policy and, where the method has one, of the frozen reference, and returns per-pair losses plus
the implicit rewards TRL logs, so the formulas can be checked by hand (tests do) and reused by
other trainers. Notation: pi_c, pi_r = log pi(chosen|x), log pi(rejected|x); ref_c, ref_r the
same under the reference; h = (pi_c - ref_c) - (pi_r - ref_r), the log-ratio difference.

* **DPO** (Rafailov et al. 2023), sigmoid form with label smoothing eps (conservative DPO,
  "cDPO": the label is assumed flipped with probability eps):
  ``-(1-eps) logsigmoid(beta h) - eps logsigmoid(-beta h)``. With policy == reference, h = 0 and
  the loss is exactly log 2 -- the invariant the tests pin.
* **IPO** (Azar et al. 2023): ``(h - 1/(2 beta))^2``; regresses the margin to a finite target
  instead of pushing it to infinity, so it does not overfit deterministic preferences. We use
  summed log-probs as in the paper (TRL averages them per token; say so if you compare).
* **hinge** (SLiC, Zhao et al. 2023): ``relu(1 - beta h)``.
* **ORPO** (Hong et al. 2024), no reference: NLL of the chosen completion (per-token mean) plus
  ``lambda * -logsigmoid(log odds(chosen) - log odds(rejected))`` where odds(y) = p/(1-p) and
  p = exp(mean per-token log-prob), as in the paper and TRL (there lambda is `beta`).
* **Bradley-Terry** for reward models: ``-logsigmoid(r_c - r_r - margin)``.

Rewards (TRL's names): DPO family ``beta (pi - ref)``; ORPO ``beta * mean log-prob``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ...model.attention import DocumentMask
from ...model.output import token_logprobs

IGNORE = -100
LOG2 = math.log(2.0)


@dataclass
class PrefLoss:
    losses: torch.Tensor  # [B] per-pair loss
    chosen_rewards: torch.Tensor  # [B] detached
    rejected_rewards: torch.Tensor  # [B] detached
    extra: dict[str, torch.Tensor] | None = None  # further per-pair terms worth logging (detached)


def _rewards(pc, pr, rc, rr, beta) -> tuple[torch.Tensor, torch.Tensor]:
    return (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def dpo_loss(
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PrefLoss:
    """Sigmoid DPO; `label_smoothing` > 0 is conservative DPO (robust to flipped labels)."""
    h = (pc - rc) - (pr - rr)
    losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    return PrefLoss(losses, *_rewards(pc, pr, rc, rr, beta))


def ipo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float) -> PrefLoss:
    h = (pc - rc) - (pr - rr)
    return PrefLoss((h - 1 / (2 * beta)) ** 2, *_rewards(pc, pr, rc, rr, beta))


def hinge_loss(
    pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float
) -> PrefLoss:
    h = (pc - rc) - (pr - rr)
    return PrefLoss(torch.relu(1 - beta * h), *_rewards(pc, pr, rc, rr, beta))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012); x is clamped just below 0
    so a completion the model is certain of gives a large finite value, not inf."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -LOG2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(mean_c: torch.Tensor, mean_r: torch.Tensor, beta: float) -> PrefLoss:
    """ORPO from per-token *mean* completion log-probs of chosen and rejected (no reference)."""
    log_odds = (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))
    ratio = F.logsigmoid(log_odds)
    nll = -mean_c
    return PrefLoss(
        nll - beta * ratio,
        (beta * mean_c).detach(),
        (beta * mean_r).detach(),
        {"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()},
    )


def bradley_terry_loss(
    r_c: torch.Tensor, r_r: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-pair reward-model loss; `margin` (how much better chosen is, when the data says) as in
    Llama 2's reward models: the chosen score must beat the rejected one by at least that."""
    d = r_c - r_r
    if margin is not None:
        d = d - margin
    return -F.logsigmoid(d)


REFERENCE_METHODS = ("dpo", "ipo", "hinge")


def preference_loss(method: str, beta: float, label_smoothing: float = 0.0) -> Callable[..., PrefLoss]:
    """fn(pc, pr, rc, rr, mean_c, mean_r) -> PrefLoss for `method`."""
    if method == "dpo":
        return lambda pc, pr, rc, rr, mc, mr: dpo_loss(pc, pr, rc, rr, beta, label_smoothing)
    if method == "ipo":
        return lambda pc, pr, rc, rr, mc, mr: ipo_loss(pc, pr, rc, rr, beta)
    if method == "hinge":
        return lambda pc, pr, rc, rr, mc, mr: hinge_loss(pc, pr, rc, rr, beta)
    if method == "orpo":
        return lambda pc, pr, rc, rr, mc, mr: orpo_loss(mc, mr, beta)
    raise ValueError(f"unknown preference method {method!r}")


def reward_metric_tensors(out: PrefLoss) -> dict[str, torch.Tensor]:
    """TRL's logged names as 0-d device tensors (the engine reads them back once per step)."""
    c, r = out.chosen_rewards.float(), out.rejected_rewards.float()
    m = {
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/margins": (c - r).mean(),
        "rewards/accuracies": (c > r).float().mean(),
    }
    for k, v in (out.extra or {}).items():
        m[k] = v.float().mean()
    return m


def reward_metrics(out: PrefLoss) -> dict[str, float]:
    """TRL's logged names: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies."""
    return {k: float(v) for k, v in reward_metric_tensors(out).items()}


# ----------------------------------------------------------------------------- log-probs
def completion_logps(
    model: Any,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of the labelled tokens, number of them) per row.

    `labels[b, t]` is the token expected after position t, or IGNORE; only completion tokens are
    labelled. The output projection and log-softmax run only at labelled positions (with a 4k+
    vocabulary the full [rows, T, vocab] logits are the largest tensor of the step)."""
    sel = labels != IGNORE
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[sel]
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head"):
        h = model.hidden_states(input_ids, attn_mask=attn_mask)
        logits = model.lm_head(h[sel])
    else:  # a wrapped model (DDP, compile): full logits, then select
        logits = model(input_ids, attn_mask=attn_mask)[sel]
    tok_logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[sel][:, None]).squeeze(-1)
    n = labels.shape[0]
    total = torch.zeros(n, device=tok_logp.device, dtype=tok_logp.dtype).index_add(0, rows, tok_logp)
    count = sel.sum(-1)
    return total, count


def batch_logps(model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob, labelled tokens) per sequence of a collated pair batch (`align.pair_batches.collate_pairs`,
    packed or not), with no host sync: the labelled positions, their targets and sequences come
    from the collator (`target_index`, `targets`, `target_seq`, `seq_counts`); packed rows are
    document-masked (`doc_ids`); the output projection runs in chunks over labelled rows only."""
    doc = batch.get("doc_ids")
    mask = DocumentMask(doc) if doc is not None else None
    ids, pos, index = batch["input_ids"], batch.get("position_ids"), batch["target_index"]
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head"):
        h = model.hidden_states(ids, position_ids=pos, attn_mask=mask).flatten(0, 1).index_select(0, index)
        tok_logp = token_logprobs(h, model.lm_head, batch["targets"])
    else:  # a wrapped model (DDP, compile): full logits, then gather
        logits = model(ids, position_ids=pos, attn_mask=mask).flatten(0, 1).index_select(0, index)
        tok_logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, batch["targets"][:, None]).squeeze(-1)
    counts = batch["seq_counts"]
    total = torch.zeros(counts.shape[0], device=tok_logp.device, dtype=tok_logp.dtype)
    return total.index_add(0, batch["target_seq"], tok_logp), counts


def _logps(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    if "target_index" in batch:
        return batch_logps(model, batch)
    return completion_logps(model, batch["input_ids"], batch["labels"])


# ----------------------------------------------------------------------------- objective
class PreferenceObjective:
    """Engine objective for DPO / IPO / hinge / ORPO; count = pairs.

    A batch holds B pairs as 2B rows (chosen rows first, then rejected) or, packed, as B rows
    each holding chosen and rejected as two documents; either way chosen and rejected go through
    the policy in one forward pass. The reference log-probs come precomputed in the
    batch (`ref_logps`, from the on-disk cache) or from a live frozen `ref_model`."""

    unit_name = "pairs"

    def __init__(
        self, method: str, beta: float, label_smoothing: float = 0.0, ref_model: torch.nn.Module | None = None
    ):
        self.method = method
        self.fn = preference_loss(method, beta, label_smoothing)
        self.ref_model = ref_model

    def reference(self, batch: dict) -> torch.Tensor | None:
        if self.method not in REFERENCE_METHODS:
            return None
        if "ref_logps" in batch:
            return batch["ref_logps"]
        if self.ref_model is None:
            raise RuntimeError("preference objective: no reference log-probs in the batch and no ref_model")
        with torch.no_grad():
            return _logps(self.ref_model, batch)[0]

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, int, dict]:
        out, _ = self.pair_losses(model, batch)
        return out.losses.sum(), self.count(batch), reward_metric_tensors(out)

    def pair_losses(self, model, batch: dict) -> tuple[PrefLoss, torch.Tensor]:
        """Per-pair losses and the policy's summed log-probs [2B]."""
        logps, counts = _logps(model, batch)
        B = logps.shape[0] // 2
        ref = self.reference(batch)
        if ref is None:
            ref = torch.zeros_like(logps)
        mean = logps / counts.clamp(min=1)
        out = self.fn(
            logps[:B], logps[B:], ref[:B].to(logps.dtype), ref[B:].to(logps.dtype), mean[:B], mean[B:]
        )
        return out, logps

    def count(self, batch: dict) -> int:
        if "n_pairs" in batch:
            return batch["n_pairs"]
        return int(batch["input_ids"].shape[0] // 2)

    def tokens(self, batch: dict) -> int:
        """Processed (non-padding) tokens of the batch."""
        return batch["n_tokens"] if "n_tokens" in batch else int(batch["input_ids"].numel())


def preference_eval_metrics(
    pc: torch.Tensor,
    pr: torch.Tensor,
    nc: torch.Tensor,
    nr: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
    method: str,
    beta: float,
    label_smoothing: float = 0.0,
) -> dict[str, float]:
    """Held-out figures from per-pair summed log-probs (policy pc/pr over nc/nr tokens, reference rc/rr):

    * `accuracy`: the model's own preference, log pi(chosen) > log pi(rejected) (ties count half)
      -- defined for any model, so it is what "before" and "after" compare;
    * `accuracy_norm`: the same with per-token mean log-probs (length-normalised, ORPO's view);
    * `margin`: mean log pi(chosen) - log pi(rejected), in nats;
    * `reward_accuracy`, `reward_margin`: the DPO implicit reward beta*(log pi - log ref), i.e.
      how much training moved chosen above rejected relative to the reference (0.5 and 0 at the start);
    * `log_ratio_chosen`: mean per-token log pi - log ref over the chosen completions: how far
      the policy drifted on the data's answers (not a KL: it is negative when both answers lost
      likelihood, as DPO often does);
    * `loss`: the method's loss."""
    pc, pr, rc, rr = pc.double(), pr.double(), rc.double(), rr.double()
    nc, nr = nc.double().clamp(min=1), nr.double().clamp(min=1)
    out = preference_loss(method, beta, label_smoothing)(pc, pr, rc, rr, pc / nc, pr / nr)
    d = pc - pr
    h = (pc - rc) - (pr - rr)

    def acc(x):
        return float(((x > 0).double() + 0.5 * (x == 0).double()).mean())

    return {
        "loss": float(out.losses.mean()),
        "accuracy": acc(d),
        "accuracy_norm": acc(pc / nc - pr / nr),
        "margin": float(d.mean()),
        "reward_accuracy": acc(h),
        "reward_margin": float(beta * h.mean()),
        "log_ratio_chosen": float((pc - rc).sum() / nc.sum()),
    }
