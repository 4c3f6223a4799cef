"""What a training run costs: GPU-hours, wall time, money, energy and CO2.

Everything here is arithmetic on a few public figures, so every figure names its source:

    GPU-hours = FLOPs / (peak FLOP/s x MFU) / 3600          (or given directly)
    wall time = GPU-hours / K GPUs                           (perfect scaling; MFU absorbs the rest)
    cost      = GPU-hours x price per GPU-hour
    energy    = GPU-hours x power (W) x PUE / 1000          kWh (GPU power only, as Meta reports)
    CO2       = energy x grid carbon intensity               tCO2e

The energy model is the one Meta used for LLaMA / Llama 2 (Touvron et al. 2023, "LLaMA",
arXiv:2302.13971, Sec. 6; Llama 2, arXiv:2307.09288, Table 2): GPU power = its TDP, PUE 1.1,
0.385 kgCO2e/kWh (US national average). It ignores CPUs, networking, idle time and embodied
emissions, so it is a floor, not an audit.

Peak figures are *dense* (no 2:4 sparsity) tensor-core FLOP/s. NVIDIA datasheets print the
sparse number with an asterisk; the dense one is half of it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from lmforge.errors import ConfigError

# ----------------------------------------------------------------------------- defaults
# Model FLOPs utilization a well-tuned large run reaches: PaLM 540B 46.2% (Chowdhery et al.
# 2022, arXiv:2204.02311, Table 3); Llama 3 405B 38-43% on H100 (Llama 3 Herd of Models,
# arXiv:2407.21783, Table 4). Small models and single GPUs often reach less.
DEFAULT_MFU = 0.40
# Power usage effectiveness and carbon intensity used by Meta for LLaMA and Llama 2
# (Touvron et al. 2023, arXiv:2302.13971, Sec. 6: PUE 1.1, US average 0.385 kgCO2e/kWh).
DEFAULT_PUE = 1.1
DEFAULT_CARBON_INTENSITY = 0.385  # kgCO2e per kWh

HOURS_PER_YEAR = 24 * 365


@dataclass(frozen=True)
class Accelerator:
    """One accelerator model. FLOP/s are dense tensor-core peaks per device."""

    name: str
    bf16_flops: float | None  # None: no bf16 tensor cores
    fp16_flops: float
    tdp_watts: float
    memory_gb: float
    price_per_hour: float | None  # USD per GPU-hour, indicative on-demand list price
    source: str
    price_source: str = ""
    aliases: tuple[str, ...] = field(default=())


_AWS = "AWS EC2 on-demand list price, us-east-1, 2024 (instance price / 8 GPUs)"
_T = 1e12

# Sources: NVIDIA / AMD product datasheets. Dense = datasheet "with sparsity" figure / 2.
CATALOGUE: dict[str, Accelerator] = {
    a.name: a
    for a in [
        Accelerator(
            "V100-SXM2",
            None,
            125 * _T,
            300,
            32,
            24.48 / 8,
            "NVIDIA Tesla V100 datasheet (SXM2): 125 TFLOPS fp16 tensor, 300 W",
            _AWS + ": p3.16xlarge $24.48/h",
            ("v100", "v100-sxm", "tesla-v100"),
        ),
        Accelerator(
            "V100-PCIe",
            None,
            112 * _T,
            250,
            32,
            None,
            "NVIDIA Tesla V100 datasheet (PCIe): 112 TFLOPS fp16 tensor, 250 W",
        ),
        Accelerator(
            "A100-SXM-40GB",
            312 * _T,
            312 * _T,
            400,
            40,
            32.77 / 8,
            "NVIDIA A100 datasheet: bf16/fp16 tensor 312 TFLOPS (624 sparse), SXM 400 W",
            _AWS + ": p4d.24xlarge $32.77/h",
            ("a100-40gb", "a100-sxm4-40gb"),
        ),
        Accelerator(
            "A100-SXM-80GB",
            312 * _T,
            312 * _T,
            400,
            80,
            40.97 / 8,
            "NVIDIA A100 datasheet: bf16/fp16 tensor 312 TFLOPS (624 sparse), SXM 400 W",
            _AWS + ": p4de.24xlarge $40.97/h",
            ("a100", "a100-80gb", "a100-sxm", "a100-sxm4-80gb"),
        ),
        Accelerator(
            "A100-PCIe-80GB",
            312 * _T,
            312 * _T,
            300,
            80,
            None,
            "NVIDIA A100 datasheet: bf16/fp16 tensor 312 TFLOPS, PCIe 300 W",
            "",
            ("a100-pcie",),
        ),
        Accelerator(
            "H100-SXM",
            989.4 * _T,
            989.4 * _T,
            700,
            80,
            98.32 / 8,
            "NVIDIA H100 datasheet (SXM5): bf16/fp16 1,979 TFLOPS with sparsity, up to 700 W",
            _AWS + ": p5.48xlarge $98.32/h (AWS cut P5 prices in June 2025)",
            ("h100", "h100-sxm5", "h100-80gb"),
        ),
        Accelerator(
            "H100-PCIe",
            756.5 * _T,
            756.5 * _T,
            350,
            80,
            None,
            "NVIDIA H100 datasheet (PCIe): bf16/fp16 1,513 TFLOPS with sparsity, 300-350 W",
        ),
        Accelerator(
            "H100-NVL",
            835.5 * _T,
            835.5 * _T,
            400,
            94,
            None,
            "NVIDIA H100 datasheet (NVL): bf16/fp16 1,671 TFLOPS with sparsity, 350-400 W",
        ),
        Accelerator(
            "H200-SXM",
            989.4 * _T,
            989.4 * _T,
            700,
            141,
            None,
            "NVIDIA H200 datasheet (SXM): bf16/fp16 1,979 TFLOPS with sparsity, up to 700 W",
            "",
            ("h200", "h200-sxm5"),
        ),
        Accelerator(
            "H200-NVL",
            835.5 * _T,
            835.5 * _T,
            600,
            141,
            None,
            "NVIDIA H200 datasheet (NVL): bf16/fp16 1,671 TFLOPS with sparsity, up to 600 W",
        ),
        Accelerator(
            "B200",
            2250 * _T,
            2250 * _T,
            1000,
            180,
            None,
            "NVIDIA HGX B200 datasheet: bf16/fp16 4.5 PFLOPS per GPU with sparsity, 1000 W",
            "",
            ("b200-hgx",),
        ),
        Accelerator(
            "MI300X",
            1307.4 * _T,
            1307.4 * _T,
            750,
            192,
            None,
            "AMD Instinct MI300X datasheet: bf16/fp16 1,307.4 TFLOPS dense, 750 W board power",
        ),
        Accelerator(
            "RTX-4090",
            165.2 * _T,
            165.2 * _T,
            450,
            24,
            None,
            "NVIDIA Ada Lovelace architecture whitepaper, Appendix A: bf16/fp16 tensor with "
            "fp32 accumulate 165.2 TFLOPS dense; 450 W total graphics power",
            "",
            ("4090",),
        ),
    ]
}


def _key(s: str) -> str:
    return s.strip().lower().replace("_", "-").replace(" ", "-")


_INDEX: dict[str, str] = {}
for _a in CATALOGUE.values():
    _INDEX[_key(_a.name)] = _a.name
    for _alias in _a.aliases:
        _INDEX[_key(_alias)] = _a.name


def get_accelerator(name: str | Accelerator) -> Accelerator:
    """Look an accelerator up by catalogue name or alias (case-insensitive): 'h100', 'A100-80GB'."""
    if isinstance(name, Accelerator):
        return name
    hit = _INDEX.get(_key(name))
    if hit is None:
        raise ConfigError(
            f"unknown accelerator {name!r}; known: {', '.join(CATALOGUE)} "
            "(or pass the effective FLOP/s yourself: --effective-tflops)"
        )
    return CATALOGUE[hit]


def match_device_name(device_name: str | None) -> Accelerator | None:
    """Map a driver's device name (torch.cuda.get_device_name()) to the catalogue, or None.

    'NVIDIA H100 80GB HBM3' -> H100-SXM, 'NVIDIA A100-SXM4-40GB' -> A100-SXM-40GB,
    'NVIDIA H100 PCIe' -> H100-PCIe, 'AMD Instinct MI300X' -> MI300X. Unknown names give None,
    so callers (the trainer's MFU log) just skip MFU.
    """
    if not device_name:
        return None
    s = device_name.upper().replace("_", " ").replace("-", " ")
    pcie, nvl = "PCIE" in s, "NVL" in s
    if "H200" in s:
        return CATALOGUE["H200-NVL" if nvl else "H200-SXM"]
    if "H100" in s:
        return CATALOGUE["H100-NVL" if nvl else "H100-PCIe" if pcie else "H100-SXM"]
    if "A100" in s:
        if pcie:
            return CATALOGUE["A100-PCIe-80GB"]
        return CATALOGUE["A100-SXM-40GB" if "40GB" in s.replace(" ", "") else "A100-SXM-80GB"]
    if "V100" in s:
        return CATALOGUE["V100-PCIe" if pcie else "V100-SXM2"]
    if "B200" in s:
        return CATALOGUE["B200"]
    if "MI300X" in s:
        return CATALOGUE["MI300X"]
    if "4090" in s:
        return CATALOGUE["RTX-4090"]
    return None


def peak_flops(accelerator: str | Accelerator, dtype: str = "auto") -> float:
    """Dense peak FLOP/s of one device for `dtype` in {'bf16', 'fp16', 'auto'}.

    'auto' is bf16 where the device has bf16 tensor cores, else fp16 (V100).
    """
    acc = get_accelerator(accelerator)
    dtype = dtype.lower()
    if dtype == "auto":
        return acc.bf16_flops or acc.fp16_flops
    if dtype in ("bf16", "bfloat16"):
        if acc.bf16_flops is None:
            raise ConfigError(f"{acc.name} has no bf16 tensor cores; use dtype fp16")
        return acc.bf16_flops
    if dtype in ("fp16", "float16", "half"):
        return acc.fp16_flops
    raise ConfigError(f"unknown dtype {dtype!r} for peak FLOP/s; use bf16, fp16 or auto")


def device_peak_flops(device_name: str | None, dtype: str = "auto") -> float | None:
    """Peak FLOP/s for a device name as the driver reports it, None when unknown (CPU, new GPU).

    Used by the trainer to log MFU: ``mfu(tok_per_s, flops_per_token, device_peak_flops(name))``.
    """
    acc = match_device_name(device_name)
    if acc is None:
        return None
    try:
        return peak_flops(acc, dtype)
    except ConfigError:
        return acc.fp16_flops


# ----------------------------------------------------------------------------- estimate
@dataclass
class CostEstimate:
    flops: float
    accelerator: str
    n_gpus: int
    effective_flops_per_gpu: float  # FLOP/s actually delivered per GPU (peak x MFU)
    mfu: float | None  # None when the effective rate was given directly
    gpu_hours: float
    wall_hours: float
    price_per_hour: float | None
    cost_usd: float | None
    power_watts: float
    pue: float
    kwh: float
    carbon_intensity: float  # kgCO2e/kWh
    tco2e: float
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_years(self) -> float:
        return self.gpu_hours / HOURS_PER_YEAR

    @property
    def wall_days(self) -> float:
        return self.wall_hours / 24

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gpu_years"] = self.gpu_years
        d["wall_days"] = self.wall_days
        return d


def _check_positive(name: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = float("nan")
    if not (math.isfinite(x) and (x >= 0 if allow_zero else x > 0)):
        raise ConfigError(
            f"{name} must be a {'non-negative' if allow_zero else 'positive'} finite number, got {value!r}"
        )


def estimate_cost(
    flops: float | None = None,
    *,
    gpu_hours: float | None = None,
    accelerator: str | Accelerator = "H100-SXM",
    n_gpus: int = 1,
    mfu: float = DEFAULT_MFU,
    effective_flops: float | None = None,
    dtype: str = "auto",
    price_per_hour: float | None = None,
    power_watts: float | None = None,
    pue: float = DEFAULT_PUE,
    carbon_intensity: float = DEFAULT_CARBON_INTENSITY,
) -> CostEstimate:
    """Cost, time, energy and CO2 of a run given its FLOPs *or* its GPU-hours.

    `effective_flops` (FLOP/s per GPU actually achieved) overrides peak x `mfu`.
    `price_per_hour` defaults to the catalogue's indicative price (None if it has none: the
    cost is then left out with a note). `power_watts` defaults to the accelerator's TDP.
    """
    if (flops is None) == (gpu_hours is None):
        raise ConfigError("give exactly one of flops or gpu_hours")
    acc = get_accelerator(accelerator)
    for name, v in (
        ("flops", flops),
        ("gpu_hours", gpu_hours),
        ("effective_flops", effective_flops),
        ("price_per_hour", price_per_hour),
        ("power_watts", power_watts),
        ("pue", pue),
    ):
        _check_positive(name, v)
    _check_positive("carbon_intensity", carbon_intensity, allow_zero=True)
    if not isinstance(n_gpus, int) or n_gpus < 1:
        raise ConfigError(f"n_gpus must be a positive integer, got {n_gpus!r}")
    notes: list[str] = []
    if effective_flops is None:
        if not (0 < mfu <= 1):
            raise ConfigError(f"mfu must be in (0, 1], got {mfu!r} (it is a fraction of peak)")
        eff = peak_flops(acc, dtype) * mfu
        used_mfu: float | None = mfu
    else:
        eff, used_mfu = float(effective_flops), None
    if flops is None:
        assert gpu_hours is not None  # exactly one of the two, checked above
        flops = gpu_hours * 3600.0 * eff
    else:
        gpu_hours = flops / eff / 3600.0
    price = price_per_hour if price_per_hour is not None else acc.price_per_hour
    if price is None:
        notes.append(f"no price for {acc.name} in the catalogue; pass a price per GPU-hour")
    elif price_per_hour is None:
        notes.append(
            f"price ${price:.2f}/GPU-h is an indicative list price ({acc.price_source}); pass your own"
        )
    power = float(power_watts if power_watts is not None else acc.tdp_watts)
    kwh = gpu_hours * power * pue / 1000.0
    return CostEstimate(
        flops=float(flops),
        accelerator=acc.name,
        n_gpus=n_gpus,
        effective_flops_per_gpu=eff,
        mfu=used_mfu,
        gpu_hours=float(gpu_hours),
        wall_hours=float(gpu_hours) / n_gpus,
        price_per_hour=price,
        cost_usd=None if price is None else gpu_hours * price,
        power_watts=power,
        pue=pue,
        kwh=kwh,
        carbon_intensity=carbon_intensity,
        tco2e=kwh * carbon_intensity / 1000.0,
        notes=notes,
    )


def catalogue_rows() -> list[dict]:
    """The catalogue as plain rows (for `lmforge scaling cost --list-gpus`)."""
    return [
        {
            "name": a.name,
            "bf16_tflops": a.bf16_flops and a.bf16_flops / _T,
            "fp16_tflops": a.fp16_flops / _T,
            "tdp_watts": a.tdp_watts,
            "memory_gb": a.memory_gb,
            "price_per_hour": a.price_per_hour,
            "source": a.source,
            "price_source": a.price_source,
        }
        for a in CATALOGUE.values()
    ]
