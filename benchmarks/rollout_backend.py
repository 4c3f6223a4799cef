"""One RL rollout's generation: the serving engine (`align.backends.LmforgeBackend`, now) against
the former static-batch backend (the left-padded `model.generate.stream_generate` loop it
replaced, reproduced below), same policy object, same prompts, interleaved rounds, one process.

    python benchmarks/rollout_backend.py                  # CPU, the default pipeline's shapes
    python benchmarks/rollout_backend.py --rounds 7 --threads 1 --out rollout.json

Shapes (configs/tiny.yaml): a random d_model 192, 4-layer, 6-head (2 KV heads), vocab 4096,
context 256 policy in train mode with gradients on (what the RL stage hands the backend), prompts
of 12-40 tokens, no stop token (every sequence generates exactly max_new tokens, so both do the
same work):
  grpo   4 prompts x group 4 = 16 sequences, 32 new tokens, temperature 1 (GRPO defaults)
  ppo    16 prompts x 1, 24 new tokens, temperature 1 (the default pipeline's PPO rollout)
  grpo_64  16 prompts x group 4 = 64 sequences (one full `gen_batch_size`), 32 new tokens
Time: CPU seconds of the process (all threads, the engine's worker included; median over rounds)
and wall seconds (best round). Prints a markdown table; the ratio is old / new (> 1: faster now).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence

import torch

from lmforge.align.backends import LmforgeBackend, mix_seed
from lmforge.model.config import ModelConfig
from lmforge.model.generate import SamplingParams, stream_generate
from lmforge.model.transformer import Transformer
from lmforge.serve.request import GenParams

SHAPE = dict(vocab_size=4096, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, max_seq_len=256)
# prompts, samples per prompt, new tokens
CASES = {"grpo": (4, 4, 32), "ppo": (16, 1, 24), "grpo_64": (16, 4, 32)}


class StaticBatchBackend:
    """The former rollout backend: chunks of `batch_size` sequences, left-padded, one seeded
    generator per chunk, the policy put in eval mode and restored."""

    def __init__(self, model: torch.nn.Module, batch_size: int = 64):
        self.model, self.batch_size = model, batch_size

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: GenParams) -> list[list[int]]:
        seqs = [list(p) for p in prompts for _ in range(n)]
        stops = set(params.stop_token_ids)
        out: list[list[int]] = []
        was = self.model.training
        self.model.eval()
        try:
            for c, i in enumerate(range(0, len(seqs), self.batch_size)):
                chunk = seqs[i : i + self.batch_size]
                p = SamplingParams(
                    max_new_tokens=params.max_tokens or 1,
                    temperature=params.temperature,
                    top_k=params.top_k,
                    top_p=params.top_p,
                    stop_token_ids=list(stops),
                    seed=None if params.seed is None else mix_seed(params.seed, c),
                )
                got: list[list[int]] = [[] for _ in chunk]
                done = [False] * len(chunk)
                for step in stream_generate(self.model, chunk, p):  # type: ignore[arg-type]
                    for j, t in enumerate(step.tolist()):
                        if not done[j]:
                            got[j].append(t)
                            done[j] = t in stops
                out += got
        finally:
            self.model.train(was)
        return out


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    policy = Transformer(ModelConfig(**SHAPE)).train()
    g = torch.Generator().manual_seed(1)
    systems = {"static batch (before)": StaticBatchBackend(policy), "engine (now)": LmforgeBackend(policy)}
    rows = []
    for case, (n_prompts, group, new) in CASES.items():
        lens = torch.randint(12, 41, (n_prompts,), generator=g).tolist()
        prompts = [torch.randint(3, SHAPE["vocab_size"], (n,), generator=g).tolist() for n in lens]
        params = GenParams(max_tokens=new, temperature=1.0, stop_token_ids=[], seed=7)
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in systems}
        for name, be in systems.items():  # warm-up
            out = be.generate(prompts, group, params)
            assert len(out) == n_prompts * group and all(len(o) == new for o in out)
        for _ in range(a.rounds):
            for name, be in systems.items():
                times[name].append(timed(lambda: be.generate(prompts, group, params)))
        for name, ts in times.items():
            rows.append(
                {
                    "case": case,
                    "system": name,
                    "sequences": n_prompts * group,
                    "new_tokens": new,
                    "cpu_s": statistics.median(c for _, c in ts),
                    "wall_s": min(w for w, _ in ts),
                }
            )
    print("| case | system | sequences x new tokens | CPU s (median) | wall s (best) | x before (CPU) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        base = next(b for b in rows if b["case"] == r["case"] and b["system"].startswith("static"))
        r["speedup_cpu"] = base["cpu_s"] / r["cpu_s"]
        print(
            f"| {r['case']} | {r['system']} | {r['sequences']} x {r['new_tokens']} | {r['cpu_s']:.3f} "
            f"| {r['wall_s']:.3f} | {r['speedup_cpu']:.2f} |"
        )
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"threads": a.threads, "rounds": a.rounds, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
