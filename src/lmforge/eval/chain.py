"""The model chain: every model a run produced, scored on the same held-out text.

A run's summary used to show the final model's bits-per-byte only, so a pipeline whose final
model (2.19 bits/byte on the default CPU run) was worse than its own pretrained model (1.79)
looked like a plain result: nothing said which stage cost what. Scoring each stage's model
(pretrain, cpt, sft, align, rl) on the *same* validation tokens, with the same windows, gives a
table where the differences are the stages' effects on held-out language modelling, and the
per-stage delta (bits/byte against the model the stage started from, the previous row) is
what to read. Post-training is expected to cost a little bits/byte on raw text; a large rise is
forgetting (or reward hacking, for the RL stages) and deserves a look at the samples.

Where the run has an SFT stage, the eval stage also scores each model's assistant loss on the SFT
stage's held-out conversations (the same examples for every model): the chat-side view of the
same chain, where SFT should lower the loss and alignment should not raise it much.

The caller lists the models (the eval stage finds them in the run directory); the scoring
itself is `evaluate_shard`, as for the stage's own headline figure.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..model.hf import load_pretrained
from .perplexity import evaluate_shard


def score_chain(
    models: list[tuple[str, Path]],
    shard,
    token_bytes: np.ndarray,
    *,
    vocab_size: int,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    max_tokens: int,
    extra: Callable[[torch.nn.Module], dict[str, float]] | None = None,
) -> list[dict]:
    """One row per (stage, model folder), in the given order: bpb, loss and tokens on the same
    validation windows, the delta to the previous scored row and to the first. A model whose
    vocabulary does not match the shards (or whose context is shorter than `seq_len`) gets a
    row with `skipped` saying why instead of a number. `extra(model)` adds figures of the
    caller's (the eval stage: the held-out chat prompts' assistant loss), with their deltas too."""
    rows: list[dict] = []
    for stage, folder in models:
        row: dict = {"stage": stage, "model": str(folder)}
        model = load_pretrained(folder, device=device)
        if model.cfg.vocab_size < vocab_size:
            row["skipped"] = f"vocabulary {model.cfg.vocab_size} < the shards' {vocab_size}"
        else:
            n = min(seq_len, model.cfg.max_seq_len)
            with torch.no_grad():
                res = evaluate_shard(
                    model,
                    shard,
                    token_bytes,
                    seq_len=n,
                    batch_size=batch_size,
                    device=device,
                    max_tokens=max_tokens,
                )
            row.update({k: res.get(k) for k in ("bpb", "loss", "tokens")})
            row["seq_len"] = n
            if extra is not None:
                row.update(extra(model))
        del model
        rows.append(row)
    scored = [r for r in rows if r.get("bpb") is not None]
    for prev, r in zip([None, *scored], scored):
        r["delta_bpb"] = None if prev is None else r["bpb"] - prev["bpb"]
        r["delta_bpb_vs_first"] = r["bpb"] - scored[0]["bpb"]
        if (
            prev is not None
            and r.get("assistant_loss") is not None
            and prev.get("assistant_loss") is not None
        ):
            r["delta_assistant_loss"] = r["assistant_loss"] - prev["assistant_loss"]
    return rows


def chain_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """Header and rows for the report card."""
    chat = any(r.get("assistant_loss") is not None for r in rows)
    header = ["stage", "bits/byte", "delta vs previous", "delta vs first", "loss (nats/token)", "tokens"]
    if chat:
        header += ["chat assistant loss", "delta vs previous"]
    out = []
    for r in rows:
        if r.get("skipped"):
            out.append([r["stage"], f"skipped: {r['skipped']}"] + [None] * (len(header) - 2))
            continue
        d = r.get("delta_bpb")
        row = [
            r["stage"],
            r["bpb"],
            None if d is None else f"{d:+.4f}",
            f"{r['delta_bpb_vs_first']:+.4f}",
            r.get("loss"),
            r.get("tokens"),
        ]
        if chat:
            da = r.get("delta_assistant_loss")
            row += [r.get("assistant_loss"), None if da is None else f"{da:+.4f}"]
        out.append(row)
    return header, out
