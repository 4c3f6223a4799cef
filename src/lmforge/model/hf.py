"""Model folders in the Hugging Face layout: what lmforge writes and reads.

Every model lmforge saves is a folder that `transformers.AutoModelForCausalLM.from_pretrained`
opens as-is: `config.json` in the model's family (Llama, Qwen2 when q/k/v have biases, Mistral
with a sliding window, or the family it was imported from: Qwen3, Gemma, Gemma 2, Phi-3,
GPT-2), weights in `model.safetensors` (or shards plus `model.safetensors.index.json`) under
that family's names, and the tokenizer files (with the chat template) beside them.
Mixture-of-Experts models are written as Mixtral where the architecture matches exactly, else
in lmforge's own `lmforge_moe` layout (see `hf_moe.py`). Reading goes the other way, single file
or sharded. The per-family mapping (config keys, weight names) is in `families/`.

What is refused, with the reason named (never a silent approximation): other architectures,
activations a family does not use, RoPE scaling (Llama 3.1 "llama3", YaRN, LongRoPE), biases
where the family has none. Sliding windows (Mistral, Gemma 2, Phi-3) are computed exactly.

`import_hf` / `export_hf` are the `lmforge import` / `lmforge export` commands: import copies a
foreign checkpoint into an lmforge model folder (checking every tensor's name and shape, keeping
the tokenizer and its chat template); export writes an lmforge model in a chosen dtype and shard
size, and refuses an MoE model that `transformers` could not load, naming the feature that
stands in the way. Merging an adapter first is `peft.merge.export_merged` (the adapter layer
sits above the model layer).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..artifacts import verify_path
from ..errors import CheckpointError
from ..runs import atomic_path, atomic_write_json
from .config import ModelConfig
from .families import GENERIC, family_for_config, family_for_type, supported_types
from .generic import load_generic, transformers_causal_lm
from .hf_moe import LMFORGE_MOE, mixtral_blockers
from .resources import check_model_folder
from .transformer import Transformer

SUPPORTED = set(supported_types())
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name in ("auto", ""):
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise CheckpointError(
            f"dtype {name!r} not understood; use one of float32, bfloat16, float16"
        ) from None


def parse_size(s: str | int | None) -> int | None:
    """'5GB', '500MB', '50KB' or a byte count -> bytes (None = no sharding)."""
    if s is None or isinstance(s, int):
        return s
    t = s.strip().upper()
    for unit, mult in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * mult)
            except ValueError:
                break
    raise CheckpointError(f"shard size {s!r} not understood; write e.g. 5GB, 500MB")


# ----------------------------------------------------------------------------- config mapping
def to_hf_config(
    cfg: ModelConfig, *, bos_id: int | None = None, eos_id: int | None = None, dtype: str = "float32"
) -> dict:
    """config.json of `cfg` in its family's format (see `families/`); a generic-path model's
    own config.json, keeping its token ids where none are given."""
    out = family_for_config(cfg).to_hf(cfg)
    ids = {"bos_token_id": bos_id, "eos_token_id": eos_id}
    if cfg.hf_config is not None:
        ids = {k: v if v is not None else out.get(k) for k, v in ids.items()}
    return {**out, "torch_dtype": dtype, "dtype": dtype, **ids}


def is_generic(hf: dict) -> bool:
    """True when config.json's model_type has no native family but transformers has a causal LM
    for it: the model runs on the generic path (`model/generic.py`)."""
    mt = hf.get("model_type")
    return mt not in SUPPORTED and transformers_causal_lm(mt)


def from_hf_config(hf: dict, source: str = "config.json") -> ModelConfig:
    mt = hf.get("model_type")
    if mt not in SUPPORTED and not is_generic(hf):
        raise CheckpointError(
            f"{source}: model_type {mt!r} is not supported: lmforge has no native family for it "
            f"(native: {supported_types()}) and transformers has no causal LM for it (or is not installed)"
        )
    if mt not in SUPPORTED:
        return GENERIC.from_hf(hf, source)
    return family_for_type(mt, source).from_hf(hf, source)


def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied (shared-storage) duplicates removed, contiguous, on CPU."""
    out, seen = {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = name
        out[name] = t.detach().to("cpu").contiguous()
    return out


def read_hf_config(folder: str | Path) -> dict:
    cfg_file = Path(folder) / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(
            f"{cfg_file}: not found; expected a model folder with config.json and "
            f"model.safetensors (or sharded model-*.safetensors + index)"
        )
    verify_path(folder)  # a model folder a stage wrote: unchanged since (size + hash)
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None


# ----------------------------------------------------------------------------- writing
def _shard(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [state]
    shards: list[dict[str, torch.Tensor]] = []
    cur: dict[str, torch.Tensor] = {}
    size = 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += n
    if cur:
        shards.append(cur)
    return shards


def write_weights(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int | None = None) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when over the shard size."""
    shards = _shard(state, max_shard_bytes)
    for stale in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        if stale.exists():
            stale.unlink()
    if len(shards) == 1:
        with atomic_path(out / "model.safetensors") as tmp:
            save_file(shards[0], str(tmp), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, sh in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with atomic_path(out / name) as tmp:
            save_file(sh, str(tmp), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in sh})
    total = sum(v.numel() * v.element_size() for v in state.values())
    atomic_write_json(
        out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )
    return names


def copy_tokenizer_files(src: str | Path, out: str | Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.exists() and f.resolve() != (Path(out) / name).resolve():
            with atomic_path(Path(out) / name) as tmp:
                shutil.copyfile(f, tmp)
            copied.append(name)
    return copied


def save_pretrained(
    model: Transformer,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int | None = None,
) -> Path:
    """Write `model` (and optionally copy tokenizer files) as a HF-loadable folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = model_state_for_saving(model)
    tdt = parse_dtype(dtype)
    if tdt is not None:
        state = {k: (v.to(tdt) if v.is_floating_point() else v) for k, v in state.items()}
    dt = str(next(iter(state.values())).dtype).removeprefix("torch.")
    hf_cfg = to_hf_config(model.cfg, bos_id=bos_id, eos_id=eos_id, dtype=dt)
    state = family_for_config(model.cfg).keys_out(state, model.cfg)
    write_weights(state, out, parse_size(max_shard_size))
    atomic_write_json(out / "config.json", hf_cfg)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    return out


# ----------------------------------------------------------------------------- reading
def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, checking a sharded index for missing shards."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        names = sorted(set(weight_map.values()))
        # a downloaded index names the shard files: they must be plain file names in this folder
        escaping = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")]
        if escaping:
            raise CheckpointError(
                f"{index}: shard name {escaping[0]!r} is not a file name inside {folder}; "
                f"refusing to read outside the model folder"
            )
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise CheckpointError(
                f"{folder}: {len(missing)} of {len(names)} shards listed in {index.name} "
                f"are missing ({', '.join(missing[:3])}); copy the complete checkpoint"
            )
        return [folder / n for n in names]
    others = sorted(folder.glob("*.safetensors"))
    if len(others) == 1:
        return others
    hint = " (found .bin/.pth files: convert them to safetensors first)" if list(folder.glob("*.bin")) else ""
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")


def _read_weights(folder: Path, cfg: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a folder under lmforge's names (converted by the model's family)."""
    state = {}
    for f in weight_files(folder):
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: cannot read weights ({e})") from None
    if cfg is not None:
        state = dict(family_for_config(cfg).keys_in(state.items(), cfg, str(folder)))
    return state


_ST_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def iter_weights(folder: Path):
    """(name, tensor) one at a time under lmforge's names, so a caller can convert (e.g.
    quantise) without holding the whole checkpoint in memory. Reads each tensor's bytes with
    plain file reads rather than a memory map, so pages of tensors already consumed do not stay
    resident in this process. A Mixtral's per-expert tensors are stacked one layer at a time."""
    folder = Path(folder)
    raw = _iter_raw_weights(folder)
    if not (folder / "config.json").exists():
        return raw
    cfg = from_hf_config(read_hf_config(folder), str(folder / "config.json"))
    return family_for_config(cfg).keys_in(raw, cfg, str(folder))


def _iter_raw_weights(folder: Path):
    for f in weight_files(folder):
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
                header.pop("__metadata__", None)
                base = 8 + n
                for k, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                    dtype = _ST_DTYPES.get(info["dtype"])
                    if dtype is None:
                        raise ValueError(f"tensor {k}: dtype {info['dtype']} not supported")
                    b, e = info["data_offsets"]
                    fh.seek(base + b)
                    buf = bytearray(e - b)
                    if fh.readinto(buf) != e - b:
                        raise ValueError(f"tensor {k}: file truncated")
                    t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
                    yield k, t.reshape(info["shape"])
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{f}: cannot read weights ({e})") from None


def check_state(
    folder, state_shapes: dict[str, tuple], own: dict[str, torch.Tensor], cfg: ModelConfig
) -> None:
    missing = [k for k in own if k not in state_shapes and not (k == "lm_head.weight" and cfg.tie_embeddings)]
    unexpected = [k for k in state_shapes if k not in own and "rotary_emb" not in k]
    if missing or unexpected:
        raise CheckpointError(
            f"{folder}: weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for k, shape in state_shapes.items():
        if k in own and tuple(own[k].shape) != tuple(shape):
            raise CheckpointError(
                f"{folder}: {k} has shape {tuple(shape)}, config.json implies {tuple(own[k].shape)}"
            )


def empty_model(cfg: ModelConfig, folder: Path | None = None) -> Transformer:
    """The model's structure on the meta device, after checking that what `cfg` sizes (and,
    given the `folder`, its weight files) is plausible and fits (`model.resources`)."""
    weight_bytes = sum(f.stat().st_size for f in weight_files(folder)) if folder is not None else None
    check_model_folder(cfg, weight_bytes, str(Path(folder or ".") / "config.json"))
    with torch.device("meta"):
        return Transformer(cfg)


def finish_model(model: Transformer, device) -> Transformer:
    """Re-tie embeddings and rebuild the (non-persistent) RoPE tables after a meta-device load."""
    cfg = model.cfg
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    rotary = type(model.model.rotary)
    model.model.rotary = rotary(cfg.head_dim, cfg.rope_theta, cfg.max_seq_len, cfg.rope_linear_factor).to(
        device
    )
    if cfg.rope_theta_local is not None:
        model.model.rotary_local = rotary(cfg.head_dim, cfg.rope_theta_local, cfg.max_seq_len).to(device)
    return model


def load_pretrained(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> Transformer:
    """An lmforge or HF model folder (any supported family) -> Transformer in eval mode; a
    model_type without a native family that transformers can load -> `GenericCausalLM` (same
    interface; one `GenericPathWarning` line says so). `dtype` None keeps float32 (training
    precision); pass bfloat16 to halve memory."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    cfg = from_hf_config(hf, str(folder / "config.json"))
    dtype = parse_dtype(dtype)
    if cfg.hf_config is not None:  # the generic path: typed as the Transformer it stands in for
        return load_generic(folder, hf, device, dtype)  # type: ignore[return-value]
    model = empty_model(cfg, folder)
    state = _read_weights(folder, cfg)
    own = model.state_dict()
    check_state(folder, {k: v.shape for k, v in state.items()}, own, cfg)
    if dtype is not None:
        model = model.to(dtype)
    model = model.to_empty(device=device)
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return finish_model(model, device).eval()


# ----------------------------------------------------------------------------- import / export
def import_hf(
    src: str | Path, out: str | Path, *, dtype: str | None = None, max_shard_size: str | int | None = None
) -> dict:
    """Copy a Hugging Face checkpoint folder (any supported family) into an lmforge model folder.

    Every tensor is checked against config.json (name and shape) and the model is built, so a
    folder that imports is one lmforge can train. Returns a small report."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a folder; pass the folder holding config.json and *.safetensors")
    hf = read_hf_config(src)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_pretrained(src, dtype=dtype)
    notes = [str(w.message) for w in caught]
    tok = (
        json.loads((src / "tokenizer_config.json").read_text())
        if (src / "tokenizer_config.json").exists()
        else {}
    )
    save_pretrained(
        model,
        out,
        tokenizer_dir=src,
        bos_id=hf.get("bos_token_id"),
        eos_id=hf.get("eos_token_id"),
        max_shard_size=max_shard_size,
    )
    if not (src / "tokenizer.json").exists():
        notes.append("no tokenizer.json in the source folder: copy one in before fine-tuning")
    has_template = bool(tok.get("chat_template")) or (src / "chat_template.jinja").exists()
    return {
        "source": str(src),
        "out": str(out),
        "model_type": hf.get("model_type"),
        "params": model.num_params(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "chat_template": has_template,
        "notes": notes,
    }


def export_hf(
    model_dir: str | Path,
    out: str | Path,
    *,
    model: Transformer | None = None,
    dtype: str | None = None,
    max_shard_size: str | int | None = "5GB",
    merged_adapter: str | None = None,
) -> dict:
    """Write an lmforge model folder for `transformers`. `model` (e.g. the folder's model with
    an adapter merged in) replaces the weights read from `model_dir`; its config, tokenizer and
    token ids still come from `model_dir`."""
    model_dir, out = Path(model_dir), Path(out)
    model = model if model is not None else load_pretrained(model_dir)
    blockers = mixtral_blockers(model.cfg) if model.cfg.n_experts else []
    if blockers:
        raise CheckpointError(
            f"{model_dir}: this Mixture-of-Experts model has no transformers architecture that computes "
            f"the same function, so it cannot be exported: {'; '.join(blockers)}. Only softmax top-k "
            f"routing with renormalised weights, dropless, no shared expert and no q/k/v bias maps to "
            f"Mixtral. lmforge itself loads the folder as it is (model_type {LMFORGE_MOE})."
        )
    hf = read_hf_config(model_dir)
    save_pretrained(
        model,
        out,
        tokenizer_dir=model_dir,
        bos_id=hf.get("bos_token_id"),
        eos_id=hf.get("eos_token_id"),
        dtype=dtype,
        max_shard_size=max_shard_size,
    )
    files = sorted(p.name for p in out.iterdir())
    return {
        "out": str(out),
        "params": model.num_params(),
        "merged_adapter": merged_adapter,
        "files": files,
    }
