"""Model folders in the Hugging Face layout: what lmforge writes and reads.

Every model lmforge saves is a folder that `transformers.AutoModelForCausalLM.from_pretrained`
opens as-is: `config.json` (LlamaConfig, or Qwen2Config when q/k/v have biases), weights in
`model.safetensors` with HF parameter names (lmforge's module names are the same, so no key
mapping is needed), and the tokenizer files beside them. Reading goes the other way and also
accepts checkpoints made by other tools in the Llama family (Llama 2/3, Mistral, Qwen2), single
file or sharded (`model.safetensors.index.json`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..runs import atomic_path, atomic_write_json
from .config import ModelConfig
from .transformer import Transformer

SUPPORTED = {"llama", "mistral", "qwen2"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def to_hf_config(cfg: ModelConfig, *, bos_id: int | None = None, eos_id: int | None = None,
                 dtype: str = "float32") -> dict:
    model_type = "qwen2" if cfg.qkv_bias else "llama"
    out = {
        "architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ff_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
        "torch_dtype": dtype,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    return out


def from_hf_config(hf: dict, source: str = "config.json") -> ModelConfig:
    mt = hf.get("model_type")
    if mt not in SUPPORTED:
        raise CheckpointError(f"{source}: model_type {mt!r} is not supported (supported: {sorted(SUPPORTED)})")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} not supported (need silu)")
    rope_scaling = hf.get("rope_scaling")
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
        raise CheckpointError(f"{source}: rope_scaling {rope_scaling} is not supported yet")
    if mt == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise CheckpointError(f"{source}: llama with attention_bias/mlp_bias is not supported")
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // h):
        raise CheckpointError(f"{source}: head_dim {hf['head_dim']} != hidden_size/heads is not supported")
    rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=h,
        n_kv_heads=hf.get("num_key_value_heads") or h, d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=rope_theta,
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=(mt == "qwen2"), init_std=hf.get("initializer_range", 0.02),
    )


def save_pretrained(model: Transformer, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                    bos_id: int | None = None, eos_id: int | None = None) -> Path:
    """Write `model` (and optionally copy tokenizer files) as a HF-loadable folder."""
    from ..train.checkpoint import model_state_for_saving

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = model_state_for_saving(model)
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_json(out / "config.json", to_hf_config(model.cfg, bos_id=bos_id, eos_id=eos_id, dtype=dtype))
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.exists():
                with atomic_path(out / name) as tmp:
                    shutil.copyfile(src, tmp)
    return out


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    try:
        if single.exists():
            return load_file(str(single))
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            state = {}
            for shard in sorted(set(weight_map.values())):
                f = folder / shard
                if not f.exists():
                    raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
                state.update(load_file(str(f)))
            return state
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder}: cannot read weights ({e})") from None
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def load_pretrained(folder: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> Transformer:
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{cfg_file}: not found; expected a model folder with config.json and "
                              f"model.safetensors")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None
    cfg = from_hf_config(hf, str(cfg_file))
    state = _read_weights(folder)
    with torch.device("meta"):
        model = Transformer(cfg)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not (k == "lm_head.weight" and cfg.tie_embeddings)]
    unexpected = [k for k in state if k not in own and "rotary_emb" not in k]
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not match config.json (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{folder}: {k} has shape {tuple(v.shape)}, config.json implies "
                                  f"{tuple(own[k].shape)}")
    model = model.to_empty(device=device)
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary = model.model.rotary.__class__(cfg.head_dim, cfg.rope_theta, cfg.max_seq_len).to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
