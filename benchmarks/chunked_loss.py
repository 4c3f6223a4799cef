"""Pretraining loss with the whole [tokens, vocab] logits vs the chunked output projection.

`Transformer.forward(x, targets=y)` runs the output head + cross-entropy in checkpointed chunks
once the fp32 logits of a step would pass `model/output.py: LOGITS_BUDGET` (1 GiB). This script
times one training step (forward + backward) and reads the peak memory of each variant, each in
a fresh process (peak RSS on CPU is per process; `max_memory_allocated` on CUDA):

- `whole`: the budget raised so the logits are computed whole (what pretraining did before);
- `chunked`: the default budget.

    python benchmarks/chunked_loss.py                      # CPU: d 256, 2 layers, vocab 50304, 8 x 2048
    python benchmarks/chunked_loss.py --device cuda --d-model 768 --layers 12 --batch 8 --seq 2048
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def one(variant: str, a) -> dict:
    import lmforge.model.output as output
    from lmforge.model import ModelConfig, Transformer

    if variant == "whole":
        output.LOGITS_BUDGET = 1 << 62
    dev = torch.device(a.device)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=a.vocab,
        d_model=a.d_model,
        n_layers=a.layers,
        n_heads=max(a.d_model // 64, 1),
        max_seq_len=a.seq,
    )
    model = Transformer(cfg).to(dev).train()
    x = torch.randint(0, a.vocab, (a.batch, a.seq), device=dev)
    y = torch.randint(0, a.vocab, (a.batch, a.seq), device=dev)
    amp = torch.bfloat16 if dev.type == "cuda" else None
    times = []
    for i in range(a.warmup + a.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
            if i == a.warmup:
                torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(x, targets=y) / y.numel()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {"variant": variant, "step_s": min(times), "loss": float(loss.detach()), "peak_gib": peak}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a._one:
        print(json.dumps(one(a._one, a)))
        return []
    rows = []
    args = list(argv if argv is not None else sys.argv[1:])
    for variant in ("whole", "chunked"):
        r = subprocess.run(
            [sys.executable, __file__, *args, "--_one", variant], capture_output=True, text=True
        )
        if r.returncode:
            raise SystemExit(r.stderr)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    base = rows[0]
    tokens = a.batch * a.seq
    print(f"{tokens} tokens/step, vocab {a.vocab}, fp32 logits {tokens * a.vocab * 4 / 2**30:.2f} GiB")
    for r in rows:
        print(
            f"{r['variant']:>8}: step {r['step_s']:.3f} s ({r['step_s'] / base['step_s']:.2f}x), "
            f"peak {r['peak_gib']:.2f} GiB ({r['peak_gib'] / base['peak_gib']:.2f}x), loss {r['loss']:.4f}"
        )
    return rows


if __name__ == "__main__":
    main()
