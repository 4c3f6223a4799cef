"""The generic path's speed caveat, measured: one Llama checkpoint run by lmforge's native
decoder and by the generic path (`transformers`' own LlamaForCausalLM behind lmforge's interface,
`model/generic.py`), training steps (forward + backward of the summed loss) and greedy KV-cache
decoding, same weights, same inputs, alternating.

    python benchmarks/generic_path.py [--d-model 256 --layers 4 --seq 256 --batch 4 --threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from lmforge.model.config import ModelConfig
from lmforge.model.generate import SamplingParams, generate
from lmforge.model.generic import load_generic
from lmforge.model.hf import load_pretrained, read_hf_config, save_pretrained
from lmforge.model.transformer import Transformer


def _train(model, x, y, reps: int) -> float:
    model.train()
    t0 = time.perf_counter()
    for _ in range(reps):
        model(x, targets=y).backward()
    return reps * x.numel() / (time.perf_counter() - t0)


def _decode(model, prompt, n: int) -> float:
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        generate(model, prompt, SamplingParams(max_new_tokens=n, temperature=0.0), use_cache=True)
    return n * len(prompt) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=4096, d_model=a.d_model, n_layers=a.layers, n_heads=4, n_kv_heads=2, max_seq_len=512
    )
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(Transformer(cfg), d)
        native = load_pretrained(d)
        generic = load_generic(d, read_hf_config(d))
        x = torch.randint(0, 4096, (a.batch, a.seq))
        y = torch.roll(x, -1, 1)
        prompts = [x[i, :16].tolist() for i in range(a.batch)]
        rows: dict[str, list[float]] = {"native": [], "generic": []}
        for _ in range(2):  # alternate, twice
            for name, m in (("native", native), ("generic", generic)):
                rows[name].append(_train(m, x, y, a.reps))
                rows[name].append(_decode(m, prompts, 32))
        for name, r in rows.items():
            train = max(r[0::2])
            dec = max(r[1::2])
            print(f"{name:8s} train {train:9,.0f} tokens/s   decode {dec:7,.0f} tokens/s")


if __name__ == "__main__":
    main()
