"""LoRA (and DoRA) adapters on lmforge's Transformer, saved in PEFT's format.

A target linear layer y = W x + b becomes y = W x + b + s * B(A(dropout(x))), with A [r, in]
(Kaiming-uniform init) and B [out, r] (zeros, so training starts at the base model), and scale
s = alpha / r, or alpha / sqrt(r) with rsLoRA (rank-stabilised: the update's size stops
shrinking as r grows). DoRA (weight-decomposed LoRA) also learns a per-output-row magnitude m:
y = m / ||W + s B A||_row * (W + s B A) x + b, the norm detached as in the paper (sec. 4.3).

Why this shape:
* Module names follow PEFT exactly (`q_proj.base_layer`, `q_proj.lora_A`, `q_proj.lora_B`,
  `q_proj.lora_magnitude_vector`), and lmforge's trunk has HF Llama names, so the saved
  `adapter_model.safetensors` keys (`base_model.model.model.layers.0.self_attn.q_proj.lora_A
  .weight`) are what `peft.PeftModel.from_pretrained` expects on the exported HF model (tested:
  same logits).
* Targets are chosen by name like PEFT: a list matches module-name suffixes (`["q_proj",
  "v_proj"]`), a string is a regex that must match the whole module name.
* `merge` folds the update into W (exactly reversible by `unmerge`, DoRA included); `merge_lora`
  returns a plain Transformer for export. The base layer may be a 4-bit `NF4Linear` (QLoRA):
  then merging dequantises.
* Loading an adapter checks every tensor's name and shape against the model and names the
  first mismatch (an adapter trained for a different base model fails loudly).
* Mixture-of-Experts: `w1`/`w3` (gate/up) and `w2` (down) target the stacked expert tensors,
  one low-rank pair per expert (`lora_experts.py`, saved as PEFT `target_parameters`). When the
  targets leave most of the model's weights untouched (a Mixtral with attention-only targets)
  `apply_lora` warns and says which names would adapt the rest.
* A generic-path model (`model/generic.py`): default targets = every linear layer but the head
  (PEFT's "all-linear"); adapter keys are the names `peft` uses on the `transformers` model.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, ConfigError
from ..model.config import ModelConfig
from ..model.families import family_for_config
from ..model.moe import Experts
from ..runs import atomic_path, atomic_write_json
from .lora_experts import (
    EXPERT_TARGETS,
    LoraExperts,
    expert_params,
    is_experts,
    is_linear,
    stacked_shape,
    warn_untouched,
    weight_count,
)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model."


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1, description="rank")
    alpha: float = Field(16.0, gt=0, description="scale = alpha / r (alpha / sqrt(r) with use_rslora)")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = Field(
        default_factory=lambda: list(ALL_LINEAR),
        description="module-name suffixes, or one regex matching whole names",
    )
    use_rslora: bool = False
    use_dora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


BASE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_base_dtype(name: str, device: torch.device) -> str:
    """The dtype of a frozen base (LoRA, prompt tuning): `auto` is bfloat16 on a CUDA device that
    has it -- the base gets no gradient and no optimizer state, so fp32 only doubles its memory
    and halves matmul speed there -- and float32 elsewhere (CPU bf16 matmuls are emulated)."""
    if name not in BASE_DTYPES:
        raise ConfigError(f"base_dtype={name!r}: use one of {', '.join(BASE_DTYPES)}")
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def _base_weight(base: nn.Module) -> torch.Tensor:
    dequantize = getattr(base, "dequantize", None)  # a 4-bit NF4Linear
    return cast(torch.Tensor, dequantize() if dequantize is not None else base.weight)


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module, s: LoraSettings):
        super().__init__()
        self.base_layer: Any = base  # nn.Linear or a 4-bit NF4Linear
        self.in_features = cast(int, base.in_features)
        self.out_features = cast(int, base.out_features)
        self.r, self.scaling, self.use_dora = s.r, s.scale, s.use_dora
        dev = next(iter([*base.parameters(), *base.buffers()])).device
        self.lora_A = nn.Linear(self.in_features, s.r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(s.r, self.out_features, bias=False, device=dev, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(s.dropout) if s.dropout > 0 else nn.Identity()
        if s.use_dora:
            with torch.no_grad():
                m = _base_weight(base).float().norm(dim=1)
            self.lora_magnitude_vector = nn.Parameter(m)
        self.merged = False
        self._dora_norm: torch.Tensor | None = None

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        xa = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        if not self.use_dora:
            # scale the rank-r activation, not the wide output; add in place (a linear layer's
            # output is not saved for its backward, so autograd allows it)
            delta = self.lora_B(self.lora_A(xa) * self.scaling)
            return out.add_(delta.to(out.dtype))
        delta = self.lora_B(self.lora_A(xa)) * self.scaling
        w = _base_weight(self.base_layer)
        norm = (w.float() + self.delta_weight()).norm(dim=1).detach()
        mag = self.lora_magnitude_vector / norm
        bias = getattr(self.base_layer, "bias", None)
        plain = out - bias if bias is not None else out
        y = plain.float() * mag + delta * mag
        if bias is not None:
            y = y + bias.float()
        return y.to(out.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        w = _base_weight(self.base_layer).float()
        merged = w + self.delta_weight()
        if self.use_dora:
            norm = merged.norm(dim=1)
            merged = merged * (self.lora_magnitude_vector / norm)[:, None]
        return merged

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if not isinstance(self.base_layer, nn.Linear):
            raise ConfigError(
                "cannot merge in place into a quantised base layer; use merge_lora(model) to get a "
                "dequantised merged model"
            )
        w = self.base_layer.weight
        if self.use_dora:
            self._dora_norm = (w.float() + self.delta_weight()).norm(dim=1)
        w.copy_(self.merged_weight().to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        cur = w.float()
        if self.use_dora:
            assert self._dora_norm is not None  # set by merge()
            cur = cur * (self._dora_norm / self.lora_magnitude_vector)[:, None]
        w.copy_((cur - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:.4g}, dora={self.use_dora}"


# ----------------------------------------------------------------------------- applying
def match_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    names = []
    for name, m in model.named_modules():
        if not is_linear(m) or ".lora_" in name or name.endswith(("lora_A", "lora_B")):
            continue
        if ".experts." in name:  # 4-bit experts' per-expert matrices: adapted through w1/w2/w3
            continue
        if isinstance(targets, str):
            ok = re.fullmatch(targets, name) is not None
        else:
            ok = any(name == t or name.endswith("." + t) for t in targets)
        if ok:
            names.append(name)
    if not names:
        avail = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m)})
        raise ConfigError(
            f"lora.target_modules {targets!r} matched no linear layer; names available: {avail}"
        )
    return names


def generic_targets(model: nn.Module) -> list[str]:
    """Every linear layer in the trunk: not the LM head, nor a reward model's `score` (top level)."""
    head = cast(Any, model).hf.get_output_embeddings()
    return [n for n, m in model.named_modules() if is_linear(m) and "." in n and m is not head]


def _split_targets(model: nn.Module, targets: list[str] | str) -> tuple[list[str] | str | None, list[str]]:
    """(linear-layer targets or None, stacked expert tensors to adapt)."""
    if isinstance(targets, str) or not any(is_experts(m) for m in model.modules()):
        return targets, []
    linear = [t for t in targets if t not in EXPERT_TARGETS]
    return (linear or None), expert_params(list(targets))


def apply_lora(model: nn.Module, s: LoraSettings) -> list[str]:
    """Freeze `model` and wrap the target linears (and expert tensors) with LoRA; returns the
    wrapped module names."""
    for p in model.parameters():
        p.requires_grad_(False)
    total = weight_count(model)
    linear, experts = _split_targets(model, s.target_modules)
    if experts and (s.dropout > 0 or s.use_dora):
        raise ConfigError(
            "lora: dropout and DoRA are not available on expert weights (w1/w2/w3; PEFT's "
            "parameter LoRA has neither); set lora.dropout: 0 and lora.use_dora: false"
        )
    if getattr(model, "generic", False) and linear == ALL_LINEAR:
        linear = generic_targets(model)
    names = match_targets(model, linear) if linear is not None else []
    adapted = 0
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        adapted += base.in_features * base.out_features
        setattr(parent, child, LoraLinear(base, s))
    if experts:
        for name, m in [(n, m) for n, m in model.named_modules() if is_experts(m)]:
            wrapped = LoraExperts(m, experts, s.r, s.scale)
            adapted += sum(math.prod(stacked_shape(m, p)) for p in experts)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, wrapped)
            names.append(name)
    warn_untouched(model, adapted, total)
    model.lora_settings = s  # type: ignore[assignment]  # torch types Module.__setattr__ as Tensor | Module
    return names


def lora_modules(model: nn.Module) -> Iterable[tuple[str, LoraLinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear))


def expert_lora_modules(model: nn.Module) -> Iterable[tuple[str, LoraExperts]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoraExperts))


def set_merged(model: nn.Module, merged: bool) -> None:
    for _, m in lora_modules(model):
        m.merge() if merged else m.unmerge()


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by a plain nn.Linear holding the merged weight (dequantised for a
    4-bit base), in the base weight's float dtype; the result is a plain Transformer."""
    for name, m in list(lora_modules(model)):
        base = m.base_layer
        bias = getattr(base, "bias", None)
        w = m.merged_weight() if not m.merged else _base_weight(base).float()
        dt = getattr(base, "compute_dtype", None) or base.weight.dtype
        lin = nn.Linear(m.in_features, m.out_features, bias=bias is not None, device=w.device, dtype=dt)
        with torch.no_grad():
            lin.weight.copy_(w.to(dt))
            if bias is not None:
                lin.bias.copy_(bias.to(dt))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)
    for name, lx in list(expert_lora_modules(model)):
        gu, down = lx.merged_tensor("gate_up_proj"), lx.merged_tensor("down_proj")
        dense = Experts(gu.shape[0], gu.shape[2], down.shape[2]).to(gu.device)
        with torch.no_grad():
            dt = _experts_dtype(lx.base_layer)
            dense.gate_up_proj.data = gu.to(dt)
            dense.down_proj.data = down.to(dt)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, dense)
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model


def _experts_dtype(base: nn.Module) -> torch.dtype:
    dt: torch.dtype = getattr(base, "compute_dtype", None) or getattr(base, "gate_up_proj").dtype  # noqa: B009
    return dt


# ----------------------------------------------------------------------------- PEFT format
def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, lx in expert_lora_modules(model):
        for k, v in lx.peft_tensors().items():
            out[f"{PREFIX}{name}.{k}"] = v.detach().cpu().contiguous()
    for name, m in lora_modules(model):
        out[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        out[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()
        if m.use_dora:
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = m.lora_magnitude_vector.detach().cpu().contiguous()
    return out


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None = None) -> Path:
    """`adapter_config.json` + `adapter_model.safetensors`, loadable by `peft.PeftModel`."""
    s: LoraSettings | None = getattr(model, "lora_settings", None)
    if s is None:
        raise ConfigError("this model has no LoRA adapter to save (apply_lora first)")
    if any(m.merged for _, m in lora_modules(model)):
        raise ConfigError("unmerge the LoRA weights before saving the adapter")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = sorted({n.rsplit(".", 1)[-1] for n, _ in lora_modules(model)})
    params = next((m.params for _, m in expert_lora_modules(model)), [])
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": s.r,
        "lora_alpha": s.alpha,
        "lora_dropout": s.dropout,
        "use_rslora": s.use_rslora,
        "use_dora": s.use_dora,
        "target_modules": s.target_modules if isinstance(s.target_modules, str) else targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "library": "lmforge",
        **({"target_parameters": [f"mlp.experts.{p}" for p in params]} if params else {}),
    }
    state = lora_state_dict(model)
    mcfg = getattr(model, "cfg", None)
    family = family_for_config(mcfg) if isinstance(mcfg, ModelConfig) else None
    if (
        isinstance(mcfg, ModelConfig) and family is not None and family.lora_out is not None
    ):  # fused layers (Phi-3, GPT-2)
        if s.use_dora:
            raise ConfigError(
                f"DoRA adapters on {family.name}'s fused layers have no PEFT form; use plain LoRA"
            )
        state, updates = family.lora_out(
            state, mcfg, {"r": s.r, "alpha": s.alpha, "use_rslora": s.use_rslora}
        )
        cfg.update(updates)
    with atomic_path(out / "adapter_model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_json(out / "adapter_config.json", cfg)
    return out


def read_adapter_config(folder: str | Path) -> dict:
    f = Path(folder) / "adapter_config.json"
    if not f.is_file():
        raise CheckpointError(
            f"{f}: not found; an adapter folder holds adapter_config.json and adapter_model.safetensors"
        )
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None


def settings_from_peft(cfg: dict, source: str) -> LoraSettings:
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{source}: peft_type {cfg.get('peft_type')!r}; expected LORA")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise CheckpointError(f"{source}: {key} is not supported (per-module ranks)")
    for key in ("modules_to_save", "layers_to_transform"):
        if cfg.get(key):
            raise CheckpointError(f"{source}: {key} is not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("fan_in_fan_out"):
        raise CheckpointError(f"{source}: bias/fan_in_fan_out adapters are not supported")
    targets = cfg.get("target_modules") or []
    stacked = [p.rsplit(".", 1)[-1] for p in cfg.get("target_parameters") or []]
    bad = [p for p in stacked if p not in ("gate_up_proj", "down_proj")]
    if bad:
        raise CheckpointError(
            f"{source}: target_parameters {bad} not supported (expert gate_up_proj/down_proj)"
        )
    if stacked:
        targets = [*([targets] if isinstance(targets, str) else targets), *(f"experts.{p}" for p in stacked)]
    return LoraSettings(
        r=cfg["r"],
        alpha=cfg.get("lora_alpha", 8),
        dropout=cfg.get("lora_dropout", 0.0),
        target_modules=targets,
        use_rslora=bool(cfg.get("use_rslora")),
        use_dora=bool(cfg.get("use_dora")),
    )


def load_adapter(model: nn.Module, folder: str | Path) -> LoraSettings:
    """Apply the PEFT LoRA adapter in `folder` to `model` (in place)."""
    folder = Path(folder)
    acfg = read_adapter_config(folder)
    wfile = folder / "adapter_model.safetensors"
    try:
        state = load_file(str(wfile))
    except (SafetensorError, OSError, ValueError) as e:
        hint = (
            " (.bin adapters: re-save with safe_serialization=True)"
            if (folder / "adapter_model.bin").exists()
            else ""
        )
        raise CheckpointError(f"{wfile}: cannot read ({e}){hint}") from None
    state = {k.replace(".default.", "."): v for k, v in state.items()}
    mcfg = getattr(model, "cfg", None)
    family = family_for_config(mcfg) if isinstance(mcfg, ModelConfig) else None
    if (
        isinstance(mcfg, ModelConfig) and family is not None and family.lora_in is not None
    ):  # fused layers -> lmforge's split ones
        state, acfg = family.lora_in(state, mcfg, acfg, str(folder / "adapter_config.json"))
    s = settings_from_peft(acfg, str(folder / "adapter_config.json"))
    if getattr(model, "lora_settings", None) is None:
        try:
            apply_lora(model, s)
        except ConfigError as e:
            raise CheckpointError(
                f"{folder}: {e}; the adapter was made for a different architecture"
            ) from None
    own = {}
    for name, m in lora_modules(model):
        own[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight
        own[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight
        if m.use_dora:
            own[f"{PREFIX}{name}.lora_magnitude_vector"] = m.lora_magnitude_vector
    for name, lx in expert_lora_modules(model):
        for k, v in lx.peft_tensors().items():
            own[f"{PREFIX}{name}.{k}"] = v
    state = {
        (k[: -len(".weight")] if k.endswith("lora_magnitude_vector.weight") else k): v
        for k, v in state.items()
    }
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    if unexpected or missing:
        raise CheckpointError(
            f"{wfile}: does not fit this model (unexpected {unexpected[:2]}, missing {missing[:2]}); "
            f"was it trained for a different base model?"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"{wfile}: {k} has shape {tuple(v.shape)} but this model needs "
                f"{tuple(own[k].shape)}: the adapter was trained for a different base model"
            )
    with torch.no_grad():
        for k, v in state.items():
            if not own[k].is_leaf:  # expert tensors: a view in PEFT's layout, loaded below
                continue
            own[k].copy_(v.to(own[k].dtype))
        for name, lx in expert_lora_modules(model):
            pre = f"{PREFIX}{name}."
            lx.load_peft_tensors({k[len(pre) :]: v for k, v in state.items() if k.startswith(pre)})
    return s


def trainable_summary(model: nn.Module) -> dict:
    """Trainable / total parameters and the AdamW state they need (two fp32 moments each)."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    for name, b in model.named_buffers():  # 4-bit weights live in buffers
        if name.endswith("qweight"):
            total += b.numel() * 2
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": round(trainable / max(total, 1), 6),
        "optimizer_state_bytes": trainable * 8,
    }
