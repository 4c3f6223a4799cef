"""Benchmark scores of a model on the shared data: MMLU dev (285), ARC-Easy val (570), HellaSwag
val (first 500), optionally GSM8K (first N of test), with chance levels and 95% intervals.

    python benchmarks/eval_tasks.py [--model runs/tiny/sft/model] [--num-fewshot 0] [--gsm8k 50]

Prints a markdown table and writes the full results to --out (JSON). Tiny models sit near chance:
the interval says whether a difference from chance is real.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=None, help="default: runs/tiny/sft/model, else runs/tiny/pretrain/model"
    )
    ap.add_argument("--num-fewshot", type=int, default=0)
    ap.add_argument("--gsm8k", type=int, default=0, help="also GSM8K greedy on the first N test items")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from lmforge.eval.evaluate import evaluate_task
    from lmforge.eval.loglik import Scorer
    from lmforge.eval.readers import load_task
    from lmforge.serve.loading import load_model_and_tokenizer

    if a.model is None:
        a.model = next(
            (d for d in ("runs/tiny/sft/model", "runs/tiny/pretrain/model") if Path(d).is_dir()),
            "runs/tiny/pretrain/model",
        )
    model, tok = load_model_and_tokenizer(a.model)
    scorer = Scorer(model, tok)
    specs = [
        f"mmlu:{SHARED / 'mmlu' / 'dev'}",
        f"mmlu_cloze:{SHARED / 'mmlu' / 'dev'}",
        f"arc:{SHARED / 'arc' / 'arc_easy_validation.jsonl'}",
        f"hellaswag:{SHARED / 'hellaswag' / 'hellaswag_val_first500.jsonl'}",
    ]
    if a.gsm8k:
        specs.append(f"gsm8k:{SHARED / 'gsm8k'}")
    results = {}
    t_all = time.time()
    for spec in specs:
        task = load_task(spec)
        limit = a.gsm8k if task.kind == "generate" else None
        results[task.name] = evaluate_task(
            model,
            tok,
            task,
            scorer=scorer,
            num_fewshot=a.num_fewshot,
            limit=limit,
            max_new_tokens=min(task.max_new_tokens, model.cfg.max_seq_len // 2),
        )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}; model {a.model} "
        f"({model.num_params() / 1e6:.2f}M params, context {model.cfg.max_seq_len}); {a.num_fewshot}-shot; "
        f"{time.time() - t_all:.0f} s in all\n"
    )
    print(
        "| task | n | metric | value | 95% CI | chance | truncated | seconds |\n|---|---:|---|---:|---|---:|---:|---:|"
    )
    for name, r in results.items():
        for k in ("acc", "acc_norm", "exact_match", "exact_match_strict"):
            if k in r:
                lo, hi = r[k]["ci95"]
                chance = f"{r['chance']:.3f}" if "chance" in r else "-"
                print(
                    f"| {name} | {r['n']} | {k} | {r[k]['value']:.3f} | [{lo:.3f}, {hi:.3f}] | {chance} | "
                    f"{r.get('truncated', 0)} | {r['seconds']:.1f} |"
                )
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
