"""Find and load a model for inference: a model folder, a run directory, or a base model plus a
LoRA adapter (merged into the weights, or kept as separate layers)."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..runs import POLICY_STAGES


def model_stages() -> list[str]:
    """Stages whose `model/` folder a run directory may hold, most fine-tuned first (the
    pipeline's policy stages in reverse order: rl, align, sft, cpt, pretrain)."""
    return list(reversed(POLICY_STAGES))


def resolve_model_dir(path: str | Path) -> Path:
    """`path` itself when it holds config.json; for a run directory, its most fine-tuned model."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"{p}: no such model folder; pass a folder with config.json + "
            f"model.safetensors (e.g. runs/tiny/pretrain/model) or a run directory"
        )
    if (p / "config.json").is_file():
        return p
    stages = model_stages()
    for stage in stages:
        for cand in (p / stage / "model", p / stage / "merged"):
            if (cand / "config.json").is_file():
                return cand
    if (p / "model" / "config.json").is_file():
        return p / "model"
    raise CheckpointError(
        f"{p}: neither a model folder (no config.json) nor a run directory with a "
        f"trained model (looked for {', '.join(s + '/model' for s in stages)})"
    )


def load_for_inference(
    path: str | Path,
    *,
    adapter: str | Path | None = None,
    merge: bool = False,
    device: str = "cpu",
    dtype: str | None = None,
):
    """(model, tokenizer, chat format or None, display name)."""
    from ..model.hf import load_pretrained
    from ..tokenizer import LMTokenizer

    folder = resolve_model_dir(path)
    model = load_pretrained(folder, device=device, dtype=dtype)
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(
            f"{folder}: no tokenizer.json beside the weights; copy the tokenizer files "
            f"(tokenizer.json, tokenizer_config.json) into the model folder"
        )
    tok = LMTokenizer.load(folder)
    if tok.vocab_size > model.cfg.vocab_size:
        raise CheckpointError(
            f"{folder}: tokenizer has {tok.vocab_size} tokens but the model only "
            f"{model.cfg.vocab_size} embeddings: tokenizer and weights do not belong together"
        )
    fmt = chat_format_for(folder, tok)
    name = folder.parent.name if folder.name in ("model", "merged") else folder.name
    if adapter is not None:
        model = apply_adapter(model, adapter, merge=merge)
        name = f"{name}+{Path(adapter).name}"
    return model.eval(), tok, fmt, name


def chat_format_for(folder: Path, tok):
    from ..chat import ChatFormat
    from ..errors import DataError

    try:
        return ChatFormat.from_dir(folder)
    except DataError:
        return None  # a plain LM without a chat template: completions only


def apply_adapter(model, adapter: str | Path, merge: bool = False):
    """Load a PEFT-format LoRA adapter folder onto `model` (via lmforge.peft.lora)."""
    adapter = Path(adapter)
    if not adapter.exists():
        raise CheckpointError(
            f"{adapter}: no such adapter folder (expected adapter_config.json + adapter_model.safetensors)"
        )
    try:
        from ..peft import lora
    except ImportError:
        raise CheckpointError(
            "LoRA adapters need lmforge.peft.lora, which this installation lacks; "
            "merge the adapter with `lmforge export --adapter` and serve the result"
        ) from None
    load = getattr(lora, "load_adapter", None)
    if load is None:
        raise CheckpointError("lmforge.peft.lora has no load_adapter(); cannot apply an adapter")
    out = load(model, adapter)
    model = out if out is not None and hasattr(out, "cfg") else model
    if merge:
        model = lora.merge_lora(model)
    return model
