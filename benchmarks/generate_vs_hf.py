"""Decode speed and time-to-first-token: lmforge vs Hugging Face `generate`, same weights, same
prompts, same CPU, measured side by side (interleaved rounds, medians), greedy, fixed lengths.

    python benchmarks/generate_vs_hf.py                      # the tiny pipeline's shape, random weights
    python benchmarks/generate_vs_hf.py --model runs/tiny/pretrain/model --rounds 5

Systems:
  hf        transformers LlamaForCausalLM.generate (do_sample=False, KV cache, left padding)
  generate  lmforge.model.generate.generate (static batch, left padding, KV cache)
  generate_gqa  the same, on a model whose attention uses SDPA's enable_gqa instead of
            repeat_interleave (the patch proposed for model/transformer.py)
  engine    lmforge.serve.engine.Engine (slot cache, continuous batching; the server's path)

TTFT = time to produce 1 new token (prompt forward + first sample).
decode tok/s = batch * (N - 1) / (time for N tokens - time for 1 token).
Both in CPU seconds of the process (median over rounds; robust on a shared, oversubscribed
machine, exact with one torch thread) and in wall seconds (best round).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_model(folder: Path):
    from lmforge.model.config import ModelConfig
    from lmforge.model.hf import save_pretrained
    from lmforge.model.transformer import Transformer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests.factories
    from lmforge.tokenizer import train_tokenizer
    from tests.factories import CORPUS

    torch.manual_seed(0)
    tok = train_tokenizer(CORPUS * 4, vocab_size=400)
    tok.save(folder)
    # the default pipeline's architecture (configs/tiny.yaml) with its 4096 vocabulary
    cfg = ModelConfig(vocab_size=4096, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, max_seq_len=256)
    save_pretrained(Transformer(cfg), folder, bos_id=0, eos_id=1)
    return folder


def prompts_for(tok, batch: int, vocab: int) -> list[list[int]]:
    texts = [
        "The function returns the value of",
        "A socket is one endpoint of a two-way communication link",
        "This module provides regular expression",
        "Return the absolute value of a number. The argument",
        "Open the file and return a stream",
        "The quick brown fox",
        "Paris is the capital of",
        "In the beginning the interpreter reads the source file and",
    ]
    out = []
    for i in range(batch):
        ids = tok.encode(texts[i % len(texts)] * (1 + i % 3))[:40]
        out.append([min(t, vocab - 1) for t in ids] or [5])
    return out


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: all its threads, so the engine's worker too)."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="model folder (default: random weights in the tiny pipeline's shape)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: stable on a shared machine)"
    )
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import transformers

    from lmforge.model.generate import SamplingParams, generate
    from lmforge.serve.engine import Engine, GenParams

    tmp = tempfile.TemporaryDirectory()
    folder = Path(a.model) if a.model else build_model(Path(tmp.name) / "tiny-shape")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    N = a.new_tokens
    results = []
    for B in [int(x) for x in a.batches.split(",")]:
        engine = Engine.from_pretrained(folder, max_batch=B).start()
        model, tok = engine.model, engine.tok
        from lmforge.model.hf import load_pretrained
        from lmforge.serve.fastpath import use_gqa_attention

        plain = load_pretrained(folder)  # the model as model/generate.py gets it
        gqa_model = load_pretrained(folder)
        assert use_gqa_attention(gqa_model)
        prompts = prompts_for(tok, B, model.cfg.vocab_size)
        P = max(len(p) for p in prompts)
        pad = 2
        ids = torch.full((B, P), pad, dtype=torch.long)
        att = torch.zeros((B, P), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, P - len(p) :] = torch.tensor(p)
            att[i, P - len(p) :] = 1

        def run_hf(n):
            with torch.inference_mode():
                hf.generate(
                    input_ids=ids,
                    attention_mask=att,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=pad,
                    eos_token_id=None,
                )

        def run_gen(n):
            generate(plain, prompts, SamplingParams(max_new_tokens=n, temperature=0))

        def run_engine(n):
            engine.generate(prompts, GenParams(max_tokens=n, temperature=0, ignore_eos=True))

        def run_gen_gqa(n):  # model/generate.py on a model patched as proposed for transformer.py
            generate(gqa_model, prompts, SamplingParams(max_new_tokens=n, temperature=0))

        systems = {"hf": run_hf, "generate": run_gen, "generate_gqa": run_gen_gqa, "engine": run_engine}
        for fn in systems.values():  # warm up
            fn(4)
        t1 = {k: [] for k in systems}
        tn = {k: [] for k in systems}
        for r in range(a.rounds):  # interleaved (order rotating), so background load hits every system alike
            order = list(systems.items())
            order = order[r % len(order) :] + order[: r % len(order)]
            for k, fn in order:
                t1[k].append(timed(lambda: fn(1)))
                tn[k].append(timed(lambda: fn(N)))
        for k in systems:
            row = {"system": k, "batch": B, "new_tokens": N, "prompt_tokens_max": P}
            for label, col in (("cpu", 1), ("wall", 0)):
                # CPU time is what a busy shared machine distorts least (one torch thread: no spinning);
                # for wall time the best round is the least disturbed one.
                first = statistics.median(x[col] for x in t1[k]) if col else min(x[col] for x in t1[k])
                full = statistics.median(x[col] for x in tn[k]) if col else min(x[col] for x in tn[k])
                row[f"ttft_ms_{label}"] = round(first * 1000, 2)
                row[f"decode_tok_s_{label}"] = round(B * (N - 1) / max(full - first, 1e-9), 1)
            results.append(row)
        engine.close()
    hf_by_b = {r["batch"]: r for r in results if r["system"] == "hf"}
    for r in results:
        base = hf_by_b[r["batch"]]
        for label in ("cpu", "wall"):
            r[f"decode_vs_hf_{label}"] = round(r[f"decode_tok_s_{label}"] / base[f"decode_tok_s_{label}"], 2)
            r[f"ttft_vs_hf_{label}"] = round(base[f"ttft_ms_{label}"] / r[f"ttft_ms_{label}"], 2)
    print("CPU time (median of rounds) | wall time (best round); ratios: x faster than HF")
    print(
        f"{'system':<9}{'batch':>6} | {'TTFT ms':>8}{'tok/s':>9}{'xHF tok/s':>10}{'xHF TTFT':>9} |"
        f" {'TTFT ms':>8}{'tok/s':>9}{'xHF tok/s':>10}{'xHF TTFT':>9}"
    )
    for r in results:
        line = f"{r['system']:<9}{r['batch']:>6} |"
        for label in ("cpu", "wall"):
            line += (
                f" {r[f'ttft_ms_{label}']:>8.1f}{r[f'decode_tok_s_{label}']:>9.1f}"
                f"{r[f'decode_vs_hf_{label}']:>10.2f}{r[f'ttft_vs_hf_{label}']:>9.2f} |"
            )
        print(line)
    meta = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "model": str(a.model or "random weights, tiny pipeline shape (d192 L4 H6 KV2 V4096)"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(meta))
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
