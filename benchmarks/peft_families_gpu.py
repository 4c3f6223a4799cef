"""LoRA / QLoRA fine-tuning speed and memory for two model families on one GPU: lmforge (the
family imported into its own decoder) against `transformers` + `peft` on the same checkpoint.

Shapes (~1B parameters, random weights built by `transformers` from the family's config class,
vocabulary 32000 so the head does not dominate):
- `qwen3`: hidden 2048, 16 layers, 16 heads of 128 (8 KV heads), SwiGLU 6144, q/k norms (~0.87B);
- `gemma2`: hidden 2048, 16 layers, 8 heads of 256 (4 KV heads), GeGLU 8192, soft-capped
  attention and logits, sliding window 4096 on alternate layers (~1.07B).
`--tiny` shrinks both to a CPU smoke test (hidden 64, 2 layers, vocab 512, sequence 64).

Each case (family x {lmforge, peft} x {lora, qlora}) loads the checkpoint saved once in bf16,
applies LoRA r=16, alpha=32 on every linear of the blocks, and runs `--warmup` + `--steps`
optimizer steps (AdamW on the adapter, bf16 autocast, batch x sequence tokens of random ids):
tokens/s over the timed steps and `torch.cuda.max_memory_allocated` since the case started
(the CUDA context excluded). peft's QLoRA needs bitsandbytes (`BitsAndBytesConfig`, NF4 with
double quantisation, bf16 compute); lmforge's uses torchao or bitsandbytes. A case whose
library is missing is recorded with the error instead of a figure.

    python benchmarks/peft_families_gpu.py --out peft_families.json          # H200: < 150 s
    python benchmarks/peft_families_gpu.py --tiny --device cpu --out /tmp/x.json   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_config(family: str, tiny: bool):
    import transformers as t

    if tiny:
        common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
        common.update(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        if family == "qwen3":
            return t.Qwen3Config(**common, head_dim=16)
        return t.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=32)
    common = dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=16, max_position_embeddings=8192)
    if family == "qwen3":
        return t.Qwen3Config(
            **common, intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8, head_dim=128
        )
    return t.Gemma2Config(
        **common,
        intermediate_size=8192,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=4096,
    )


def make_checkpoint(family: str, tiny: bool, root: Path, device: str) -> tuple[Path, int]:
    import transformers

    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of a minute on the host
        model = transformers.AutoModelForCausalLM.from_config(hf_config(family, tiny), dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(root / family)
    del model
    return root / family, n


def load_case(impl: str, method: str, folder: Path, device: str):
    """(model, step function taking ids) for one case."""
    if impl == "lmforge":
        from lmforge.model.hf import load_pretrained
        from lmforge.peft.lora import LoraSettings, apply_lora
        from lmforge.peft.qlora import QLoraSettings, load_quantized

        if method == "qlora":
            model = load_quantized(folder, QLoraSettings(compute_dtype="bfloat16"), device=device)
        else:
            model = load_pretrained(folder, device=device, dtype="bfloat16")
        apply_lora(model, LoraSettings(r=16, alpha=32, target_modules=LINEAR))
        return model, lambda ids: model.loss(ids[:, :-1], ids[:, 1:])
    import peft
    import transformers

    # Gemma 2's soft-capped attention has no SDPA path in transformers: its default (eager) then
    kw: dict = {"dtype": torch.bfloat16}
    if "gemma2" not in folder.name:
        kw["attn_implementation"] = "sdpa"
    if method == "qlora":
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kw["device_map"] = {"": device}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kw)
    if method != "qlora":
        model = model.to(device)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=LINEAR))
    return model, lambda ids: model(input_ids=ids, labels=ids).loss


def run_case(impl: str, method: str, folder: Path, a, vocab: int) -> dict:
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    model, loss_fn = load_case(impl, method, folder, a.device)
    load_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (a.batch, a.seq + 1), generator=g).to(dev)
    model.train()

    def step(opt=opt):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(a.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    out = {
        "tokens_per_s": round(a.steps * a.batch * a.seq / dt, 1),
        "step_s": round(dt / a.steps, 4),
        "load_s": round(load_s, 2),
        "trainable_params": sum(p.numel() for p in params),
        "final_loss": round(float(loss), 4),
    }
    if cuda:
        out["peak_mem_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
    del model, opt, params
    gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="qwen3,gemma2")
    ap.add_argument("--methods", default="lora,qlora")
    ap.add_argument("--impls", default="lmforge,peft")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke-test shapes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True, help="JSON file for the figures")
    a = ap.parse_args()
    if a.tiny:
        a.seq = min(a.seq, 64)
    if a.device == "cpu":
        torch.set_num_threads(1)  # tiny shapes: thread spin-up costs more than the work
    t_start = time.perf_counter()
    results: dict = {
        "device": torch.cuda.get_device_name()
        if a.device.startswith("cuda")
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(a).items() if k != "out"},
        "cases": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for family in a.families.split(","):
            folder, n = make_checkpoint(family, a.tiny, Path(tmp), a.device)
            vocab = hf_config(family, a.tiny).vocab_size
            for method in a.methods.split(","):
                for impl in a.impls.split(","):
                    row = {"family": family, "params": n, "method": method, "impl": impl}
                    try:
                        row.update(run_case(impl, method, folder, a, vocab))
                    except Exception as e:  # a missing library (bitsandbytes, torchao) is a result too
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(json.dumps(row), flush=True)
                    results["cases"].append(row)
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {a.out} ({results['total_s']} s)")


if __name__ == "__main__":
    main()
