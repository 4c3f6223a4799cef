"""The one way to open a model for inference -- serving, chat, RAG embeddings and evaluation.

A model is named by a model folder, a run directory (its most fine-tuned model), or a base
model plus a LoRA adapter (merged into the weights, or kept as separate layers). Whatever runs
it, the model and its tokenizer are checked to belong together before anything is generated or
scored, because a checkpoint read with the wrong tokenizer gives confident garbage, not an error:
every tokenizer id must exist in the model's embedding table (a *larger* model vocabulary is
fine: vocabularies are often padded), and when both config.json and the tokenizer name a BOS/EOS
token they must agree.

`load_for_inference` returns what the serving engine needs (model, tokenizer, chat format,
display name); `load_model_and_tokenizer` what evaluation needs (model, tokenizer, with an
optional tokenizer from elsewhere); both go through `load_checked`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..chat import ChatFormat
from ..errors import CheckpointError, DataError
from ..model.hf import load_pretrained, read_hf_config
from ..model.transformer import Transformer
from ..peft import lora
from ..peft.base_ref import adapter_base_dir
from ..peft.prompt import PromptTuned
from ..runs import POLICY_STAGES
from ..tokenizer import LMTokenizer


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


def check_pair(model_cfg, tok: LMTokenizer, hf_config: dict | None = None, *, where: str = "model") -> None:
    """Refuse a tokenizer that does not belong to the model (see the module docstring)."""
    if tok.vocab_size > model_cfg.vocab_size:
        raise CheckpointError(
            f"{where}: the tokenizer has {tok.vocab_size:,} tokens but the model's embedding table has "
            f"{model_cfg.vocab_size:,} rows: they do not belong together. Use the tokenizer "
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


def load_checked(
    folder: Path, tokenizer: str | Path | None = None, *, device: str | torch.device = "cpu", dtype=None
):
    """(model in eval mode, tokenizer) from a model folder, checked to belong together; the
    tokenizer defaults to the folder's own tokenizer.json."""
    if tokenizer is None and not (folder / "tokenizer.json").is_file():
        raise CheckpointError(
            f"{folder}: no tokenizer.json beside the weights; copy the tokenizer files "
            f"(tokenizer.json, tokenizer_config.json) into the model folder, or pass --tokenizer PATH"
        )
    tok = LMTokenizer.load(Path(tokenizer) if tokenizer else folder)
    model = load_pretrained(folder, device=device, dtype=dtype)
    check_pair(model.cfg, tok, read_hf_config(folder), where=str(folder))
    return model.eval(), tok


def load_model_and_tokenizer(
    model_dir: str | Path,
    tokenizer: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype=None,
):
    """(model in eval mode, LMTokenizer) for evaluation: a model folder, a run directory or a
    LoRA adapter folder (loaded onto the base model its adapter_config.json names)."""
    if is_adapter_dir(model_dir):
        model, tok = load_checked(adapter_base_dir(model_dir), tokenizer, device=device, dtype=dtype)
        return apply_adapter(model, model_dir).eval(), tok
    return load_checked(resolve_model_dir(model_dir), tokenizer, device=device, dtype=dtype)


def is_adapter_dir(path: str | Path) -> bool:
    """A PEFT adapter folder (adapter_config.json, no config.json of a full model)."""
    p = Path(path)
    return (p / "adapter_config.json").is_file() and not (p / "config.json").is_file()


def load_for_inference(
    path: str | Path,
    *,
    adapter: str | Path | None = None,
    merge: bool = False,
    device: str = "cpu",
    dtype: str | None = None,
):
    """(model, tokenizer, chat format or None, display name). `path` may be an adapter folder:
    its base model is the one its adapter_config.json names (see `peft.base_ref`)."""
    if adapter is None and is_adapter_dir(path):
        path, adapter = adapter_base_dir(path), path
    folder = resolve_model_dir(path)
    model, tok = load_checked(folder, device=device, dtype=dtype)
    fmt = chat_format_for(folder, tok)
    name = folder.parent.name if folder.name in ("model", "merged") else folder.name
    if adapter is not None:
        model = apply_adapter(model, adapter, merge=merge)
        name = f"{name}+{Path(adapter).name}"
    return model.eval(), tok, fmt, name


def chat_format_for(folder: Path, tok) -> ChatFormat | None:
    try:
        return ChatFormat.from_dir(folder)
    except DataError:
        return None  # a plain LM without a chat template: completions only


def apply_adapter(model, adapter: str | Path, merge: bool = False):
    """Load a PEFT-format adapter folder onto `model`: LoRA (lmforge.peft.lora; `merge` folds it
    into the weights) or prompt tuning (the model wrapped in `PromptTuned`; the serving engine
    puts the virtual tokens before every prompt)."""
    adapter = Path(adapter)
    if not adapter.exists():
        raise CheckpointError(
            f"{adapter}: no such adapter folder (expected adapter_config.json + adapter_model.safetensors)"
        )
    if lora.read_adapter_config(adapter).get("peft_type") == "PROMPT_TUNING":
        if merge:
            raise CheckpointError(
                f"{adapter}: a prompt-tuning adapter has no weights to merge (its virtual tokens are "
                f"inputs); load it without merging"
            )
        if not isinstance(model, Transformer):
            raise CheckpointError(
                f"{adapter}: prompt tuning needs an lmforge-native model, not the generic path"
            )
        return PromptTuned.load_adapter(model, adapter)
    out = lora.load_adapter(model, adapter)
    model = out if out is not None and hasattr(out, "cfg") else model
    if merge:
        model = lora.merge_lora(model)
    return model
