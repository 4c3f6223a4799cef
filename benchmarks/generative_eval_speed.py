"""GSM8K-style generative evaluation: time and answers of `evaluate_generative` (greedy) on the
first N test problems. Run it under two source trees to compare generation paths: the digest of
all completions says whether they produced the same text.

    python benchmarks/generative_eval_speed.py --model runs/tiny/sft/model --gsm8k /path/to/gsm8k -n 100
    PYTHONPATH=<other src> python benchmarks/generative_eval_speed.py ...     # the same, another tree
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--gsm8k", required=True, help="GSM8K folder or JSONL (test*.jsonl, train.jsonl)")
    ap.add_argument("-n", type=int, default=100, help="problems (default 100)")
    ap.add_argument("--num-fewshot", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from lmforge.eval.generative import evaluate_generative
    from lmforge.eval.readers import load_task
    from lmforge.serve.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(a.model)
    task = load_task(f"gsm8k:{a.gsm8k}")
    t = time.perf_counter()
    res = evaluate_generative(
        model,
        tok,
        task,
        limit=a.n,
        num_fewshot=a.num_fewshot,
        batch_size=a.batch_size,
        max_new_tokens=min(task.max_new_tokens, model.cfg.max_seq_len // 2),
        keep_predictions=True,
    )
    seconds = time.perf_counter() - t
    texts = [c for p in res["predictions"] for c in p["completions"]]
    digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:12]
    chars = sum(len(x) for x in texts)
    print(
        f"n={res['n']} exact_match={res['exact_match']['value']:.3f} seconds={seconds:.2f} "
        f"completion_chars={chars} digest={digest}"
    )


if __name__ == "__main__":
    main()
