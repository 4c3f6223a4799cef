"""Where an adapter's base model lives, written so that a run directory holds no absolute path.

A PEFT adapter names its base in `adapter_config.json` (`base_model_name_or_path`). An absolute
path there makes two identical runs in two directories write different files, and breaks when a
run directory is moved or copied to another machine. So when the base model is inside the same
run directory as the adapter (`runs/x/pretrain/model` for `runs/x/sft/adapter`), lmforge writes
it relative to the adapter folder (`../../pretrain/model`); a base outside the run directory (a
user's model folder) is written absolute, and a hub id as given.

lmforge's readers (`lmforge chat/serve/eval ADAPTER`, `lmforge merge`, `peft.merge`) resolve a
relative base against the adapter folder (`adapter_base`). PEFT itself resolves
`base_model_name_or_path` against the current directory, so with `peft` pass the base model
explicitly (`PeftModel.from_pretrained(base, adapter_dir)`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import CheckpointError


def base_model_ref(base: str | os.PathLike, adapter_dir: str | os.PathLike, root: str | os.PathLike) -> str:
    """What to write as `base_model_name_or_path` for an adapter saved in `adapter_dir`: the
    path of `base` relative to the adapter folder when both lie inside `root` (the run
    directory), else `base`'s absolute path."""
    base_abs, adapter_abs, root_abs = (Path(p).resolve() for p in (base, adapter_dir, root))
    if base_abs.is_relative_to(root_abs) and adapter_abs.is_relative_to(root_abs):
        return Path(os.path.relpath(base_abs, adapter_abs)).as_posix()
    return str(base_abs)


def adapter_base(adapter_dir: str | os.PathLike) -> Path | str | None:
    """The base model an adapter folder names: a folder (a relative path resolved against the
    adapter folder, as `base_model_ref` writes it), a hub id (a string) or None."""
    folder = Path(adapter_dir)
    f = folder / "adapter_config.json"
    try:
        ref = json.loads(f.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except FileNotFoundError:
        raise CheckpointError(
            f"{f}: not found; an adapter folder holds adapter_config.json and adapter_model.safetensors"
        ) from None
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{f}: not a valid adapter config ({e})") from None
    if ref is None or ref == "":
        return None
    if not isinstance(ref, str):
        raise CheckpointError(f"{f}: base_model_name_or_path must be a string, not {type(ref).__name__}")
    p = Path(ref)
    if p.is_absolute():
        return p
    local = folder / p
    if ref.startswith(("./", "../")) or local.exists():
        return Path(os.path.normpath(local))
    return ref  # a hub id


def adapter_base_dir(adapter_dir: str | os.PathLike) -> Path:
    """The local base model folder of an adapter, or a CheckpointError saying to pass one."""
    base = adapter_base(adapter_dir)
    if not isinstance(base, Path) or not (base / "config.json").is_file():
        what = (
            "names no base model"
            if base is None
            else f"names the base model {str(base)!r}, not a model folder here"
        )
        raise CheckpointError(
            f"{Path(adapter_dir) / 'adapter_config.json'}: {what}; pass the base model folder explicitly"
        )
    return base
