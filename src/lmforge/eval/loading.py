"""Open a model folder and its tokenizer for evaluation, refusing pairs that do not belong together.

A checkpoint scored with the wrong tokenizer gives confident garbage, not an error, so the pair
is checked before any scoring: every tokenizer id must exist in the model's embedding table
(a model vocabulary *larger* than the tokenizer's is fine: vocabularies are often padded), and
when both the model's config.json and the tokenizer name a BOS/EOS token they must agree.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from ..model.hf import load_pretrained, read_hf_config
from ..tokenizer import LMTokenizer


def check_pair(model_cfg, tok: LMTokenizer, hf_config: dict | None = None, *, where: str = "model") -> None:
    if tok.vocab_size > model_cfg.vocab_size:
        raise CheckpointError(
            f"{where}: the tokenizer has {tok.vocab_size:,} tokens but the model's embedding table has "
            f"{model_cfg.vocab_size:,} rows: they do not belong together. Evaluate with the tokenizer "
            f"saved next to the model (its folder's tokenizer.json) or pass the right --tokenizer"
        )
    hf = hf_config or {}
    for role, tok_id in (("bos", tok.bos_id), ("eos", tok.eos_id)):
        cfg_id = hf.get(f"{role}_token_id")
        if isinstance(cfg_id, int) and tok_id is not None and cfg_id != tok_id:
            raise CheckpointError(
                f"{where}: config.json says {role}_token_id={cfg_id} but the tokenizer's {role} token has id "
                f"{tok_id}: the tokenizer does not match this checkpoint; use the one saved with the model"
            )


def load_model_and_tokenizer(
    model_dir: str | Path,
    tokenizer: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype=None,
):
    """(model in eval mode, LMTokenizer) from a model folder; the tokenizer defaults to the
    folder's own tokenizer.json."""
    model_dir = Path(model_dir)
    tok_path = Path(tokenizer) if tokenizer else model_dir
    if tokenizer is None and not (model_dir / "tokenizer.json").exists():
        raise CheckpointError(f"{model_dir}: no tokenizer.json next to the model; pass --tokenizer PATH")
    tok = LMTokenizer.load(tok_path)
    hf = read_hf_config(model_dir)
    model = load_pretrained(model_dir, device=device, dtype=dtype)
    check_pair(model.cfg, tok, hf, where=str(model_dir))
    return model, tok
