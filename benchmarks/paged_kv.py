"""The serve engine's paged K/V cache against the slot cache: throughput and the K/V memory held.

    python benchmarks/paged_kv.py                     # CPU, 1 thread
    python benchmarks/paged_kv.py --device cuda --threads 4 --rounds 5
    python benchmarks/paged_kv.py --plain             # the model's own forward, not the fused path

Model: random weights, d_model 192, 4 layers, 6 heads (2 KV heads), vocab 4096 (the default
pipeline's widths), a 512-position context (the engine's context, so the slot cache holds
max_batch x 512 positions). Workloads, every request greedy or seeded, stops off:
- batch B in (1, 8, 32): B distinct prompts of 48..176 tokens, `--new` new tokens each, an engine
  with max_batch B (all in flight at once);
- grpo: 16 prompts x 8 samples (seeded, temperature 1), max_batch 128, shared prefill on: the 8
  samples of a prompt share its prefill (slot: copied K/V rows; paged: shared prompt blocks).
Reported per workload and cache: generated tokens/s (wall time of `Engine.generate`, prefill
included; the best of `--rounds` rounds, slot and paged alternating), the K/V bytes allocated,
and for the paged cache the bytes of the most blocks in use at once (`kv_blocks_peak`, + the
scratch block). Two more configurations at the paged cache's peak memory: "paged, pool = peak"
(the pool cut to that peak) and "slot, same memory" (a slot cache of as many rows as those bytes
hold, so fewer requests in flight). Every configuration must give the slot cache's tokens.
"""

from __future__ import annotations

import argparse
import time

import torch

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.serve.engine import Engine, GenParams

CONTEXT = 512
BLOCK = 16


def workload(name: str, new: int) -> tuple[list[list[int]], list[GenParams], int]:
    g = torch.Generator().manual_seed(0)
    if name == "grpo":
        prompts, params = [], []
        for p in range(16):
            ids = torch.randint(
                3, 4096, (int(torch.randint(48, 177, (1,), generator=g)),), generator=g
            ).tolist()
            for s in range(8):
                prompts.append(ids)
                params.append(GenParams(max_tokens=new, temperature=1.0, seed=p * 8 + s))
        return prompts, params, 128
    b = int(name)
    lens = torch.randint(48, 177, (b,), generator=g).tolist()
    prompts = [torch.randint(3, 4096, (n,), generator=g).tolist() for n in lens]
    return prompts, [GenParams(max_tokens=new, temperature=0)] * b, b


def run(model, kind: str, prompts, params, max_batch: int, fast: bool, kv_blocks=None):
    eng = Engine(
        model,
        None,
        stop_token_ids=[],
        max_batch=max_batch,
        max_queue=len(prompts),
        fast_path=fast,
        kv_cache=kind,
        block_size=BLOCK,
        kv_blocks=kv_blocks,
    )
    with eng:
        t = time.perf_counter()
        outs = eng.generate(prompts, params)
        dt = time.perf_counter() - t
        stats = eng.stats()
    tokens = sum(len(o.token_ids) for o in outs)
    if kind == "paged":
        held = eng.cache.bytes()
        per_block = held / eng.cache.n_blocks
        peak = stats["kv_blocks_peak"]
        peak_bytes = int((peak + 1) * per_block)  # + the scratch block
    else:
        held = sum(t.numel() * t.element_size() for t in (*eng.cache.k, *eng.cache.v))
        peak, peak_bytes = None, held
    return tokens / dt, held, peak, peak_bytes, [o.token_ids for o in outs]


def mib(b: float) -> str:
    return f"{b / 2**20:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=64, help="new tokens per request")
    ap.add_argument("--plain", action="store_true", help="the model's own forward (no fused fast path)")
    ap.add_argument("--workloads", default="1,8,32,grpo")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=4096, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, max_seq_len=CONTEXT)
    model = Transformer(cfg).eval().to(a.device)
    fast = not a.plain
    print(
        f"device {a.device}, threads {a.threads}, {'plain forward' if a.plain else 'fused fast path'}, "
        f"{a.new} new tokens per request, block size {BLOCK}, best of {a.rounds} rounds"
    )
    print("| workload | cache | tokens/s | vs slot | K/V allocated MiB | K/V peak in use MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for name in a.workloads.split(","):
        prompts, params, max_batch = workload(name, a.new)
        # a first paged run (also the warm-up) gives the peak blocks in use: the pool of "paged,
        # pool = peak", and the rows of a slot cache that holds the same bytes ("slot, same memory")
        *_, peak, peak_bytes, _ = run(model, "paged", prompts, params, max_batch, fast)
        row_bytes = kv_row_bytes(model)
        same_rows = max(1, min(max_batch, int(peak_bytes // row_bytes)))
        label = f"batch {name}" if name != "grpo" else "grpo 16x8"
        configs = {
            "slot": ("slot", max_batch, None),
            "paged": ("paged", max_batch, None),
            f"paged, pool = peak ({peak} blocks)": ("paged", max_batch, peak + 1),
        }
        if same_rows < max_batch:
            configs[f"slot, same memory ({same_rows} rows)"] = ("slot", same_rows, None)
        best: dict[str, float] = {}
        info: dict[str, tuple] = {}
        for _ in range(a.rounds):
            for key, (kind, rows, blocks) in configs.items():
                tps, held, _, used, toks = run(model, kind, prompts, params, rows, fast, kv_blocks=blocks)
                best[key] = max(best.get(key, 0.0), tps)
                info[key] = (held, used, toks)
        for key in configs:
            held, used, toks = info[key]
            assert toks == info["slot"][2], f"{name}, {key}: tokens differ from the slot cache's"
            ratio = best[key] / best["slot"]
            print(f"| {label} | {key} | {best[key]:,.0f} | {ratio:.2f} | {mib(held)} | {mib(used)} |")


def kv_row_bytes(model) -> int:
    """K/V bytes of one slot-cache row (a whole context)."""
    cfg = model.cfg
    return 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * CONTEXT * next(model.parameters()).element_size()


if __name__ == "__main__":
    main()
