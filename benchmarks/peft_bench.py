"""Fine-tuning cost on CPU: full vs LoRA vs QLoRA vs prompt tuning, and LoRA vs peft+transformers.

    python benchmarks/peft_bench.py                       # ~100M-parameter Llama-shape model
    python benchmarks/peft_bench.py --d-model 512 --layers 4 --steps 3   # quicker

Every configuration runs in its own subprocess, so "peak RSS" (ru_maxrss) is that method's own
high-water mark: loading the checkpoint (QLoRA quantises tensor by tensor while reading it),
the forward/backward of `--steps` optimizer steps, and the AdamW state. `baseline` is the RSS
after importing torch and lmforge, before the model exists. Step time is the median over the
timed steps (after one warm-up step). The peft comparison trains the same checkpoint with
`transformers.LlamaForCausalLM` + `peft.get_peft_model` with the same rank, alpha, targets,
batch and sequence length; the ratio is peft's step time / lmforge's (>= 1.0: lmforge is at
least as fast).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    baseline = None
    if a.method == "peft":
        import peft
        import transformers

        baseline = rss_mib()
        model = transformers.AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
        model = peft.get_peft_model(
            model, peft.LoraConfig(r=a.r, lora_alpha=2 * a.r, target_modules=TARGETS, lora_dropout=0.0)
        )
        model.train()

        def loss_fn(ids):
            labels = ids.clone()
            labels[:, : int(a.seq * (1 - a.assistant_fraction))] = -100  # HF shifts labels itself
            return model(input_ids=ids, labels=labels).loss
    else:
        from lmforge.model.hf import load_pretrained
        from lmforge.peft.lora import LoraSettings, apply_lora
        from lmforge.peft.prompt import PromptTuned
        from lmforge.peft.qlora import QLoraSettings, load_quantized

        baseline = rss_mib()
        if a.method == "qlora":
            model = load_quantized(a.model_dir, QLoraSettings(compute_dtype="bfloat16"))
        else:
            model = load_pretrained(a.model_dir)
        if a.method in ("lora", "qlora"):
            apply_lora(model, LoraSettings(r=a.r, alpha=2 * a.r, target_modules=TARGETS))
        if a.method == "prompt":
            model = PromptTuned(model, 20, init_ids=list(range(10, 30)))
        model.train()

        from lmforge.train.objectives.sft import IGNORE, SFTObjective

        objective = SFTObjective()

        def loss_fn(ids):
            labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE)], dim=1)
            k = int(a.seq * (1 - a.assistant_fraction))
            if k > 1:
                labels[:, : k - 1] = IGNORE  # the same targets HF's internal shift gives
            loss, n, _ = objective(model, {"input_ids": ids, "labels": labels})
            return loss / n

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(a.steps + 1):
        ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
        t0 = time.perf_counter()
        loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - t0)
    state_bytes = sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
    )
    return {
        "method": a.method,
        "step_s": statistics.median(times),
        "step_s_all": [round(t, 3) for t in times],
        "peak_rss_mib": round(rss_mib(), 1),
        "baseline_rss_mib": round(baseline, 1),
        "trainable_params": sum(p.numel() for p in params),
        "optimizer_state_mib": round(state_bytes / 2**20, 2),
        "loss": float(loss.detach()),
    }


def run(method: str, a, model_dir: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--model-dir",
        str(model_dir),
        "--steps",
        str(a.steps),
        "--batch",
        str(a.batch),
        "--seq",
        str(a.seq),
        "--r",
        str(a.r),
        "--threads",
        str(a.threads),
        "--vocab",
        str(a.vocab),
        "--assistant-fraction",
        str(a.assistant_fraction),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode:
        raise SystemExit(f"{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=2, help="alternating lmforge/peft LoRA runs")
    p.add_argument(
        "--methods", default="full,lora,qlora,prompt", help="comma-separated; '' = only the peft comparison"
    )
    p.add_argument(
        "--assistant-fraction",
        type=float,
        default=1.0,
        help="share of each sequence (its end) that carries loss, as in SFT data; 1.0 = every token",
    )
    p.add_argument("--out", default=None, help="write the JSON results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.method = a.worker
        print(json.dumps(worker(a)))
        return

    import torch

    from lmforge.model.config import ModelConfig
    from lmforge.model.hf import save_pretrained
    from lmforge.model.transformer import Transformer

    cfg = ModelConfig(
        vocab_size=a.vocab,
        d_model=a.d_model,
        n_layers=a.layers,
        n_heads=a.heads,
        n_kv_heads=a.kv_heads,
        d_ff=a.d_ff,
        max_seq_len=max(a.seq, 256),
        tie_embeddings=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_pretrained(Transformer(cfg), tmp)
        print(
            f"model: {cfg.param_count() / 1e6:.1f}M params (d_model {a.d_model}, {a.layers} layers, vocab {a.vocab}, "
            f"untied); batch {a.batch} x seq {a.seq}; LoRA r={a.r} alpha={2 * a.r} on all 7 linears; "
            f"{a.threads} threads; loss on the last {a.assistant_fraction:.0%} of each sequence; "
            f"{platform.processor() or platform.machine()}",
            flush=True,
        )
        results = {}
        for m in [m for m in a.methods.split(",") if m]:
            results[m] = run(m, a, Path(tmp))
            print(json.dumps(results[m]), flush=True)
        ours, theirs = [], []
        for _ in range(a.repeats):
            lo, pe = run("lora", a, Path(tmp)), run("peft", a, Path(tmp))
            ours.append(lo["step_s"])
            theirs.append(pe["step_s"])
            print(
                f"lora step {ours[-1]:.3f}s (loss {lo['loss']:.5f})  peft step {theirs[-1]:.3f}s "
                f"(loss {pe['loss']:.5f})",
                flush=True,
            )
    full = results.get("full")
    if results:
        print(
            "\n| method | step (s) | peak RSS (MiB) | peak - baseline (MiB) | vs full | trainable params | optimizer state (MiB) |"
        )
        print("|---|---|---|---|---|---|---|")
    for m, r in results.items():
        d = r["peak_rss_mib"] - r["baseline_rss_mib"]
        rel = f"{d / (full['peak_rss_mib'] - full['baseline_rss_mib']):.2f}x" if full else "-"
        print(
            f"| {m} | {r['step_s']:.2f} | {r['peak_rss_mib']:.0f} | {d:.0f} | {rel} | {r['trainable_params']:,} | "
            f"{r['optimizer_state_mib']:.1f} |"
        )
    ratio = min(theirs) / min(ours)
    print(
        f"\nLoRA step time, best of {a.repeats}: lmforge {min(ours):.3f}s, peft+transformers {min(theirs):.3f}s, "
        f"ratio peft/lmforge = {ratio:.2f}x"
    )
    if a.out:
        Path(a.out).write_text(
            json.dumps({"results": results, "lora_s": ours, "peft_s": theirs, "ratio": ratio}, indent=2)
        )


if __name__ == "__main__":
    main()
