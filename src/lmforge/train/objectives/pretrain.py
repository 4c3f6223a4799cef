"""Next-token cross-entropy over (input, target) token rows: pretraining and continued
pretraining. An lmforge `Transformer` computes the loss inside its forward (`targets=`), where
the output projection runs in chunks once the fp32 logits would pass 1 GiB (`model/output.py`).
A Mixture-of-Experts model adds its router losses (scaled so the engine's division by the token
count keeps them means) and reports expert load and drops."""

from __future__ import annotations

import torch

from ...model.transformer import Transformer
from ..modules import unwrap


def pretrain_objective():
    """Next-token cross-entropy over (x, y) batches; count = number of target tokens."""

    class _NextToken:
        def __call__(self, model, batch):
            x, y = batch
            core = unwrap(model)
            if isinstance(core, Transformer):  # the loss inside forward: chunked head when large
                loss = model(x, targets=y)
            else:  # any other causal LM returning logits
                logits = model(x)
                loss = torch.nn.functional.cross_entropy(
                    logits.float().view(-1, logits.size(-1)),
                    y.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
            n = (y != -100).sum()  # a 0-d device tensor: no read-back (the engine uses `count`)
            aux = core.moe_aux_loss() if hasattr(core, "moe_aux_loss") else None
            if aux is None:
                return loss, n, {}
            # the router losses are means; scale by n so the engine's division by n keeps them
            stats = core.moe_stats()
            metrics = {
                "moe_aux": aux.detach(),
                "moe_dropped_frac": sum(v for k, v in stats.items() if "dropped" in k)
                / max(core.cfg.n_layers, 1),
                "moe_load_max": max((v for k, v in stats.items() if "load_max" in k), default=0.0),
            }
            return loss + aux * n, n, metrics

        def count(self, batch):
            return int((batch[1] != -100).sum())

    return _NextToken()
