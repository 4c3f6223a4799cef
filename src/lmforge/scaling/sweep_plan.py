"""Planning of `scaling sweep`: the spec (sizes x tokens, or IsoFLOP budgets), the model shape of
each size, the points with their steps, LR and warmup, their config overrides, and the notes a
plan deserves (few steps, repeated data, embedding-heavy sizes). No training here."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError
from lmforge.scaling.flops import parse_quantity

SPEC_KEYS = ("sizes", "tokens", "isoflops", "head_dim", "lr_width_exp", "warmup_fraction")
# Train settings the sweep picks for every point unless the user overrides them.
POINT_DEFAULTS = {"schedule": "wsd", "decay_fraction": 0.2, "min_lr_ratio": 0.0, "eval_every": 0}
# The sweep trains every point from scratch; continued pretraining would ignore the shapes.
REFUSED_KEYS = ("pretrain.init_from",)
FEW_STEPS = 20
EMBEDDING_HEAVY = 2 / 3  # share of N in the embedding table above which a size gets a note


# ----------------------------------------------------------------------------- spec
@dataclass
class SweepSpec:
    """What to sweep. `sizes`: "DxL" / "DxLxH" strings or dicts of ModelConfig fields;
    exactly one of `tokens` (grid) or `isoflops` (compute budgets, FLOPs = 6ND)."""

    sizes: list[Any] = field(default_factory=list)
    tokens: list[Any] = field(default_factory=list)  # quantities ("1e9", "2B", 3e8), parsed later
    isoflops: list[Any] = field(default_factory=list)
    head_dim: int | None = None  # default: the config's d_model / n_heads
    lr_width_exp: float = 0.5  # LR ~ width^-0.5; 1 = muP-style 1/width; 0 = one LR
    warmup_fraction: float = 0.1

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepSpec:
        from lmforge.config import load_yaml

        data = load_yaml(path)
        bad = sorted(set(data) - set(SPEC_KEYS))
        if bad:
            raise ConfigError(f"{path}: unknown sweep key(s) {', '.join(bad)}; known: {', '.join(SPEC_KEYS)}")
        for key in ("sizes", "tokens", "isoflops"):
            if key in data and not isinstance(data[key], list):
                data[key] = _split_list(str(data[key]))
        return cls(**data)

    @property
    def mode(self) -> str:
        return "isoflop" if self.isoflops else "grid"


def _split_list(text: str) -> list[str]:
    return [t for t in text.replace(",", " ").split() if t]


def _quantities(items: list[Any], what: str) -> list[float]:
    out = []
    for it in items:
        v = parse_quantity(it)
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"{what}: {it!r} must be a positive number")
        if v in out:
            raise ConfigError(f"{what}: {it!r} is listed twice")
        out.append(v)
    return sorted(out)


def _shape(item: Any, head_dim: int) -> tuple[str, dict]:
    """(label, ModelConfig fields) of one size entry."""
    if isinstance(item, dict):
        fields = dict(item)
        label = str(fields.pop("name", "") or "")
        if "d_model" not in fields or "n_layers" not in fields:
            raise ConfigError(f"sizes: {item!r} needs d_model and n_layers")
    else:
        parts = str(item).lower().split("x")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            nums = []
        if len(nums) not in (2, 3) or min(nums) < 1:
            raise ConfigError(
                f"sizes: {item!r} is not a shape; write d_model x n_layers (e.g. 64x2) "
                f"or d_model x n_layers x n_heads (e.g. 64x2x4)"
            )
        fields = {"d_model": nums[0], "n_layers": nums[1]}
        if len(nums) == 3:
            fields["n_heads"] = nums[2]
        label = ""
    d = int(fields["d_model"])
    if "n_heads" not in fields:
        if d % head_dim:
            raise ConfigError(
                f"sizes: d_model {d} is not a multiple of head_dim {head_dim}; pick "
                f"widths that are, set --head-dim, or give heads as {d}x{fields['n_layers']}xH"
            )
        fields["n_heads"] = d // head_dim
    fields.setdefault("n_kv_heads", None)  # multi-head attention at every size
    fields.setdefault("d_ff", None)  # 8/3 d_model, rounded to 64
    name = label or (
        f"d{d}-l{fields['n_layers']}"
        + (f"-h{fields['n_heads']}" if head_dim * fields["n_heads"] != d else "")
    )
    return name, fields


# ----------------------------------------------------------------------------- plan
@dataclass
class SweepPoint:
    name: str
    model: dict  # ModelConfig fields set by the sweep
    params: int  # N, all parameters (as `pretrain` reports them)
    non_embedding_params: int
    steps: int
    tokens: int  # D actually trained: steps x tokens per step
    lr: float
    warmup_steps: int
    budget: float | None = None  # IsoFLOP compute budget (6ND) of its group
    epochs: float | None = None  # passes over the training split (None before the tokenizer ran)
    status: str = "planned"  # planned | ran | cached
    val_loss: float | None = None
    seconds: float | None = None

    @property
    def flops_6nd(self) -> float:
        return 6.0 * self.params * self.tokens


def _fmt_num(x: float, tokens: bool) -> str:
    if tokens:
        for div, suf in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
            if x >= div:
                return f"{x / div:.3g}{suf}"
        return f"{x:.0f}"
    m, e = f"{x:.2e}".split("e")
    return f"{float(m):g}e{int(e)}"


def plan_points(
    cfg: Any, spec: SweepSpec, vocab_size: int, train_tokens: int | None = None
) -> list[SweepPoint]:
    """The sweep's points for a resolved pipeline config; raises ConfigError on a bad grid."""
    from lmforge.model.config import ModelConfig

    if not spec.sizes:
        raise ConfigError(
            "the sweep has no model sizes: give --sizes (e.g. 64x2,96x3,128x4) or `sizes:` in the spec"
        )
    if bool(spec.tokens) == bool(spec.isoflops):
        raise ConfigError(
            "give token budgets (--tokens 1M,2M,4M) or IsoFLOP compute budgets "
            "(--isoflops 1e12,3e12), exactly one of them, with at least one value"
        )
    if not (0 <= spec.warmup_fraction < 1) or spec.lr_width_exp < 0:
        raise ConfigError("warmup_fraction must be in [0, 1) and lr_width_exp >= 0")
    pt = cfg.pretrain
    head_dim = spec.head_dim or pt.model.head_dim
    if head_dim < 2 or head_dim % 2:
        raise ConfigError(f"head_dim {head_dim} must be even (RoPE) and >= 2")
    budgets = _quantities(spec.isoflops or spec.tokens, "isoflops" if spec.isoflops else "tokens")
    tokens_per_step = pt.batch_size * pt.grad_accum * pt.seq_len
    shapes, seen = [], set()
    for item in spec.sizes:
        name, fields = _shape(item, head_dim)
        if name in seen:
            raise ConfigError(f"sizes: {name} is listed twice")
        seen.add(name)
        base = pt.model.model_dump()
        base.update(fields, vocab_size=vocab_size, max_seq_len=pt.seq_len)
        try:
            mcfg = ModelConfig(**base)
        except Exception as e:  # pydantic ValidationError: report the shape, not a traceback
            errors = e.errors() if hasattr(e, "errors") else [{"msg": str(e)}]
            msg = "; ".join(x["msg"] for x in errors)
            raise ConfigError(f"sizes: {name}: invalid model shape ({msg})") from None
        shapes.append((name, fields, mcfg))
    shapes.sort(key=lambda s: s[2].param_count())
    n_max = shapes[-1][2].param_count()
    per_size = 6.0 * n_max if spec.isoflops else 1.0
    if budgets[0] / per_size < tokens_per_step / 2:
        what = (
            f"IsoFLOP budget {budgets[0]:.3g} gives the largest size {shapes[-1][0]} (N={n_max:,}) "
            f"D = C/6N = {budgets[0] / per_size:,.0f} tokens"
            if spec.isoflops
            else f"token budget {budgets[0]:,.0f}"
        )
        raise ConfigError(
            f"{what}, less than one training step of {tokens_per_step:,} tokens "
            f"(batch_size {pt.batch_size} x grad_accum {pt.grad_accum} x seq_len "
            f"{pt.seq_len}); raise it to at least {tokens_per_step * per_size:.3g} "
            f"(better 20+ steps) or lower pretrain.batch_size / pretrain.seq_len"
        )

    def steps_for(budget: float, n: int) -> int:
        return max(1, int(round((budget / (6.0 * n) if spec.isoflops else budget) / tokens_per_step)))

    points = []
    for budget in budgets:
        for name, fields, mcfg in shapes:
            n = mcfg.param_count()
            steps = steps_for(budget, n)
            # One warmup and peak LR per size, whatever the budget: with the same seed and data
            # order, the runs of a size then share their warmup and stable phase and differ only
            # in where the WSD decay starts, so loss vs D is not blurred by warmup noise.
            all_steps = [steps_for(b, n) for b in budgets]
            warmup = min(
                pt.warmup_steps, int(round(spec.warmup_fraction * max(all_steps))), min(all_steps) // 2
            )
            lr = pt.lr * (pt.model.d_model / mcfg.d_model) ** spec.lr_width_exp
            label = f"c{_fmt_num(budget, False)}" if spec.isoflops else f"t{_fmt_num(budget, True)}"
            tokens = steps * tokens_per_step
            points.append(
                SweepPoint(
                    name=f"{name}-{label}",
                    model=fields,
                    params=n,
                    non_embedding_params=mcfg.non_embedding_params(),
                    steps=steps,
                    tokens=tokens,
                    lr=float(f"{lr:.4g}"),
                    warmup_steps=warmup,
                    budget=budget if spec.isoflops else None,
                    epochs=tokens / train_tokens if train_tokens else None,
                )
            )
    return points


def point_overrides(point: SweepPoint, out: Path, user_overrides: list[str]) -> list[str]:
    """Dotted overrides that turn the base config into this point's config."""
    user_keys = {o.split("=", 1)[0].strip() for o in user_overrides}
    ov = [
        f"run.root={json.dumps(str(out))}",
        f"run.name={point.name}",
        f"pretrain.max_steps={point.steps}",
        f"pretrain.lr={point.lr}",
        f"pretrain.warmup_steps={point.warmup_steps}",
    ]
    ov += [f"pretrain.model.{k}={json.dumps(v)}" for k, v in point.model.items()]
    ov += [
        f"pretrain.{k}={json.dumps(v)}" for k, v in POINT_DEFAULTS.items() if f"pretrain.{k}" not in user_keys
    ]
    return list(user_overrides) + ov


def _plan_notes(points: list[SweepPoint]) -> list[str]:
    notes = []
    few = [p.name for p in points if p.steps < FEW_STEPS]
    if few:
        notes.append(
            f"{len(few)} point(s) train fewer than {FEW_STEPS} steps ({', '.join(few[:4])}"
            f"{', ...' if len(few) > 4 else ''}): their loss is mostly warmup and noisy; "
            "raise the budgets or lower pretrain.batch_size"
        )
    rep = [p for p in points if p.epochs and p.epochs > 1.0]
    if rep:
        worst = max(rep, key=lambda p: p.epochs or 0.0)  # every p.epochs > 1 here
        notes.append(
            f"{len(rep)} point(s) repeat the training data (up to {worst.epochs:.1f} epochs, "
            f"{worst.name}); up to ~4 epochs costs little (Muennighoff et al. 2023, "
            "arXiv:2305.16264), beyond that the law bends"
        )
    heavy = {
        p.name.rsplit("-", 1)[0]: 1 - p.non_embedding_params / p.params
        for p in points
        if p.non_embedding_params < (1 - EMBEDDING_HEAVY) * p.params
    }
    if heavy:
        shares = ", ".join(f"{k} {v:.0%}" for k, v in list(heavy.items())[:4])
        notes.append(
            f"{len(heavy)} size(s) are mostly embedding table ({shares} of N): their loss "
            "depends on the vocabulary more than on N, which can make loss non-monotone "
            "in N and the N term of the fit degenerate; use wider sizes or a smaller "
            "tokenizer.vocab_size (see docs/scaling.md, Sweeps)"
        )
    return notes
