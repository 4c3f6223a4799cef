"""LoRA tensors between lmforge's split layers and a family's fused ones (Phi-3, GPT-2).

lmforge trains LoRA on separate q/k/v (and gate/up) layers; Phi-3 and GPT-2 checkpoints fuse them
(`qkv_proj`, `gate_up_proj`, `c_attn`). A LoRA pair per part, (A_p [r, in], B_p [out_p, r]),
is exactly one LoRA on the fused layer of rank k*r: A = [A_1; ...; A_k] and B block-diagonal
(B_1, ..., B_k), because B A then has the block B_p A_p on the rows of part p and nothing across
parts. PEFT expresses the larger rank with `rank_pattern` and keeps the scale alpha / r with
`alpha_pattern` (k * alpha, or sqrt(k) * alpha with rsLoRA). A part that was not targeted gets
zero blocks. Reading goes back the same way and refuses a fused adapter whose B is not
block-diagonal (trained on the fused layer, it has no exact split form).

Pure tensor code: the adapter layer (`peft/lora.py`) calls it through `Family.lora_out` /
`Family.lora_in` and owns everything else about adapters.
"""

from __future__ import annotations

import math
import re

import torch

from ...errors import CheckpointError

PREFIX = "base_model.model."


def fuse(
    state: dict[str, torch.Tensor], parts: list[tuple[str, int]], fused: str, r: int
) -> tuple[dict[str, torch.Tensor], bool]:
    """Replace the LoRA tensors `<layer>.<part>.lora_{A,B}.weight` of every layer by one fused
    pair `<layer>.<fused>.lora_{A,B}.weight`; `parts` = (name, output rows). Returns the new state
    and whether anything was fused."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[tuple[str, str], torch.Tensor]] = {}
    pat = re.compile(rf"^(.*)\.({'|'.join(re.escape(p) for p, _ in parts)})\.lora_([AB])\.weight$")
    for k, v in state.items():
        m = pat.match(k)
        if m is None:
            out[k] = v
            continue
        groups.setdefault(m.group(1), {})[(m.group(2), m.group(3))] = v
    for base, got in groups.items():
        a_in = next(v.shape[1] for (_, ab), v in got.items() if ab == "A")
        a_parts, b = [], torch.zeros(sum(n for _, n in parts), r * len(parts))
        row = 0
        for i, (name, n) in enumerate(parts):
            a_parts.append(got.get((name, "A"), torch.zeros(r, a_in)))
            if (name, "B") in got:
                b[row : row + n, i * r : (i + 1) * r] = got[(name, "B")]
            row += n
        out[f"{base}.{fused}.lora_A.weight"] = torch.cat(a_parts, 0).contiguous()
        out[f"{base}.{fused}.lora_B.weight"] = b.to(a_parts[0].dtype)
    return out, bool(groups)


def split(
    state: dict[str, torch.Tensor], parts: list[tuple[str, int]], fused: str, source: str
) -> dict[str, torch.Tensor]:
    """Inverse of `fuse`; a fused B that is not block-diagonal is refused."""
    out = {}
    k_parts = len(parts)
    for k, v in state.items():
        if not k.endswith(f".{fused}.lora_A.weight"):
            if not k.endswith(f".{fused}.lora_B.weight"):
                out[k] = v
            continue
        base = k.removesuffix(f".{fused}.lora_A.weight")
        a, b = v, state[f"{base}.{fused}.lora_B.weight"]
        r = a.shape[0] // k_parts
        row = 0
        for i, (name, n) in enumerate(parts):
            block = b[row : row + n]
            off = torch.cat([block[:, : i * r], block[:, (i + 1) * r :]], 1)
            if off.numel() and float(off.abs().max()) > 0:
                raise CheckpointError(
                    f"{source}: {base}.{fused} LoRA is not block-diagonal over {[p for p, _ in parts]} "
                    f"(trained on the fused layer); lmforge trains those parts as separate layers, so "
                    f"this adapter cannot be loaded exactly: merge it with peft instead"
                )
            out[f"{base}.{name}.lora_A.weight"] = a[i * r : (i + 1) * r].contiguous()
            out[f"{base}.{name}.lora_B.weight"] = block[:, i * r : (i + 1) * r].contiguous()
            row += n
    return out


def patterns(fused: dict[str, int], r: int, alpha: float, rslora: bool) -> dict:
    """rank_pattern / alpha_pattern for fused layers of k parts each (same scale as rank r)."""
    return {
        "rank_pattern": {name: k * r for name, k in fused.items()},
        "alpha_pattern": {name: alpha * (math.sqrt(k) if rslora else k) for name, k in fused.items()},
    }


def check_patterns(cfg: dict, fused: dict[str, int], source: str) -> None:
    r, alpha = cfg["r"], cfg.get("lora_alpha", 8)
    want = patterns(fused, r, alpha, bool(cfg.get("use_rslora")))
    for key in ("rank_pattern", "alpha_pattern"):
        got = {k: v for k, v in (cfg.get(key) or {}).items()}
        if any(k not in want[key] or not math.isclose(float(v), float(want[key][k])) for k, v in got.items()):
            raise CheckpointError(
                f"{source}: {key} {got} is not the fused-layer pattern lmforge writes ({want[key]}); "
                f"per-module ranks are not supported"
            )
