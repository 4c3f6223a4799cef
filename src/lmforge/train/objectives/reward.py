"""Bradley-Terry over preference pairs for reward models: -log sigmoid(r_chosen - r_rejected
[- margin]), summed over pairs. Chosen and rejected rows share one forward pass (the collator
puts the B chosen rows first, then the B rejected ones)."""

from __future__ import annotations

import torch

from .preference import bradley_terry_loss


class RewardObjective:
    """Bradley-Terry over pairs; count = pairs. Chosen and rejected share one forward pass.
    Metrics stay 0-d device tensors (the engine reads them back once per step)."""

    unit_name = "pairs"

    def __init__(self, use_margin: bool = True):
        self.use_margin = use_margin

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, int, dict[str, float]]:
        r = model(batch["input_ids"], batch["lengths"])
        B = r.shape[0] // 2
        rc, rr = r[:B], r[B:]
        losses = bradley_terry_loss(rc, rr, batch["margin"].to(r.device) if self.use_margin else None)
        d = (rc - rr).detach()
        return (
            losses.sum(),
            B,
            {
                "accuracy": (d > 0).float().mean(),
                "margin": d.mean(),
                "rewards/chosen": rc.detach().mean(),
                "rewards/rejected": rr.detach().mean(),
            },
        )

    def count(self, batch: dict) -> int:
        return int(batch["input_ids"].shape[0] // 2)

    def tokens(self, batch: dict) -> int:
        """Processed (non-padding) tokens of the batch."""
        return batch["n_tokens"] if "n_tokens" in batch else int(batch["input_ids"].numel())
