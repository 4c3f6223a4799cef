"""Mixed fleets: a run (or a family of runs) on several GPU types, each part with its own
GPU-hours or FLOPs, power, count, MFU and price, costed by `estimate_cost` and summed. Llama 2's
models are the example: 7B, 13B and 70B at 400 W, 34B at 350 W, 539 tCO2e in all."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import ConfigError
from lmforge.scaling.cost import (
    DEFAULT_CARBON_INTENSITY,
    DEFAULT_MFU,
    DEFAULT_PUE,
    CostEstimate,
    estimate_cost,
)

FLEET_KEYS = ("gpu", "hours", "flops", "watts", "n", "mfu", "price", "name")


def parse_fleet_part(spec: str) -> dict:
    """``"gpu=A100-SXM,hours=1038336,watts=350,name=34B"`` -> keyword arguments of one part."""
    out: dict = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in FLEET_KEYS:
            raise ConfigError(
                f"--part {spec!r}: {item.strip()!r} is not KEY=VALUE with KEY one of {', '.join(FLEET_KEYS)} "
                "(e.g. gpu=A100-SXM,hours=1038336,watts=350)"
            )
        if key in ("gpu", "name"):
            out[key] = value.strip()
        else:
            try:
                out[key] = float(value)
            except ValueError:
                raise ConfigError(f"--part {spec!r}: {key}={value!r} is not a number") from None
    if ("hours" in out) == ("flops" in out):
        raise ConfigError(f"--part {spec!r}: give exactly one of hours= or flops=")
    return out


@dataclass
class FleetEstimate:
    """Several parts (GPU types, runs) costed one by one and summed."""

    parts: list[tuple[str, CostEstimate]]

    @property
    def totals(self) -> dict:
        ests = [e for _, e in self.parts]
        costs = [e.cost_usd for e in ests]
        return {
            "flops": sum(e.flops for e in ests),
            "gpu_hours": sum(e.gpu_hours for e in ests),
            "kwh": sum(e.kwh for e in ests),
            "tco2e": sum(e.tco2e for e in ests),
            "cost_usd": None if any(c is None for c in costs) else sum(costs),
            "wall_hours_if_parallel": max(e.wall_hours for e in ests),
            "wall_hours_if_sequential": sum(e.wall_hours for e in ests),
        }

    def to_dict(self) -> dict:
        return {"parts": [{"name": n, **e.to_dict()} for n, e in self.parts], "totals": self.totals}


def estimate_fleet(
    parts: list[dict],
    *,
    accelerator: str = "H100-SXM",
    mfu: float = DEFAULT_MFU,
    dtype: str = "auto",
    price_per_hour: float | None = None,
    pue: float = DEFAULT_PUE,
    carbon_intensity: float = DEFAULT_CARBON_INTENSITY,
) -> FleetEstimate:
    """Cost a mixed fleet: each part (from `parse_fleet_part`) has its own GPU type, GPU-hours or
    FLOPs, power, GPU count, MFU and price; the others come from the arguments."""
    if not parts:
        raise ConfigError("a fleet needs at least one part")
    out = []
    for i, p in enumerate(parts):
        n = p.get("n", 1)
        if n != int(n) or n < 1:
            raise ConfigError(f"part {i + 1}: n={n!r} must be a positive integer")
        est = estimate_cost(
            p.get("flops"),
            gpu_hours=p.get("hours"),
            accelerator=p.get("gpu", accelerator),
            n_gpus=int(n),
            mfu=p.get("mfu", mfu),
            dtype=dtype,
            price_per_hour=p.get("price", price_per_hour),
            power_watts=p.get("watts"),
            pue=pue,
            carbon_intensity=carbon_intensity,
        )
        out.append((p.get("name") or f"part {i + 1}", est))
    return FleetEstimate(out)
