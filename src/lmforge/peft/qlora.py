"""QLoRA: frozen base linears stored as 4-bit NormalFloat (NF4) with double quantisation, LoRA
on top, computing in bf16.

NF4 (Dettmers et al. 2023) stores each weight as one of 16 levels placed at quantiles of a
normal distribution, scaled per block of 64 weights by the block's absolute maximum. Double
quantisation stores those per-block scales in 8 bits too (per groups of 256 scales), bringing
the cost to ~4.13 bits per weight instead of 16 (bf16) or 32 (fp32).

Two quantisers, both work on CPU and GPU:
* `torchao` (default): torchao's NF4 quantiser (block 64, int8 scales per 256 blocks, mean
  offset); we keep its packed tensors as plain buffers so checkpoints stay safetensors.
* `bitsandbytes`: bnb's `quantize_4bit(quant_type="nf4", compress_statistics=True)`.

Mixture-of-Experts: the stacked expert tensors (most of a Mixtral's weights) are quantised too,
one NF4 matrix per expert (`NF4Experts`), so LoRA on `w1/w2/w3` or on attention alone sits on a
4-bit base. A weight NF4 cannot hold (element count not a multiple of the 64-weight block) is
named with its tensor and the fix by `check_quantizable`, from the config alone, before any data
is read or weight loaded.

`NF4Linear` never keeps a dequantised weight alive: its autograd function dequantises in the
forward and again in the backward (the weight gets no gradient; only the input does), so
activation memory does not grow by a bf16 copy of every layer. Everything else that stays
dense and frozen (embeddings, norms, lm_head) is held in the compute dtype; LoRA A/B (the only
trainable tensors) stay fp32. `load_quantized` reads a checkpoint tensor by tensor and
quantises as it goes, so the full-precision model is never in memory at once.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..errors import CheckpointError, ConfigError
from ..model.config import ModelConfig
from ..model.hf import empty_model, finish_model, from_hf_config, iter_weights, read_hf_config
from ..model.moe import Experts
from ..model.transformer import Transformer

BLOCK = 64
SCALER_BLOCK = 256


class QLoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: str = Field("auto", pattern="^(auto|torchao|bitsandbytes)$", description="NF4 quantiser")
    compute_dtype: str = Field("bfloat16", pattern="^(bfloat16|float16|float32)$")
    optimizer: str = Field(
        "adamw",
        pattern="^(adamw|adamw8bit|paged_adamw8bit)$",
        description="8-bit / paged AdamW from bitsandbytes where available",
    )


def resolve_backend(name: str) -> str:
    if name in ("auto", "torchao"):
        try:
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor  # noqa: F401

            return "torchao"
        except ImportError:
            if name == "torchao":
                raise ConfigError(
                    "qlora.backend=torchao but torchao is not installed (pip install torchao)"
                ) from None
    try:
        import bitsandbytes.functional  # noqa: F401

        return "bitsandbytes"
    except ImportError:
        raise ConfigError(
            "QLoRA needs torchao or bitsandbytes for NF4 quantisation: pip install torchao"
        ) from None


def _nf4_tensor_cls():
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

    return NF4Tensor


_TABLES: dict = {}


def _quad_table(code: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row i = the four NF4 values packed in the little-endian int16 i (byte0 hi, byte0 lo,
    byte1 hi, byte1 lo nibbles)."""
    key = (dtype, code.device, tuple(code.tolist()))
    if key not in _TABLES:
        c = code.to(dtype)
        i = torch.arange(65536, device=code.device)
        b0, b1 = i & 0xFF, i >> 8
        _TABLES[key] = torch.stack([c[b0 >> 4], c[b0 & 0xF], c[b1 >> 4], c[b1 & 0xF]], dim=-1).contiguous()
    return _TABLES[key]


class _DequantMatmul(torch.autograd.Function):
    """y = x W^T with W dequantised on the fly in both passes (W gets no gradient)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x @ layer.dequantize().t()

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantize(), None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in 4-bit NF4 with double quantisation."""

    # buffers (register_buffer), typed for the checker
    qweight: torch.Tensor
    qscale: torch.Tensor
    qscale_factor: torch.Tensor
    qscale_mean: torch.Tensor
    code: torch.Tensor
    code2: torch.Tensor

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
        backend: str = "auto",
    ):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.backend = resolve_backend(backend)
        w = weight.detach().float().contiguous()
        if w.numel() % BLOCK:
            raise ConfigError(f"NF4 needs weights with a multiple of {BLOCK} elements; got {tuple(w.shape)}")
        if self.backend == "torchao":
            n_blocks = w.numel() // BLOCK
            sb = math.gcd(n_blocks, SCALER_BLOCK)  # small layers: the largest group that divides evenly
            t = _nf4_tensor_cls().from_tensor(w, BLOCK, sb)
            self.scaler_block = sb
            self.register_buffer("qweight", t.quantized_data.contiguous())
            self.register_buffer("qscale", t.quantized_scalers.contiguous())
            self.register_buffer("qscale_factor", t.quantization_factor.float().contiguous())
            self.register_buffer("qscale_mean", t.scaler_mean.float().reshape(1).contiguous())
            self.register_buffer("code", t.nf4.float().contiguous(), persistent=False)
        else:
            import bitsandbytes.functional as bf

            q, st = bf.quantize_4bit(w, blocksize=BLOCK, compress_statistics=True, quant_type="nf4")
            self.register_buffer("qweight", q.contiguous())
            self.register_buffer("qscale", st.absmax.contiguous())
            self.register_buffer("qscale_factor", st.state2.absmax.contiguous())
            self.register_buffer("qscale_mean", st.offset.float().reshape(1).contiguous())
            self.register_buffer("code", st.code.float().contiguous(), persistent=False)
            self.register_buffer("code2", st.state2.code.contiguous(), persistent=False)
            self.scaler_block = st.state2.blocksize
        self.bias = (
            nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False) if bias is not None else None
        )

    @property
    def weight(self):  # what code that inspects `.weight` (dtype / device) should see
        return self.qweight

    def dequantize(self) -> torch.Tensor:
        if self.backend == "torchao":
            cd = self.compute_dtype
            # two packed bytes (four 4-bit codes) per lookup in a 65536 x 4 table: one row gather
            # instead of four element gathers, ~5x faster on CPU
            idx = self.qweight.view(torch.int16).int() & 0xFFFF
            vals = F.embedding(idx, _quad_table(self.code, cd)).view(-1, BLOCK)
            scales = (self.qscale.float().view(-1, self.scaler_block) / self.qscale_factor[:, None]).flatten()
            w = vals * (scales + self.qscale_mean).to(cd)[:, None]
        else:
            import bitsandbytes.functional as bf

            st2 = bf.QuantState(
                absmax=self.qscale_factor, code=self.code2, blocksize=self.scaler_block, dtype=torch.float32
            )
            st = bf.QuantState(
                absmax=self.qscale,
                shape=torch.Size((self.out_features, self.in_features)),
                code=self.code,
                blocksize=BLOCK,
                quant_type="nf4",
                dtype=torch.float32,
                offset=self.qscale_mean[0],
                state2=st2,
            )
            w = bf.dequantize_4bit(self.qweight, st)
        return w.view(self.out_features, self.in_features).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantMatmul.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nf4+dq ({self.backend}), compute={self.compute_dtype}"


class NF4Experts(nn.Module):
    """A layer's stacked experts in NF4: one `NF4Linear` per expert for `gate_up_proj` [2ff, d]
    and `down_proj` [d, ff]; the same `gate_up` / `down` / `expert` methods as `moe.Experts`."""

    def __init__(self, compute_dtype: torch.dtype, backend: str):
        super().__init__()
        self.compute_dtype, self.backend = compute_dtype, backend
        self.gate_up_proj = nn.ModuleList()
        self.down_proj = nn.ModuleList()
        self.gate_up_proj_shape: tuple[int, ...] | None = None
        self.down_proj_shape: tuple[int, ...] | None = None

    def set(self, name: str, w: torch.Tensor) -> None:
        layers = nn.ModuleList(
            NF4Linear(w[e], None, self.compute_dtype, self.backend) for e in range(w.shape[0])
        )
        setattr(self, name, layers)
        setattr(self, f"{name}_shape", tuple(w.shape))

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.gate_up_proj[e](x)

    def down(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj[e](x)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(e, x).chunk(2, dim=-1)
        return self.down(e, F.silu(gate) * up)

    def dequantized(self, name: str) -> torch.Tensor:
        return torch.stack([m.dequantize() for m in getattr(self, name)])


def quantized_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The matrices QLoRA stores in NF4 (one expert's matrix for stacked experts), by name."""
    model = empty_model(cfg)
    out = {}
    for name, m in model.named_modules():
        if _is_block_linear(name, m):
            out[f"{name}.weight"] = tuple(m.weight.shape)
        elif isinstance(m, Experts):
            out[f"{name}.gate_up_proj"] = tuple(m.gate_up_proj.shape)
            out[f"{name}.down_proj"] = tuple(m.down_proj.shape)
    return out


def check_quantizable(cfg: ModelConfig, source: str = "model") -> None:
    """Refuse, naming the first tensor, a model whose block weights NF4 cannot store, and a
    generic-path model (run by transformers: lmforge's NF4 layers cannot be put in it)."""
    if cfg.hf_config is not None:
        raise ConfigError(
            f"{source}: model_type {cfg.hf_type!r} runs on the generic transformers path, which has "
            f"no QLoRA; use sft.method=lora (with sft.base_dtype=bfloat16 to save memory)"
        )
    for name, shape in quantized_shapes(cfg).items():
        per_matrix = math.prod(shape[-2:])
        if per_matrix % BLOCK:
            raise ConfigError(
                f"{source}: {name} {shape} has {per_matrix} weights per matrix, not a multiple of "
                f"the NF4 block ({BLOCK}), so QLoRA cannot quantise it; use sft.method=lora "
                f"(with sft.base_dtype=bfloat16 to save memory) for this model"
            )


def _dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _is_block_linear(name: str, m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and name.startswith("model.layers.")


def quantize_model(model: Transformer, s: QLoraSettings) -> Transformer:
    """Quantise every linear of the transformer blocks to NF4 (in place); the rest (embeddings,
    norms, lm_head) is frozen in the compute dtype."""
    cd = _dtype(s.compute_dtype)
    check_quantizable(model.cfg)
    for name, m in list(model.named_modules()):
        if _is_block_linear(name, m):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, NF4Linear(m.weight, m.bias, cd, s.backend))
        elif isinstance(m, Experts):
            q = NF4Experts(cd, s.backend)
            q.set("gate_up_proj", m.gate_up_proj.detach())
            q.set("down_proj", m.down_proj.detach())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
    for p in model.parameters():
        p.requires_grad_(False)
        if p.is_floating_point():
            p.data = p.data.to(cd)
    return model


def load_quantized(folder: str | Path, s: QLoraSettings, device="cpu") -> Transformer:
    """Read a model folder straight into NF4 form, one tensor at a time."""
    folder = Path(folder)
    cfg = from_hf_config(read_hf_config(folder), str(folder / "config.json"))
    check_quantizable(cfg, str(folder))
    cd = _dtype(s.compute_dtype)
    model = empty_model(cfg)
    own = model.state_dict()
    pending_bias: dict[str, torch.Tensor] = {}
    seen = set()
    for key, t in iter_weights(folder):
        if "rotary_emb" in key:
            continue
        if key not in own:
            raise CheckpointError(f"{folder}: unexpected tensor {key} for this config.json")
        if tuple(own[key].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{folder}: {key} has shape {tuple(t.shape)}, config.json implies {tuple(own[key].shape)}"
            )
        seen.add(key)
        mod_name, _, attr = key.rpartition(".")
        mod = model.get_submodule(mod_name)
        if _is_block_linear(mod_name, mod) and attr == "weight":
            parent, _, child = mod_name.rpartition(".")
            bias = pending_bias.pop(mod_name, None)
            setattr(model.get_submodule(parent), child, NF4Linear(t.to(device), bias, cd, s.backend))
        elif isinstance(mod, NF4Linear) and attr == "bias":
            mod.bias = nn.Parameter(t.to(device, cd), requires_grad=False)
        elif _is_block_linear(mod_name, mod) and attr == "bias":
            pending_bias[mod_name] = t
        elif isinstance(mod, (Experts, NF4Experts)):
            if isinstance(mod, Experts):
                parent, _, child = mod_name.rpartition(".")
                mod = NF4Experts(cd, s.backend)
                setattr(model.get_submodule(parent), child, mod)
            mod.set(attr, t.to(device))
        else:
            setattr(mod, attr, nn.Parameter(t.to(device, cd), requires_grad=False))
    missing = [k for k in own if k not in seen and not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing:
        raise CheckpointError(f"{folder}: weights missing for {missing[:3]}")
    model = finish_model(model, device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def dequantize_model(model: Transformer, dtype: torch.dtype = torch.float32) -> Transformer:
    """Replace NF4 layers by dense ones (after `merge_lora`, or to export a quantised model)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, NF4Experts):
            gu, down = m.dequantized("gate_up_proj"), m.dequantized("down_proj")
            dense = Experts(gu.shape[0], gu.shape[2], down.shape[2]).to(device=gu.device, dtype=dtype)
            dense.gate_up_proj.data = gu.to(dtype)
            dense.down_proj.data = down.to(dtype)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
    for name, m in list(model.named_modules()):
        if isinstance(m, NF4Linear):
            lin = nn.Linear(
                m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype, device=m.qweight.device
            )
            with torch.no_grad():
                lin.weight.copy_(m.dequantize().to(dtype))
                if m.bias is not None:
                    lin.bias.copy_(m.bias.to(dtype))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    return model.to(dtype)


def nf4_bytes(model: nn.Module) -> int:
    return sum(
        b.numel() * b.element_size()
        for n, b in model.named_buffers()
        if n.rsplit(".", 1)[-1] in ("qweight", "qscale", "qscale_factor", "qscale_mean")
    )


__all__ = [
    "NF4Linear",
    "NF4Experts",
    "check_quantizable",
    "QLoraSettings",
    "quantize_model",
    "load_quantized",
    "dequantize_model",
]
