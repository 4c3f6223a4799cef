"""GPU pretraining speed: lmforge `Transformer` vs Hugging Face `LlamaForCausalLM`, eager and
under `torch.compile`, bf16 autocast, fused AdamW; tokens/s, MFU and peak memory.

Shapes (Llama-style: RoPE, SwiGLU, RMSNorm, tied embeddings, vocab 50304 = 50257 padded to a
multiple of 64, sequence 1024):
- `124m`: GPT-2 small size, d_model 768, 12 layers, 12 heads (124.5M parameters);
- `350m`: GPT-2 medium size, d_model 1024, 24 layers, 16 heads (355M);
- `tiny`: d_model 64, 2 layers, vocab 512, sequence 64, for a CPU smoke test (`--tiny`).

Every contender starts from the same weights (lmforge's state dict loaded into the HF model,
built from lmforge's own HF config with `attn_implementation="sdpa"`), sees the same batches
and runs the same step: forward under autocast, fp32 cross-entropy, backward, grad-norm clip
1.0, `lmforge.train.optim.build_optimizer` (fused AdamW on CUDA, or `--optimizer muon`),
`zero_grad(set_to_none=True)`. After a warm-up (which includes compilation) the contenders
are timed interleaved, `--rounds` rounds of `--steps` steps each, alternating who goes first,
so a noisy or throttling device affects all of them alike; figures are medians over rounds.

- FLOPs per token: `lmforge.scaling.flops.flops_per_token(cfg, seq).training` (exact matmul
  count with attention, PaLM appendix B: 6N + 12*L*T*d per token);
- MFU = tokens/s x FLOPs per token / peak, against two peaks: the *measured* one (the best of
  several timed bf16 8192^3 matmuls on this device: what the device really does today, clocks
  and power limits included) and the datasheet one when the device is known
  (`lmforge.scaling.cost.device_peak_flops`: H100 SXM 989 TFLOPS dense bf16);
- peak memory: `torch.cuda.max_memory_allocated` during one step of that contender alone,
  minus what the other contenders hold, i.e. what a job training only this model needs (CUDA
  context and allocator caching excluded).

    python benchmarks/gpu_train.py                       # 124m, all four contenders
    python benchmarks/gpu_train.py --shape 350m --batch 8
    python benchmarks/gpu_train.py --compile on --no-hf  # lmforge compiled only
    python benchmarks/gpu_train.py --optimizer muon      # Muon for the hidden matrices
    python benchmarks/gpu_train.py --tiny --device cpu   # smoke test (what the test suite runs)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from lmforge.model.config import ModelConfig
from lmforge.model.hf import to_hf_config
from lmforge.model.transformer import Transformer
from lmforge.scaling.cost import device_peak_flops
from lmforge.scaling.flops import flops_per_token
from lmforge.train.optim import build_optimizer

SHAPES = {
    "124m": dict(d_model=768, n_layers=12, n_heads=12, vocab_size=50304, max_seq_len=1024),
    "350m": dict(d_model=1024, n_layers=24, n_heads=16, vocab_size=50304, max_seq_len=1024),
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, vocab_size=512, max_seq_len=64),
}
DEFAULT_BATCH = {"124m": 16, "350m": 8, "tiny": 4}
H100_SXM_BF16 = 989.4e12  # NVIDIA H100 SXM5 datasheet, dense bf16 (1,979 TFLOPS with sparsity)


@dataclass
class Contender:
    name: str
    model: torch.nn.Module
    forward: object
    opt: object
    hf: bool
    step_s: list[float] = field(default_factory=list)
    first_losses: list[float] = field(default_factory=list)
    compile_s: float = 0.0
    peak_bytes: int | None = None


def measure_peak_flops(
    device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 20
) -> float:
    """Best FLOP/s of an n x n x n matmul (8192 in bf16 on GPU, 1024 in fp32 on CPU)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    _sync(device)
    best = float("inf")
    reps = reps if device.type == "cuda" else 3
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(5 if device.type == "cuda" else 1):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / (5 if device.type == "cuda" else 1))
    return 2 * n**3 / best


def _fmt(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOPS" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOPS"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_models(cfg: ModelConfig, device: torch.device, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    lm = Transformer(cfg).to(device)
    hf_cfg = LlamaConfig(**to_hf_config(cfg), attn_implementation="sdpa")
    hf_cfg.use_cache = False
    hf = LlamaForCausalLM(hf_cfg).to(device)
    missing, unexpected = hf.load_state_dict(lm.state_dict(), strict=False)
    missing = [k for k in missing if "rotary" not in k and not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise SystemExit(
            f"weight copy into the HF model failed: missing {missing[:4]} unexpected {unexpected[:4]}"
        )
    return lm, hf


def clone_lmforge(lm: Transformer, device) -> Transformer:
    m = Transformer(lm.cfg).to(device)
    m.load_state_dict(lm.state_dict())
    return m


def clone_hf(hf, device):
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM(hf.config).to(device)
    m.load_state_dict(hf.state_dict())
    return m


def make_batches(cfg: ModelConfig, batch: int, seq: int, n: int, device, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(n):
        s = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
        out.append((s[:, :-1].contiguous().to(device), s[:, 1:].contiguous().to(device)))
    return out


def train_step(c: Contender, x, y, device, amp) -> torch.Tensor:
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        logits = c.forward(input_ids=x, use_cache=False).logits if c.hf else c.forward(x)
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(c.model.parameters(), 1.0)
    c.opt.step()
    c.opt.zero_grad(set_to_none=True)
    return loss.detach()


def resident_bytes(c: Contender) -> int:
    seen, n = set(), 0
    for p in c.model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel() * p.element_size()
    for st in c.opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                n += v.numel() * v.element_size()
    return n


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="124m")
    ap.add_argument("--tiny", action="store_true", help="= --shape tiny (CPU smoke test)")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument(
        "--batch", type=int, default=None, help="sequences per step (default: 16 for 124m, 8 for 350m)"
    )
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default: the shape's, 1024)")
    ap.add_argument(
        "--dtype",
        choices=["bf16", "fp32"],
        default=None,
        help="autocast dtype (default bf16 on CUDA, fp32 on CPU)",
    )
    ap.add_argument(
        "--compile",
        choices=["off", "on", "both"],
        default=None,
        help="torch.compile the models (default: both on CUDA, off on CPU)",
    )
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers contenders")
    ap.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw")
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument(
        "--warmup", type=int, default=3, help="untimed steps per contender (compilation happens here)"
    )
    ap.add_argument("--steps", type=int, default=10, help="timed steps per contender per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU torch threads (default 1 on CPU: on a small shared machine OpenMP threads wait "
        "on each other; 0 = torch's default)",
    )
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = ap.parse_args(argv)
    shape = "tiny" if a.tiny else a.shape
    device = torch.device(
        "cuda"
        if a.device == "auto" and torch.cuda.is_available()
        else ("cpu" if a.device == "auto" else a.device)
    )
    amp = {"bf16": torch.bfloat16, "fp32": None}[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    compile_mode = a.compile or ("both" if device.type == "cuda" else "off")
    threads = a.threads if a.threads is not None else (1 if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    kw = dict(SHAPES[shape])
    if a.seq:
        kw["max_seq_len"] = a.seq
    cfg = ModelConfig(**kw, tie_embeddings=True)
    seq, batch = cfg.max_seq_len, a.batch or DEFAULT_BATCH[shape]
    fpt = flops_per_token(cfg, seq)

    import transformers

    dev_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    print(
        f"# gpu_train  torch {torch.__version__}  transformers {transformers.__version__}  device {dev_name}"
    )
    measured = measure_peak_flops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    sheet = device_peak_flops(dev_name, "bf16") if device.type == "cuda" else None
    print(
        f"peak: measured {_fmt(measured)} ({'bf16 8192^3' if device.type == 'cuda' else 'fp32 1024^3'}"
        f" matmul, best of several)"
        + (f"; datasheet {_fmt(sheet)} dense bf16" if sheet else "; datasheet: device not in the catalogue")
        + f"  [reference: H100 SXM datasheet {H100_SXM_BF16 / 1e12:.0f} TFLOPS dense bf16]"
    )
    print(
        f"shape {shape}: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, d_ff {cfg.ff_dim}, "
        f"vocab {cfg.vocab_size}, seq {seq}, batch {batch} ({batch * seq:,} tokens/step), "
        f"{cfg.param_count() / 1e6:.1f}M params; {fpt.training / 1e9:.3f} GFLOP/token (training, with attention; "
        f"6N = {fpt.approx_6n / 1e9:.3f}); autocast {amp or 'off (fp32)'}; optimizer {a.optimizer}"
    )

    lm, hf = build_models(cfg, device, a.seed)
    ocfg = SimpleNamespace(
        optimizer=a.optimizer, lr=a.lr, muon_lr=None, weight_decay=0.1, beta1=0.9, beta2=0.95
    )
    compiles = {"off": [False], "on": [True], "both": [False, True]}[compile_mode]
    contenders: list[Contender] = []
    for kind in ["lmforge"] if a.no_hf else ["lmforge", "hf"]:
        for comp in compiles:
            base = lm if kind == "lmforge" else hf
            m = (
                base
                if not any(c.model is base for c in contenders)
                else (clone_lmforge(lm, device) if kind == "lmforge" else clone_hf(hf, device))
            )
            m.train()
            fwd = torch.compile(m) if comp else m
            contenders.append(
                Contender(
                    f"{kind}{'+compile' if comp else ''}", m, fwd, build_optimizer(m, ocfg), hf=kind == "hf"
                )
            )
    data = make_batches(cfg, batch, seq, max(a.warmup, 4), device, a.seed)

    # warm-up (compilation), one contender at a time: sanity losses and peak memory
    for c in contenders:
        t0 = time.perf_counter()
        for i in range(a.warmup):
            if device.type == "cuda" and i == a.warmup - 1:
                _sync(device)
                held_by_all = torch.cuda.memory_allocated(device)
                own = resident_bytes(c)
                torch.cuda.reset_peak_memory_stats(device)
            loss = train_step(c, *data[i % len(data)], device, amp)
            c.first_losses.append(float(loss))
            if device.type == "cuda" and i == a.warmup - 1:
                _sync(device)
                c.peak_bytes = torch.cuda.max_memory_allocated(device) - held_by_all + own
        _sync(device)
        c.compile_s = time.perf_counter() - t0
    ref = contenders[0].first_losses[0]
    tol = 5e-2 if amp is not None else 1e-3
    for c in contenders:
        ok = abs(c.first_losses[0] - ref) <= tol
        print(
            f"sanity: first-step loss {c.name:<16} {c.first_losses[0]:.4f}  "
            f"[{'OK' if ok else 'MISMATCH'} vs {contenders[0].name}]  warm-up {c.compile_s:.1f}s"
        )

    for r in range(a.rounds):
        order = contenders if r % 2 == 0 else contenders[::-1]
        for c in order:
            _sync(device)
            t0 = time.perf_counter()
            for i in range(a.steps):
                train_step(c, *data[i % len(data)], device, amp)
            _sync(device)
            c.step_s.append((time.perf_counter() - t0) / a.steps)

    tokens = batch * seq
    rows = []
    print(
        "\n| model | step (ms) | tokens/s | model TFLOPS | MFU (measured peak) | MFU (datasheet) | peak mem (GB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c in contenders:
        med = statistics.median(c.step_s)
        tps = tokens / med
        achieved = tps * fpt.training
        row = {
            "model": c.name,
            "step_ms": med * 1e3,
            "tokens_per_s": tps,
            "tflops": achieved / 1e12,
            "mfu_measured": achieved / measured,
            "mfu_datasheet": achieved / sheet if sheet else None,
            "peak_mem_gb": c.peak_bytes / 1e9 if c.peak_bytes is not None else None,
            "first_loss": c.first_losses[0],
            "warmup_s": c.compile_s,
            "rounds_ms": [s * 1e3 for s in c.step_s],
        }
        rows.append(row)
        mem = f"{row['peak_mem_gb']:.2f}" if row["peak_mem_gb"] is not None else "n/a"
        sheet_mfu = f"{row['mfu_datasheet']:.1%}" if sheet else "n/a"
        print(
            f"| {c.name} | {med * 1e3:.1f} | {tps:,.0f} | {achieved / 1e12:.3g} | {row['mfu_measured']:.1%} | "
            f"{sheet_mfu} | {mem} |"
        )
    base = {r["model"]: r for r in rows}
    for name in ("lmforge", "lmforge+compile"):
        other = "hf" + name.removeprefix("lmforge")
        if name in base and other in base:
            print(
                f"{name} vs {other}: {base[name]['tokens_per_s'] / base[other]['tokens_per_s']:.3f}x tokens/s"
            )
    result = {
        "device": dev_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shape": shape,
        "batch": batch,
        "seq": seq,
        "params": cfg.param_count(),
        "flops_per_token": fpt.training,
        "measured_peak_flops": measured,
        "datasheet_peak_flops": sheet,
        "autocast": str(amp),
        "optimizer": a.optimizer,
        "rows": rows,
    }
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
