"""How long a long prompt stalls the requests already decoding: the largest gap between two
tokens of a running request while a long prompt is admitted, with and without chunked prefill.

    python benchmarks/prefill_stall.py                       # CPU, 1 thread
    python benchmarks/prefill_stall.py --prompt 4000 --chunk 512 --rounds 5
    python benchmarks/prefill_stall.py --forward-only   # the prefill forwards alone, no engine

Model: random weights, d_model 192, 4 layers, 6 heads (2 KV heads), vocab 4096 (the default
pipeline's widths) with a context long enough for the prompt. Three short requests decode
greedily; once each has 8 tokens a prompt of `--prompt` tokens is submitted. Reported per mode
(median over rounds, wall ms): the largest inter-token gap of the short requests during the
long prompt's prefill, their median gap, and the long prompt's time to first token.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.serve.engine import Engine, GenParams


def one_round(model, chunk: int | None, prompt_len: int) -> tuple[float, float, float]:
    eng = Engine(model, None, max_batch=4, stop_token_ids=[], prefill_chunk=chunk)
    g = torch.Generator().manual_seed(0)
    with eng:
        shorts = [
            eng.submit(
                torch.randint(3, 4096, (20,), generator=g).tolist(), GenParams(max_tokens=400, temperature=0)
            )
            for _ in range(3)
        ]
        stamps: list[list[float]] = [[] for _ in shorts]
        while min(len(r.out_ids) for r in shorts) < 8:
            time.sleep(0.0005)
        long_req = eng.submit(
            torch.randint(3, 4096, (prompt_len,), generator=g).tolist(),
            GenParams(max_tokens=1, temperature=0),
        )
        t0 = time.perf_counter()
        seen = [len(r.out_ids) for r in shorts]
        while not long_req.done:  # poll the short requests' token counts while the prompt is prefilled
            now = time.perf_counter()
            for k, r in enumerate(shorts):
                if len(r.out_ids) != seen[k]:
                    seen[k] = len(r.out_ids)
                    stamps[k].append(now)
            time.sleep(0.0002)
        ttft = time.perf_counter() - t0
        for r in shorts:
            r.cancel()
    end = t0 + ttft
    # gaps from the long prompt's submission to each short request's tokens, and to the end of
    # its prefill: a request that produced nothing meanwhile waited the whole prefill
    gaps = [b - a for s in stamps for a, b in zip([t0, *s], [*s, end])]
    return max(gaps) * 1e3, statistics.median(gaps) * 1e3, ttft * 1e3


def forward_only(model, prompt_len: int, chunks: list[int], rounds: int) -> None:
    """Time the prompt's prefill forwards alone (fused path and the model's own forward)."""
    from lmforge.serve.fastpath import FastDecoder
    from lmforge.serve.kvcache import SlotCache
    from lmforge.serve.prefill import prefill_chunk

    fast = FastDecoder.build(model)
    cache = SlotCache(model.cfg, 1, model.cfg.max_seq_len, "cpu", torch.float32)
    ids = torch.randint(3, 4096, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    print("| chunk | fused path ms | model forward ms |\n|---:|---:|---:|")
    for c in chunks:
        row = []
        for path in (fast, None):
            ts = []
            for _ in range(rounds + 1):  # the first round warms up
                t = time.perf_counter()
                for st in range(0, prompt_len, c):
                    prefill_chunk(path, model, cache, 0, ids[st : st + c], st, "cpu")
                ts.append(time.perf_counter() - t)
            row.append(statistics.median(ts[1:]) * 1e3)
        print(f"| {c} | {row[0]:.1f} | {row[1]:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=1900)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--forward-only", action="store_true", help="time the prefill forwards alone")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = dict(vocab_size=4096, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2)
    model = Transformer(ModelConfig(**cfg, max_seq_len=a.prompt + 512)).eval()
    if a.forward_only:
        forward_only(model, a.prompt, [a.prompt, 512, 256], a.rounds)
        return
    print(f"prompt {a.prompt} tokens, 3 requests decoding, threads {a.threads}, {a.rounds} rounds (median)")
    print("| prefill | worst gap between tokens ms | median gap ms | long prompt TTFT ms |")
    print("|---|---:|---:|---:|")
    for chunk in (None, a.chunk):
        rows = [one_round(model, chunk, a.prompt) for _ in range(a.rounds)]
        med = [statistics.median(r[i] for r in rows) for i in range(3)]
        label = "one forward" if chunk is None else f"chunks of {chunk}"
        print(f"| {label} | {med[0]:.1f} | {med[1]:.1f} | {med[2]:.1f} |")


if __name__ == "__main__":
    main()
