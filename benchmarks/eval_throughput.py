"""Log-likelihood scoring throughput: lmforge against lm-evaluation-harness's Hugging Face backend
on the same model and the same requests, side by side in one process.

    python benchmarks/eval_throughput.py [--model runs/tiny/pretrain/model] [--items 150] [--repeats 3]

Requests are ARC-Easy and HellaSwag items from ../shared/data formatted as the harness formats
them (one request per choice). Both backends get the identical `Instance` list through the
harness's `loglikelihood` API; the runs are interleaved (lmforge, harness, lmforge, ...) so a
busy machine slows both alike, and the median of the repeats is reported with the ratio. The
script also checks that the two agree on every log-likelihood. A third backend, lmforge with
`share_context` off (one row per choice, the context re-run each time), shows what scoring a
multiple-choice item's choices in one shared-context row gains.

Without --model a random model of the default pipeline's shape (d_model 192, 4 layers, 6 heads,
2 KV heads, context 256) is built with the GPT-2 tokenizer from ../shared/data.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def build_requests(n_items: int):
    from lm_eval.api.instance import Instance

    from lmforge.eval.readers import load_task

    reqs = []
    for spec in (
        f"arc:{SHARED / 'arc' / 'arc_easy_validation.jsonl'}",
        f"hellaswag:{SHARED / 'hellaswag' / 'hellaswag_val_first500.jsonl'}",
    ):
        task = load_task(spec)
        for d in task.docs[:n_items]:
            for c in d.choices:
                reqs.append(Instance("loglikelihood", {}, (d.query, " " + c), len(reqs)))
    return reqs


def default_model(tmp: Path) -> Path:
    from lmforge.model.config import ModelConfig
    from lmforge.model.hf import save_pretrained
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer import LMTokenizer

    tok = LMTokenizer.load(SHARED / "gpt2-tokenizer")
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            vocab_size=tok.vocab_size, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, max_seq_len=256
        )
    )
    save_pretrained(model, tmp, bos_id=tok.bos_id, eos_id=tok.eos_id)
    tok.save(tmp)
    return tmp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: random model of the default pipeline's shape)")
    ap.add_argument("--items", type=int, default=150, help="items per task (ARC-Easy, HellaSwag)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument(
        "--hf-batch-size", type=int, default=32, help="harness HF backend batch size (its CLI default is 1)"
    )
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    import lmforge.eval.harness as H

    model_dir = Path(a.model) if a.model else default_model(Path(tempfile.mkdtemp(prefix="lmf-bench-")))
    reqs = build_requests(a.items)
    ours = H.LMForgeLM(pretrained=str(model_dir), add_bos_token=False)
    flat = H.LMForgeLM(pretrained=str(model_dir), add_bos_token=False)
    flat.scorer.share = False  # one row per request: the context re-run for every choice
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf_tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    ref = HFLM(pretrained=hf_model, tokenizer=hf_tok, batch_size=a.hf_batch_size, max_length=ours.max_length)
    ref1 = HFLM(pretrained=hf_model, tokenizer=hf_tok, batch_size=1, max_length=ours.max_length)

    times = {"lmforge": [], "lmforge, contexts not shared": [], f"harness-hf (batch {a.hf_batch_size})": []}
    cpu = {k: [] for k in times}
    out = {}
    for _ in range(a.repeats):
        runs = (
            ("lmforge", ours),
            ("lmforge, contexts not shared", flat),
            (f"harness-hf (batch {a.hf_batch_size})", ref),
        )
        for name, lm in runs:
            t0, c0 = time.perf_counter(), time.process_time()
            out[name] = lm.loglikelihood(reqs, disable_tqdm=True)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    t0, c0 = time.perf_counter(), time.process_time()
    ref1.loglikelihood(reqs[: len(reqs) // 4], disable_tqdm=True)
    t_b1, c_b1 = (time.perf_counter() - t0) * 4, (time.process_time() - c0) * 4

    diff = max(abs(x[0] - y[0]) for x, y in zip(out["lmforge"], out[f"harness-hf (batch {a.hf_batch_size})"]))
    agree = sum(x[1] == y[1] for x, y in zip(out["lmforge"], out[f"harness-hf (batch {a.hf_batch_size})"]))
    ntok = sum(len(ours.tok_encode(r.args[0] + r.args[1])) for r in reqs)
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cpus, torch "
        f"{torch.__version__}, threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"model: {model_dir} ({sum(p.numel() for p in hf_model.parameters()) / 1e6:.2f}M params, context "
        f"{ours.max_length}); {len(reqs)} requests ({ntok:,} tokens) from {a.items} ARC-Easy + {a.items} "
        f"HellaSwag items; {a.repeats} interleaved repeats\n"
    )
    print(
        "| backend | median wall s | requests/s (wall) | ratio (wall) | median CPU s | requests/CPU-s | ratio (CPU) |\n"
        "|---|---:|---:|---:|---:|---:|---:|"
    )
    key = f"harness-hf (batch {a.hf_batch_size})"
    base, cbase = statistics.median(times[key]), statistics.median(cpu[key])
    for name, ts in times.items():
        m, c = statistics.median(ts), statistics.median(cpu[name])
        print(
            f"| {name} | {m:.2f} | {len(reqs) / m:,.1f} | {base / m:.2f}x | {c:.2f} | {len(reqs) / c:,.1f} | "
            f"{cbase / c:.2f}x |"
        )
    print(
        f"| harness-hf (batch 1, its CLI default; 1/4 of the requests, x4) | {t_b1:.2f} | {len(reqs) / t_b1:,.1f} | "
        f"{base / t_b1:.2f}x | {c_b1:.2f} | {len(reqs) / c_b1:,.1f} | {cbase / c_b1:.2f}x |"
    )
    print(f"\nmax |log-likelihood difference| {diff:.2e}; is-greedy agrees on {agree}/{len(reqs)}")
    pairs = list(zip(out["lmforge"], out["lmforge, contexts not shared"]))
    print(
        f"shared vs not shared: max |difference| {max(abs(x[0] - y[0]) for x, y in pairs):.2e}, is-greedy "
        f"agrees on {sum(x[1] == y[1] for x, y in pairs)}/{len(reqs)}; tokens fed "
        f"{ours.scorer.stats.tokens:,} vs {flat.scorer.stats.tokens:,}"
    )


if __name__ == "__main__":
    main()
