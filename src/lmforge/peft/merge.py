"""Base model + LoRA adapter -> one model folder `transformers` loads (`lmforge merge`, and
`lmforge export --adapter`).

This sits in `peft/` rather than beside the exporter in `model/hf.py` because the model layer
knows nothing about adapters: here the base is loaded, the adapter applied and folded into the
weights (`merge_lora`), and the plain model handed to `model.hf.export_hf` to be written in its
family's format.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

from ..errors import CheckpointError
from ..model.hf import export_hf, load_pretrained
from ..model.transformer import Transformer
from .base_ref import adapter_base_dir
from .lora import load_adapter, merge_lora, read_adapter_config


def export_merged(
    base_dir: str | Path | None,
    adapter: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    max_shard_size: str | int | None = "5GB",
) -> dict:
    kind = read_adapter_config(adapter).get("peft_type")
    if kind != "LORA":
        raise CheckpointError(
            f"{adapter}: a {kind} adapter cannot be merged into weights (only LoRA can); "
            f"load it alongside the base model instead"
        )
    if base_dir is None:  # the base the adapter names (relative to the adapter folder)
        base_dir = adapter_base_dir(adapter)
    if not Path(base_dir, "config.json").exists():
        raise CheckpointError(f"{base_dir}: not a model folder (no config.json)")
    model = load_pretrained(base_dir)
    load_adapter(model, adapter)
    return export_hf(
        base_dir,
        out,
        model=cast(Transformer, merge_lora(model)),
        dtype=dtype,
        max_shard_size=max_shard_size,
        merged_adapter=str(adapter),
    )
