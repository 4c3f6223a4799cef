"""LoRA on Mixture-of-Experts expert weights, one low-rank pair per expert, in PEFT's format.

lmforge (like `transformers` 5) keeps a layer's experts stacked: `mlp.experts.gate_up_proj`
[E, 2ff, d] (Mixtral's w1 and w3 of every expert, concatenated) and `mlp.experts.down_proj`
[E, d, ff] (w2). `LoraExperts` wraps such a module (or its 4-bit form, `qlora.NF4Experts`) and
adds, per expert e and per adapted tensor W, the update s * B_e A_e, so the experts' matmuls
become x W_e^T + s (x A_e^T) B_e^T.

Targets: `w1` and `w3` select `gate_up_proj` (they are one stacked tensor, so they are adapted
together: asking for one without the other is refused), `w2` selects `down_proj`;
`experts.gate_up_proj` / `experts.down_proj` are accepted too.

Saved format = PEFT's `target_parameters` LoRA (`lora.ParamWrapper`, peft >= 0.17): for each
adapted tensor one `lora_A.weight` [E*r, in] (expert e's A in rows e*r .. e*r+r) and one
`lora_B.weight` [out, r*E] (expert e's B in columns e, e+E, e+2E, ...). PEFT nests one wrapper
per targeted tensor, so with both tensors adapted the first (`gate_up_proj`) sits under
`experts.base_layer.` and the second directly under `experts.`; `PeftModel.from_pretrained` on
the `transformers` Mixtral reproduces lmforge's logits (tested). PEFT's wrapper supports
neither dropout nor DoRA, so neither is offered here.

Coverage: `weight_count` / `warn_untouched` measure which share of the model's weight matrices
(embeddings and head aside; each expert's matrices once, dense or 4-bit) the chosen targets
adapt, so that `apply_lora` can say when most of an MoE stays untouched.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..model.moe import Experts

EXPERT_TARGETS = {"w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"}
EXPERT_TARGETS.update({"experts.gate_up_proj": "gate_up_proj", "experts.down_proj": "down_proj"})
ORDER = ("gate_up_proj", "down_proj")


def expert_params(targets: list[str]) -> list[str]:
    """The stacked tensors a target list names, in PEFT's nesting order."""
    chosen = [t for t in targets if t in EXPERT_TARGETS]
    if ("w1" in chosen) != ("w3" in chosen) and "experts.gate_up_proj" not in chosen:
        raise ConfigError(
            "lora.target_modules: w1 and w3 (gate and up) of an expert are stored as one stacked tensor "
            "(mlp.experts.gate_up_proj) and are adapted together; list both, or neither"
        )
    wanted = {EXPERT_TARGETS[t] for t in chosen}
    return [p for p in ORDER if p in wanted]


def stacked_shape(base: nn.Module, name: str) -> tuple[int, int, int]:
    """(experts, out, in) of a stacked tensor of `base` (dense or 4-bit)."""
    shape = getattr(base, f"{name}_shape", None)
    return tuple(shape) if shape is not None else tuple(getattr(base, name).shape)


class LoraExperts(nn.Module):
    def __init__(self, base: nn.Module, params: list[str], r: int, scaling: float):
        super().__init__()
        self.base_layer: Any = base  # Experts or a 4-bit NF4Experts (both have gate_up / down)
        self.params, self.r, self.scaling = list(params), r, scaling
        dev = next(iter([*base.parameters(), *base.buffers()])).device
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in self.params:
            n_exp, out, inp = stacked_shape(base, name)
            a = torch.empty(n_exp, r, inp, device=dev)
            for e in range(n_exp):  # PEFT's init: Kaiming-uniform A per expert, B zero
                nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(n_exp, out, r, device=dev))
        self.n_experts = stacked_shape(base, self.params[0])[0] if self.params else 0

    def _delta(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A[name][e], self.lora_B[name][e]
        return F.linear(F.linear(x.to(a.dtype), a) * self.scaling, b)

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer.gate_up(e, x)
        return y + self._delta("gate_up_proj", e, x).to(y.dtype) if "gate_up_proj" in self.lora_A else y

    def down(self, e: int, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer.down(e, x)
        return y + self._delta("down_proj", e, x).to(y.dtype) if "down_proj" in self.lora_A else y

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(e, x).chunk(2, dim=-1)
        return self.down(e, F.silu(gate) * up)

    @torch.no_grad()
    def merged_tensor(self, name: str) -> torch.Tensor:
        """The stacked tensor `name` with the update folded in (fp32)."""
        base = self.base_layer
        w = base.dequantized(name) if hasattr(base, "dequantized") else getattr(base, name)
        w = w.float()
        if name in self.lora_A:
            w = w + torch.bmm(self.lora_B[name].float(), self.lora_A[name].float()) * self.scaling
        return w

    # -- PEFT layout
    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """{'<nesting>lora_A.weight': ..., ...} relative to the experts module, PEFT's layout."""
        out = {}
        for i, name in enumerate(self.params):
            pre = "base_layer." * (len(self.params) - 1 - i)
            a, b = self.lora_A[name], self.lora_B[name]  # [E, r, in], [E, out, r]
            out[f"{pre}lora_A.weight"] = a.reshape(-1, a.shape[-1])
            out[f"{pre}lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], -1)
        return out

    @torch.no_grad()
    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, name in enumerate(self.params):
            pre = "base_layer." * (len(self.params) - 1 - i)
            a, b = self.lora_A[name], self.lora_B[name]
            n_exp, out, r = b.shape
            a.copy_(tensors[f"{pre}lora_A.weight"].reshape(a.shape))
            b.copy_(tensors[f"{pre}lora_B.weight"].reshape(out, r, n_exp).permute(2, 0, 1))

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, params={self.params}, r={self.r}, scaling={self.scaling:.4g}"


# ----------------------------------------------------------------------------- coverage
def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "NF4Linear"


def is_experts(m: nn.Module) -> bool:
    return isinstance(m, Experts) or type(m).__name__ == "NF4Experts"


def weight_count(model: nn.Module) -> tuple[int, int]:
    """(matrix weights outside the embeddings / head, of which expert weights)."""
    body = experts = 0
    for name, m in model.named_modules():
        if is_linear(m) and not name.endswith("lm_head") and ".experts." not in name:
            body += m.in_features * m.out_features
        elif is_experts(m):
            n = sum(math.prod(stacked_shape(m, p)) for p in ("gate_up_proj", "down_proj"))
            body += n
            experts += n
    return body, experts


def warn_untouched(model: nn.Module, adapted: int, total: tuple[int, int]) -> None:
    body, experts = total
    if not body or adapted >= body / 2:
        return
    hint = (
        f"; {experts / body:.0%} of them are expert weights: add w1, w2, w3 to lora.target_modules "
        f"to adapt the experts too"
        if experts
        else ""
    )
    warnings.warn(
        f"LoRA targets cover {adapted / body:.0%} of the model's weight matrices (embeddings aside); "
        f"the rest stays frozen and untouched{hint}",
        stacklevel=3,
    )
