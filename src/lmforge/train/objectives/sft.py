"""Supervised fine-tuning on chat rows: cross-entropy summed over assistant targets only.

Rows come packed (several conversations per row, each a document the attention mask keeps apart:
`doc_ids`, see `model/attention.py`) or one conversation per row; the collator (`chat.py`) marks
every non-assistant position with `IGNORE` and precomputes on the host which positions have a
target, so the objective gathers them without a device read-back.
"""

from __future__ import annotations

import torch.nn.functional as F

from ...model.attention import DocumentMask
from ...model.output import linear_cross_entropy

IGNORE = -100  # label of positions without a loss (prompt, template, padding)


def document_mask(batch: dict) -> DocumentMask | None:
    """The attention mask description of a collated batch (None: plain causal rows)."""
    doc = batch.get("doc_ids")
    return DocumentMask(doc) if doc is not None else None


def _forward(model, batch):
    return model(batch["input_ids"], position_ids=batch.get("position_ids"), attn_mask=document_mask(batch))


class SFTObjective:
    """Cross-entropy summed over assistant targets; count = number of assistant targets.

    The output projection runs only at positions that have a target, gathered by the indices the
    collator computed on the host (no boolean indexing, so no device sync), and in chunks
    (`linear_cross_entropy`): in chat data most tokens are system/user/template tokens, and with
    a large vocabulary the [tokens, vocab] logits are the biggest activation of the step."""

    unit_name = "assistant_tokens"

    def __call__(self, model, batch):
        labels = batch["labels"]
        if hasattr(model, "hidden_states") and hasattr(model, "lm_head") and "target_index" in batch:
            h = model.hidden_states(
                batch["input_ids"], position_ids=batch.get("position_ids"), attn_mask=document_mask(batch)
            )
            h = h.flatten(0, 1).index_select(0, batch["target_index"])
            loss = linear_cross_entropy(h, model.lm_head, batch["targets"])
        else:
            logits = _forward(model, batch)
            loss = F.cross_entropy(
                logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
            )
        return loss, self.count(batch), {}

    def count(self, batch) -> int:
        if "n_targets" in batch:
            return batch["n_targets"]
        return int((batch["labels"] != IGNORE).sum())

    def tokens(self, batch) -> int:
        """Processed (non-padding) tokens of the batch."""
        if "n_tokens" in batch:
            return batch["n_tokens"]
        return int(batch["input_ids"].numel())
