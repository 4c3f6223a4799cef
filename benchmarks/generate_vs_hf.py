"""Decode speed, time to first token and peak memory: lmforge vs Hugging Face `generate`, same
weights, same prompts, same device, measured side by side (interleaved rounds), fixed lengths.

    python benchmarks/generate_vs_hf.py                           # CPU, the tiny pipeline's shape
    python benchmarks/generate_vs_hf.py --model runs/tiny/pretrain/model --rounds 5
    python benchmarks/generate_vs_hf.py --device cuda --shape 124m --out gpu.json   # < 150 s on an H200

Systems:
  hf            transformers LlamaForCausalLM.generate (KV cache, left padding)
  generate      lmforge.model.generate.generate (static batch, left padding, KV cache)
  generate_gqa  the same, on a model whose attention uses SDPA's enable_gqa (serve/fastpath.py)
  engine        lmforge.serve.engine.Engine with its default decode step: exact-length eager on
                CPU, the bucketed step replayed as CUDA graphs on CUDA (the server's path)
  engine_eager  the engine forced to the eager step (on CUDA: what the graphs save)
  engine_static the engine's fixed-shape bucketed step run eagerly (on CPU: what padding costs)
Batches are greedy with prompts of different lengths (up to 40 tokens). GRPO-style groups
(`--groups 16x8`: 16 prompts x 8 samples each, temperature 1) are measured twice for the
engine: `engine` shares each prompt's prefill among its 8 samples, `engine_unshared` prefills
each; HF gets the 128 rows as one batch (it has no sharing).

TTFT = time to produce 1 new token (prompt forward + first sample) for the whole batch.
decode tok/s = rows * (N - 1) / (time for N tokens - time for 1 token); end-to-end (e2e)
tok/s = rows * N / (time for N tokens), prefill included (what shared prefill improves).
CPU: CPU seconds of the process (median over rounds; robust on a shared machine) and wall
seconds (best round). CUDA: wall seconds (best round), synchronised; peak memory = the largest
`torch.cuda.max_memory_allocated` over the system's runs (weights, cache and activations).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {  # random weights; vocabulary 4096 (tiny) or 32768
    "tiny": dict(vocab_size=4096, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, max_seq_len=256),
    "124m": dict(vocab_size=32768, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024),
    "350m": dict(vocab_size=32768, d_model=1024, n_layers=24, n_heads=16, max_seq_len=1024),
}
CPU_SYSTEMS = "hf,generate,generate_gqa,engine"
CUDA_SYSTEMS = "hf,engine_eager,engine"


def build_model(folder: Path, shape: str) -> Path:
    from lmforge.model.config import ModelConfig
    from lmforge.model.hf import save_pretrained
    from lmforge.model.transformer import Transformer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests.factories
    from lmforge.tokenizer import train_tokenizer
    from tests.factories import CORPUS

    torch.manual_seed(0)
    tok = train_tokenizer(CORPUS * 4, vocab_size=400)
    tok.save(folder)
    save_pretrained(Transformer(ModelConfig(**SHAPES[shape])), folder, bos_id=0, eos_id=1)
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


def timed(fn, cuda: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: all its threads, so the engine's worker too)."""
    if cuda:
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c


def hf_runner(hf, prompts: list[list[int]], samples: int, device):
    """HF generate over left-padded rows; `samples` > 1: that many sampled rows per prompt."""
    B, P, pad = len(prompts), max(len(p) for p in prompts), 2
    ids = torch.full((B, P), pad, dtype=torch.long)
    att = torch.zeros((B, P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p)
        att[i, P - len(p) :] = 1
    ids, att = ids.to(device), att.to(device)
    sample = dict(do_sample=True, temperature=1.0, top_k=0, num_return_sequences=samples)

    def run(n):
        with torch.inference_mode():
            hf.generate(
                input_ids=ids,
                attention_mask=att,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=pad,
                eos_token_id=None,
                **(sample if samples > 1 else dict(do_sample=False)),
            )

    return run


def engine_runner(engine, prompts, samples: int):
    from lmforge.serve.engine import GenParams

    if samples == 1:
        return lambda n: engine.generate(prompts, GenParams(max_tokens=n, temperature=0, ignore_eos=True))
    rows = [p for p in prompts for _ in range(samples)]

    def run(n):
        ps = [GenParams(max_tokens=n, temperature=1.0, seed=j, ignore_eos=True) for j in range(len(rows))]
        engine.generate(rows, ps)

    return run


def make_systems(names, folder, a, prompts, samples, hf):
    from lmforge.model.generate import SamplingParams, generate
    from lmforge.model.hf import load_pretrained
    from lmforge.serve.engine import Engine
    from lmforge.serve.fastpath import use_gqa_attention

    rows = len(prompts) * samples
    out, engines, resident = {}, [], {}
    for name in names:
        if name == "hf":
            out[name] = hf_runner(hf, prompts, samples, a.device)
            resident[name] = nbytes(hf.parameters())
        elif name in ("generate", "generate_gqa") and samples == 1:
            plain = load_pretrained(a.folder, device=a.device, dtype=a.dtype)
            if name == "generate_gqa":
                assert use_gqa_attention(plain)
            out[name] = lambda n, m=plain: generate(
                m, prompts, SamplingParams(max_new_tokens=n, temperature=0)
            )
            resident[name] = nbytes(plain.parameters())
        elif name.startswith("engine"):
            kw = dict(max_batch=rows, device=a.device, dtype=a.dtype)
            if name != "engine":  # (an older engine without `decode` runs the plain `engine` system)
                kw["decode"] = {"engine_eager": "eager", "engine_static": "static"}[name]
            eng = Engine.from_pretrained(folder, **kw).start()
            engines.append(eng)
            out[name] = engine_runner(eng, prompts, samples)
            resident[name] = nbytes([*eng.model.parameters(), *eng.cache.k, *eng.cache.v])
            if samples > 1 and name == "engine":
                eng2 = Engine.from_pretrained(folder, share_prefill=False, **kw).start()
                engines.append(eng2)
                out["engine_unshared"] = engine_runner(eng2, prompts, samples)
                resident["engine_unshared"] = resident[name]
    return out, engines, resident


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(systems: dict, resident: dict, rows: int, a, cuda: bool) -> list[dict]:
    """Timings per system; on CUDA also its peak memory: its own weights and cache plus the
    most its runs allocated on top (the other systems' resident memory is not counted)."""
    N = a.new_tokens
    peak = dict.fromkeys(systems, 0.0)
    for k, fn in systems.items():  # warm up (on CUDA: capture every graph the runs will replay)
        fn(1)
        fn(N if cuda else 4)
    t1 = {k: [] for k in systems}
    tn = {k: [] for k in systems}
    for r in range(a.rounds):  # interleaved (order rotating), so background load hits every system alike
        order = list(systems.items())
        order = order[r % len(order) :] + order[: r % len(order)]
        for k, fn in order:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            t1[k].append(timed(lambda: fn(1), cuda))
            tn[k].append(timed(lambda: fn(N), cuda))
            if cuda:
                extra = torch.cuda.max_memory_allocated() - before
                peak[k] = max(peak[k], (resident[k] + extra) / 2**20)
    rows_out = []
    for k in systems:
        row = {"system": k, "rows": rows, "new_tokens": N}
        for label, col in (("cpu", 1), ("wall", 0)):
            if cuda and label == "cpu":
                continue
            # CPU time: median (what a shared machine distorts least); wall: best round
            first = statistics.median(x[col] for x in t1[k]) if col else min(x[col] for x in t1[k])
            full = statistics.median(x[col] for x in tn[k]) if col else min(x[col] for x in tn[k])
            row[f"ttft_ms_{label}"] = round(first * 1000, 2)
            row[f"decode_tok_s_{label}"] = round(rows * (N - 1) / max(full - first, 1e-9), 1)
            row[f"e2e_tok_s_{label}"] = round(rows * N / full, 1)
        row["peak_mem_mb"] = round(peak[k], 1) if cuda else None
        rows_out.append(row)
    return rows_out


def add_ratios(results: list[dict], labels) -> None:
    base = {(r["case"]): r for r in results if r["system"] == "hf"}
    for r in results:
        b = base.get(r["case"])
        for label in labels:
            if b is not None:
                r[f"decode_vs_hf_{label}"] = round(r[f"decode_tok_s_{label}"] / b[f"decode_tok_s_{label}"], 2)
                r[f"ttft_vs_hf_{label}"] = round(b[f"ttft_ms_{label}"] / r[f"ttft_ms_{label}"], 2)
                r[f"e2e_vs_hf_{label}"] = round(r[f"e2e_tok_s_{label}"] / b[f"e2e_tok_s_{label}"], 2)


def report(results: list[dict], labels) -> None:
    print(
        "columns: TTFT, decode tok/s, e2e tok/s, x HF decode, x HF TTFT; "
        + ("wall" if labels == ("wall",) else "cpu | wall")
    )
    for r in results:
        line = f"{r['case']:<10}{r['system']:<16}"
        for label in labels:
            line += (
                f" | TTFT {r[f'ttft_ms_{label}']:>9.1f} ms {r[f'decode_tok_s_{label}']:>10.1f} tok/s"
                f" e2e {r[f'e2e_tok_s_{label}']:>9.1f}"
                f" {r.get(f'decode_vs_hf_{label}', float('nan')):>6.2f}x {r.get(f'ttft_vs_hf_{label}', float('nan')):>6.2f}x"
            )
        if r["peak_mem_mb"] is not None:
            line += f" | peak {r['peak_mem_mb']:.0f} MiB"
        print(line, flush=True)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder (default: random weights of --shape)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--new-tokens", type=int, help="default: 64 on CPU, 128 on CUDA")
    ap.add_argument("--batches", help="default: 1,8 on CPU; 1,16,64,256 on CUDA")
    ap.add_argument("--groups", help="GRPO-style groups PROMPTSxSAMPLES, e.g. 16x8 (default on CUDA)")
    ap.add_argument("--systems", help=f"default: {CPU_SYSTEMS} on CPU, {CUDA_SYSTEMS} on CUDA")
    ap.add_argument("--rounds", type=int, help="default: 5 on CPU, 2 on CUDA")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable when shared)")
    ap.add_argument("--out", "--json", dest="out", help="write the figures here as JSON")
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    a.dtype = a.dtype or ("bfloat16" if cuda else "float32")
    a.new_tokens = a.new_tokens or (128 if cuda else 64)
    a.batches = a.batches or ("1,16,64,256" if cuda else "1,8")
    a.groups = a.groups if a.groups is not None else ("16x8" if cuda else "")
    a.systems = a.systems or (CUDA_SYSTEMS if cuda else CPU_SYSTEMS)
    a.rounds = a.rounds or (2 if cuda else 5)
    return a, cuda


def main() -> None:
    a, cuda = parse_args()
    t_start = time.perf_counter()
    if a.threads:
        torch.set_num_threads(a.threads)
    import transformers

    from lmforge.model.hf import parse_dtype
    from lmforge.tokenizer import LMTokenizer

    tmp = tempfile.TemporaryDirectory()
    folder = Path(a.model) if a.model else build_model(Path(tmp.name) / a.shape, a.shape)
    a.folder = folder
    dtype = parse_dtype(a.dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(a.device).eval()
    tok = LMTokenizer.load(folder)
    vocab = hf.config.vocab_size
    names = a.systems.split(",")
    cases = [(f"batch{b}", prompts_for(tok, int(b), vocab), 1) for b in a.batches.split(",") if b]
    if a.groups:
        g, s = (int(x) for x in a.groups.lower().split("x"))
        cases.append((f"groups{g}x{s}", prompts_for(tok, g, vocab), s))
    labels = ("wall",) if cuda else ("cpu", "wall")
    results: list[dict] = []
    meta = {
        "machine": torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine()),
        "device": a.device,
        "dtype": a.dtype,
        "shape": a.shape if not a.model else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "model": str(a.model or f"random weights, {a.shape}: {SHAPES[a.shape]}"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(meta), flush=True)
    for case, prompts, samples in cases:  # each case printed and saved as soon as it is measured
        systems, engines, resident = make_systems(names, folder, a, prompts, samples, hf)
        rows = [{"case": case, **r} for r in measure(systems, resident, len(prompts) * samples, a, cuda)]
        for e in engines:
            e.close()
        del systems, engines
        if cuda:
            torch.cuda.empty_cache()
        add_ratios(rows, labels)
        report(rows, labels)
        results += rows
        meta["seconds"] = round(time.perf_counter() - t_start, 1)
        meta["cpu_max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        if a.out:
            Path(a.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
