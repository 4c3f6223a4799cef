"""Mixture-of-Experts models in the Hugging Face layout: Mixtral where it fits, lmforge's own
`model_type` where it does not.

**Mixtral** (`MixtralForCausalLM`) is exactly lmforge's MoE when the router is a softmax over
all experts with the top-k weights renormalised to sum to 1, routing is dropless, there is no
shared expert and no q/k/v bias. Then `config.json` says `model_type: mixtral`
(`num_local_experts`, `num_experts_per_tok`, `intermediate_size` = expert width,
`router_aux_loss_coef` = `aux_loss_coef`, `output_router_logits` = whether that loss is on, so
`transformers` adds it when fine-tuning too) and the weights use the per-expert names every
published Mixtral checkpoint uses and `transformers` 5 itself writes:

    model.layers.{i}.block_sparse_moe.gate.weight              [E, d]   (router)
    model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight    [ff, d]  (gate)
    model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight    [ff, d]  (up)
    model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight    [d, ff]  (down)

In memory (lmforge, and `transformers` >= 5 after its load-time conversion) the experts of a
layer are stacked: `mlp.experts.gate_up_proj` [E, 2ff, d] = cat(w1, w3) per expert and
`mlp.experts.down_proj` [E, d, ff]; the router is `mlp.gate.weight`. Reading accepts both
layouts (training checkpoints keep the stacked one).

**Everything else** (sigmoid gates, a shared expert, capacity-limited routing, q/k/v biases on
an MoE) has no `transformers` architecture that computes the same function, so the folder gets
`model_type: lmforge_moe` with the full lmforge model config under `"lmforge"`, stacked weights,
and a `"_lmforge_note"` saying that `transformers` cannot load it. lmforge loads, trains,
evaluates and serves such folders; `lmforge export` refuses them and names the feature.
(Qwen2-MoE gates its shared expert with a learned sigmoid and Qwen3-MoE / OLMoE normalise
queries and keys, so neither is an exact fit for the shared-expert variant.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from ..errors import CheckpointError
from .config import ModelConfig
from .families.common import base_hf

LMFORGE_MOE = "lmforge_moe"
_LEGACY = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_LEGACY_GATE = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.gate\.weight$")


def mixtral_blockers(cfg: ModelConfig) -> list[str]:
    """Why `cfg` cannot be written as a Mixtral (empty list: it can)."""
    out = []
    if cfg.moe_gate != "softmax":
        out.append(f"moe_gate={cfg.moe_gate!r} (Mixtral's router is a softmax over all experts)")
    if cfg.shared_expert:
        out.append("shared_expert=true (Mixtral has no shared expert)")
    if cfg.capacity_factor is not None:
        out.append(
            f"capacity_factor={cfg.capacity_factor} (Mixtral routes dropless; set it to null "
            f"to export the dropless model, which then differs from what was trained only "
            f"where assignments were dropped)"
        )
    if cfg.qkv_bias:
        out.append("qkv_bias=true (Mixtral's attention has no biases)")
    if cfg.layer_types is not None and "full" in cfg.layer_types and cfg.sliding_window:
        out.append("layer_types mixes full and sliding layers (Mixtral slides every layer or none)")
    return out


def _common(cfg: ModelConfig) -> dict:
    """The dense families' config.json keys with Mixtral's expert width and routing settings."""
    return {
        **base_hf(cfg),
        "intermediate_size": cfg.expert_dim,
        "hidden_act": "silu",
        "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.experts_top_k,
        "router_aux_loss_coef": cfg.aux_loss_coef,
        "output_router_logits": cfg.aux_loss_coef > 0,
    }


def moe_hf_config(cfg: ModelConfig) -> dict:
    """config.json keys (without dtype / token ids) for an MoE model."""
    if not mixtral_blockers(cfg):
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            **_common(cfg),
            "router_jitter_noise": 0.0,
            "sliding_window": cfg.sliding_window,
            "attention_dropout": 0.0,
            # lmforge-only training knobs, so an export -> import round trip keeps them
            "lmforge": {"z_loss_coef": cfg.z_loss_coef, "d_ff": cfg.d_ff},
        }
    return {
        "architectures": ["LmforgeMoeForCausalLM"],
        "model_type": LMFORGE_MOE,
        **_common(cfg),
        "lmforge": cfg.model_dump(),
        "_lmforge_note": "transformers cannot load this model: "
        + "; ".join(mixtral_blockers(cfg))
        + ". lmforge loads it (lmforge.model.hf.load_pretrained).",
    }


def moe_from_hf_config(hf: dict, source: str, common: dict) -> ModelConfig:
    """ModelConfig of a `mixtral` or `lmforge_moe` config.json; `common` holds the dense fields
    already parsed by `from_hf_config`."""
    mt = hf.get("model_type")
    if mt == LMFORGE_MOE:
        try:
            return ModelConfig.model_validate(hf["lmforge"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f'{source}: model_type {LMFORGE_MOE} needs a valid "lmforge" block '
                f"(the model config lmforge wrote): {e}"
            ) from None
    extra = hf.get("lmforge") or {}
    try:
        n_exp, top_k = int(hf["num_local_experts"]), int(hf["num_experts_per_tok"])
        ff = int(hf["intermediate_size"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"{source}: a mixtral config needs integer num_local_experts, "
            f"num_experts_per_tok and intermediate_size"
        ) from None
    d_ff = extra.get("d_ff")
    try:
        return ModelConfig(
            **dict(
                common,
                n_experts=n_exp,
                experts_top_k=top_k,
                moe_gate="softmax",
                capacity_factor=None,
                shared_expert=False,
                qkv_bias=False,
                d_ff=d_ff or ff,
                moe_d_ff=None if d_ff in (None, ff) else ff,
                aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)),
                # Mixtral is trained without a router z-loss; lmforge's own exports say what they used
                z_loss_coef=float(extra.get("z_loss_coef", 0.0)),
            )
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


# ----------------------------------------------------------------------------- weight names
def to_mixtral_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacked lmforge expert tensors -> per-expert Mixtral names (copies, no shared storage)."""
    out = {}
    for k, v in state.items():
        if k.endswith(".mlp.gate.weight"):
            out[k.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = v
        elif k.endswith(".mlp.experts.gate_up_proj"):
            base = k.removesuffix(".mlp.experts.gate_up_proj")
            ff = v.shape[1] // 2
            for j in range(v.shape[0]):
                out[f"{base}.block_sparse_moe.experts.{j}.w1.weight"] = v[j, :ff].clone()
                out[f"{base}.block_sparse_moe.experts.{j}.w3.weight"] = v[j, ff:].clone()
        elif k.endswith(".mlp.experts.down_proj"):
            base = k.removesuffix(".mlp.experts.down_proj")
            for j in range(v.shape[0]):
                out[f"{base}.block_sparse_moe.experts.{j}.w2.weight"] = v[j].clone()
        else:
            out[k] = v
    return dict(sorted(out.items(), key=lambda kv: _natural(kv[0])))


def _natural(key: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def from_mixtral_keys(
    items: Iterable[tuple[str, torch.Tensor]], n_experts: int, source: str = "checkpoint"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Per-expert Mixtral tensors -> stacked lmforge tensors, streaming: each layer's experts are
    buffered only until all of them have arrived. Stacked names pass through unchanged."""
    pending: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for k, v in items:
        m = _LEGACY.match(k)
        if m is None:
            g = _LEGACY_GATE.match(k)
            yield (f"{g.group(1)}.mlp.gate.weight", v) if g else (k, v)
            continue
        base, j, w = m.group(1), int(m.group(2)), m.group(3)
        if j >= n_experts:
            raise CheckpointError(f"{source}: {k} but config.json says num_local_experts={n_experts}")
        kind = "down" if w == "w2" else "gate_up"
        slot = pending.setdefault((base, kind), {})
        slot[j * 2 + (w == "w3")] = v  # gate_up: w1 at 2j, w3 at 2j+1; down: w2 at 2j
        if len(slot) == (2 * n_experts if kind == "gate_up" else n_experts):
            del pending[(base, kind)]
            if kind == "gate_up":
                yield (
                    f"{base}.mlp.experts.gate_up_proj",
                    torch.stack([torch.cat([slot[2 * e], slot[2 * e + 1]], 0) for e in range(n_experts)]),
                )
            else:
                yield f"{base}.mlp.experts.down_proj", torch.stack([slot[2 * e] for e in range(n_experts)])
    if pending:
        (base, kind), slot = next(iter(pending.items()))
        names = "w1/w3" if kind == "gate_up" else "w2"
        raise CheckpointError(
            f"{source}: {base}: expert weights {names} incomplete ({len(slot)} of "
            f"{(2 if kind == 'gate_up' else 1) * n_experts} tensors); the checkpoint is "
            f"truncated or num_local_experts is wrong"
        )
