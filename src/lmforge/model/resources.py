"""Memory estimates from a model config, checked before anything the config sizes is allocated.

A typo in a config (`d_model=600000000`, `max_position_embeddings: 1e10`, `num_hidden_layers:
1e6` in a downloaded config.json) must not become a 1.8 TB allocation that dies with a
RuntimeError deep inside torch, a swap storm, or a constructor that builds a million layers
for an hour. So the sizes are computed first, from the config alone, in closed form:

* **weights**: `ModelConfig.param_count()` x bytes per parameter;
* **gradients and optimizer state** (training): one gradient per parameter, AdamW keeps two
  fp32 moments, Muon one momentum buffer (its AdamW part is ignored: a lower bound);
* **activations** (training, no recomputation): per token and layer the tensors autograd keeps
  for backward -- norms, q/k/v, attention output, the SwiGLU gate/up/product (about
  10 d_model + 4 d_ff values) -- plus the fp32 logits, their softmax and its gradient;
* **RoPE tables**: cos and sin, fp32 [positions, head_dim], and the temporaries that build them;
* **KV cache** (generation): keys and values per layer for every cached token.

`check_fits` refuses an estimate larger than the device's total memory (host RAM for the CPU,
the GPU's memory for CUDA) with a `ConfigError` naming the part, the config keys that size it
and the figure; an estimate above what is free right now is only a warning (other processes
come and go). The figures are estimates -- allocator overhead, fragmentation and framework
buffers are not counted -- so they catch the impossible, not the merely tight.

Time is estimated the same way, before the model is built: the FLOPs of one optimizer step
(`ModelConfig.flops_per_token`, i.e. 6N plus attention, the accounting `lmforge.scaling.flops`
explains, x the tokens of a step) divided by the device's matmul throughput, measured once per
process by a ~50 ms probe (`matmul_flops_per_s`). Training reaches only part of a bare matmul's
rate (attention, norms, the optimizer, data loading, Python; tiny models mostly pay overhead), so
the estimate is usually below the real time (a frozen LoRA base, which skips weight gradients,
errs the other way): good to an order of magnitude, enough to refuse a run of years
(`check_time`, when `run.max_hours` is set) and to tell minutes from hours. The manifest keeps
it next to the measured time of the stage (which includes loading, evaluation and saving).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from .config import ModelConfig


@dataclass
class Part:
    name: str
    bytes: float  # float: absurd configs overflow nothing
    keys: str  # the config keys that size it, for the message


@dataclass
class MemoryEstimate:
    parts: list[Part] = field(default_factory=list)

    def add(self, name: str, nbytes: float, keys: str) -> MemoryEstimate:
        self.parts.append(Part(name, float(nbytes), keys))
        return self

    @property
    def total(self) -> float:
        return sum(p.bytes for p in self.parts)

    def largest(self) -> Part:
        return max(self.parts, key=lambda p: p.bytes)

    def describe(self) -> str:
        return ", ".join(f"{p.name} {human_bytes(p.bytes)}" for p in self.parts)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:.3g} PB"  # pragma: no cover


def _params(cfg: ModelConfig) -> float:
    """param_count in float arithmetic (Python ints would be exact but huge is fine either way)."""
    return float(cfg.param_count())


def rope_bytes(cfg: ModelConfig, positions: int | None = None) -> float:
    """cos + sin fp32 tables, plus the arange/outer/cat temporaries alive while they are built."""
    n = float(positions or cfg.max_seq_len)
    return 4.0 * n * (1 + cfg.head_dim / 2 + 3 * cfg.head_dim)


def kv_cache_bytes(cfg: ModelConfig, tokens: int, dtype_bytes: int = 2) -> float:
    """Keys and values of every layer for `tokens` cached positions (all sequences together)."""
    return 2.0 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * float(tokens) * dtype_bytes


def inference_memory(
    cfg: ModelConfig,
    *,
    dtype_bytes: int = 4,
    kv_tokens: int = 0,
    keys: dict[str, str] | None = None,
) -> MemoryEstimate:
    """Weights + RoPE tables (+ a KV cache of `kv_tokens` positions): loading a model folder."""
    k = {"weights": "hidden_size, num_hidden_layers, vocab_size", "rope": "max_position_embeddings"}
    k.update(keys or {})
    est = MemoryEstimate()
    est.add("weights", _params(cfg) * dtype_bytes, k["weights"])
    est.add("RoPE tables", rope_bytes(cfg), k["rope"])
    if kv_tokens:
        est.add("KV cache", kv_cache_bytes(cfg, kv_tokens, dtype_bytes), k.get("kv", "max tokens"))
    return est


def training_memory(
    cfg: ModelConfig,
    *,
    batch_size: int,
    seq_len: int,
    optimizer: str = "adamw",
    act_bytes: int = 4,
    prefix: str = "pretrain",
) -> MemoryEstimate:
    """Weights, gradients, optimizer state, activations and logits of one micro-batch, RoPE."""
    p = _params(cfg)
    shape = f"{prefix}.model.d_model={cfg.d_model}, {prefix}.model.n_layers={cfg.n_layers}"
    tokens = float(batch_size) * seq_len
    per_token_layer = 10.0 * cfg.d_model + 4.0 * cfg.ff_dim
    moments = 2 if optimizer == "adamw" else 1
    est = MemoryEstimate()
    est.add("weights", 4 * p, shape + f", vocab {cfg.vocab_size}")
    est.add("gradients", 4 * p, shape)
    est.add(f"{optimizer} state", 4 * moments * p, shape + f", {prefix}.optimizer")
    est.add(
        "activations",
        tokens * cfg.n_layers * per_token_layer * act_bytes,
        f"{prefix}.batch_size={batch_size}, {prefix}.seq_len={seq_len}, {prefix}.model.d_model",
    )
    est.add("logits", 3 * 4 * tokens * cfg.vocab_size, f"{prefix}.batch_size x {prefix}.seq_len x vocab")
    est.add("RoPE tables", rope_bytes(cfg, seq_len), f"{prefix}.seq_len={seq_len}")
    return est


def _meminfo(field_name: str) -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def device_memory(device: torch.device | str | None = None) -> tuple[int, int | None, str]:
    """(total, free or None, description) of the memory `device` allocates from."""
    device = torch.device(device or "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        return int(total), int(free), f"{torch.cuda.get_device_name(device)} memory"
    total = _meminfo("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total), _meminfo("MemAvailable"), "host RAM"


def check_fits(
    est: MemoryEstimate, device: torch.device | str | None, where: str, limit: int | None = None
) -> None:
    """Refuse an estimate above the device's total memory (or `limit`), naming the largest part
    and its config keys; warn when it exceeds the memory free right now."""
    total, free, what = device_memory(device) if limit is None else (limit, None, "the limit")
    need = est.total
    if need > total:
        big = est.largest()
        raise ConfigError(
            f"{where}: needs about {human_bytes(need)} ({est.describe()}), more than the "
            f"{human_bytes(total)} of {what}; the largest part, {big.name} "
            f"({human_bytes(big.bytes)}), is sized by {big.keys}: lower it"
        )
    if free is not None and need > free:
        warnings.warn(
            f"{where}: needs about {human_bytes(need)} ({est.describe()}) but only "
            f"{human_bytes(free)} of {what} is free now; it may run out of memory",
            stacklevel=2,
        )


def check_model_folder(cfg: ModelConfig, weight_bytes: int | None, source: str) -> None:
    """Before building the model of a folder's config.json: its weights and RoPE tables must fit
    host RAM (they are read there first), and the config must not promise far more parameters
    than the weight files hold (`num_hidden_layers: 1e6` would otherwise build a million layers
    before the shapes are compared)."""
    keys = {
        "weights": f"hidden_size={cfg.d_model}, num_hidden_layers={cfg.n_layers}, vocab_size={cfg.vocab_size}",
        "rope": f"max_position_embeddings={cfg.max_seq_len}",
    }
    if weight_bytes is not None and _params(cfg) > 2 * max(weight_bytes, 1):
        raise ConfigError(
            f"{source}: describes {_params(cfg):.3g} parameters ({keys['weights']}) but the weight "
            f"files hold only {human_bytes(weight_bytes)}; the config does not belong to these "
            f"weights or one of its sizes is wrong"
        )
    check_fits(inference_memory(cfg, dtype_bytes=2, keys=keys), "cpu", source)


# ----------------------------------------------------------------------------- time
PROBE_SECONDS = 0.05
_probes: dict[tuple, float] = {}


def training_flops_per_step(cfg: ModelConfig, tokens_per_step: float, seq_len: int | None = None) -> float:
    """FLOPs of one optimizer step over `tokens_per_step` tokens in rows of `seq_len`: forward +
    backward = 3 x (2 x matmul parameters + 4 x n_layers x seq_len x d_attn) per token."""
    return cfg.flops_per_token(seq_len, training=True) * float(tokens_per_step)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_flops_per_s(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> float:
    """The matmul throughput of `device` in FLOP/s, measured by square matmuls for about
    `PROBE_SECONDS`; once per process for each (device, dtype, CPU thread count)."""
    device = torch.device(device or "cpu")
    key = (str(device), dtype, torch.get_num_threads())
    if key not in _probes:
        n = 256 if device.type == "cpu" else 2048
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up: kernels chosen, memory touched
        _sync(device)
        reps, t0 = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            if reps % 4 == 0:
                _sync(device)
                elapsed = time.perf_counter() - t0
                if elapsed >= PROBE_SECONDS:
                    break
        _probes[key] = 2.0 * n**3 * reps / elapsed
    return _probes[key]


def human_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 1 else f"{seconds:.2g} s"
    for unit, size in (("min", 60), ("h", 3600), ("days", 86400)):
        if seconds < 90 * size or unit == "days" and seconds < 3 * 365 * 86400:
            return f"{seconds / size:,.1f} {unit}" if unit != "min" else f"{seconds / size:,.0f} min"
    return f"{seconds / (365 * 86400):,.3g} years"


def human_flops(n: float) -> str:
    for unit in ("FLOP", "kFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP", "EFLOP"):
        if abs(n) < 1000 or unit == "EFLOP":
            return f"{n:,.1f} {unit}" if n < 1e21 else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} EFLOP"  # pragma: no cover


@dataclass
class TimeEstimate:
    steps: int
    flops_per_step: float
    flops_per_s: float  # the device's measured matmul rate
    devices: int = 1  # data-parallel processes sharing each step

    @property
    def seconds(self) -> float:
        per_step = self.flops_per_step / max(self.devices, 1) / max(self.flops_per_s, 1.0)
        return self.steps * per_step if math.isfinite(per_step) else math.inf

    def describe(self) -> str:
        """One line: '~12 min for 1,000 steps (~0.7 s/step, 4.1 TFLOP per step at ~6 GFLOP/s measured)'."""
        per = f" on each of {self.devices} devices" if self.devices > 1 else ""
        return (
            f"~{human_duration(self.seconds)} for {self.steps:,} steps "
            f"(~{human_duration(self.seconds / max(self.steps, 1))}/step, {human_flops(self.flops_per_step)} per "
            f"step at ~{human_flops(self.flops_per_s)}/s measured{per})"
        )

    def to_dict(self) -> dict:
        return {
            "seconds": round(self.seconds, 3) if math.isfinite(self.seconds) else None,
            "steps": self.steps,
            "flops_per_step": self.flops_per_step,
            "flops_per_s": round(self.flops_per_s),
            "devices": self.devices,
        }


def estimate_training_time(
    cfg: ModelConfig,
    *,
    steps: int,
    tokens_per_step: float,
    seq_len: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    devices: int = 1,
) -> TimeEstimate:
    """The time of `steps` optimizer steps of `tokens_per_step` tokens each (all processes
    together; `devices` share them) on `device`, from FLOPs and the measured matmul rate."""
    flops = training_flops_per_step(cfg, tokens_per_step, seq_len)
    return TimeEstimate(int(steps), flops, matmul_flops_per_s(device, dtype), devices)


def check_time(est: TimeEstimate, max_hours: float | None, where: str, keys: str) -> None:
    """Refuse an estimate above `max_hours` (run.max_hours; None: no limit), naming the keys."""
    if max_hours is None or est.seconds <= max_hours * 3600:
        return
    raise ConfigError(
        f"{where}: estimated time {est.describe()} exceeds run.max_hours={max_hours:g}; lower {keys}, "
        f"or raise run.max_hours"
    )
