"""Post-training speed against pretraining: processed tokens/s and peak memory, same model, same data.

Every run goes through lmforge's own training code: the engine's optimizer step
(`Trainer._train_step`: autocast, backward, clipping, AdamW), the stage objectives
(`pretrain_objective`, `SFTObjective`, `RewardObjective`, `PreferenceObjective`), the stage
loaders (`pack` + `RowLoader`, the token-budget `row_loader` for packing=false, `PairLoader`
with chosen and rejected packed into one row for DPO) and the PEFT builders (`apply_lora`,
`load_quantized` for NF4, `PromptTuned`, `resolve_base_dtype("auto")` for the frozen base).

Runs: `pretrain`, `sft_packed`, `sft_unpacked`, `lora` (r 8 on all linear layers), `qlora`
(NF4 base + LoRA r 8), `prompt` (16 virtual tokens), `reward` (Bradley-Terry), `dpo` (cached
reference log-probs, as the align stage uses by default).

Data (deterministic, no tokenizer needed, so the GPU machine needs nothing but this repo):
chat-shaped examples whose prompt and answer lengths follow the built-in chat data's shape
(answers ~30% of the tokens, 60-900 tokens per conversation), token ids drawn at random; the
pretraining stream is the same tokens concatenated, and preference pairs reuse the prompts with
two answers each. Every run gets about `batch x seq` tokens per step: pretrain and packed SFT
`batch` rows of `seq`; unpacked SFT a `batch x seq` token budget; reward / DPO as many pairs as
fill it on average.

Processed tokens = every non-padding token a forward ran over (pretraining: all of them). Peak
memory: CUDA `max_memory_allocated` over the timed steps of that run alone (runs go one after
another in one process, the previous run freed); CPU: peak RSS of a fresh process per run.

    python benchmarks/posttrain_speed.py --device cpu --out cpu.json          # tiny, seq 1024
    python benchmarks/posttrain_speed.py --device cuda --shape 124m --shape 350m --out gpu.json
    python benchmarks/posttrain_speed.py --device cuda --quick --out gpu.json # fewer steps
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.align.pair_batches import PairLoader
from lmforge.align.preference import Pair
from lmforge.align.reward import RewardModel
from lmforge.chat import Example
from lmforge.model.config import ModelConfig
from lmforge.model.hf import load_pretrained, save_pretrained
from lmforge.model.transformer import Transformer
from lmforge.peft.lora import LoraSettings, apply_lora, resolve_base_dtype
from lmforge.peft.prompt import PromptTuned
from lmforge.peft.qlora import QLoraSettings, load_quantized
from lmforge.sft.rows import RowLoader, example_row, pack, row_loader
from lmforge.train.config import TrainConfig
from lmforge.train.device import peak_memory
from lmforge.train.engine import Trainer
from lmforge.train.objectives.preference import PreferenceObjective
from lmforge.train.objectives.pretrain import pretrain_objective
from lmforge.train.objectives.reward import RewardObjective
from lmforge.train.objectives.sft import SFTObjective

SHAPES = {  # as benchmarks/gpu_train.py, plus a CPU-sized one
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, vocab_size=4096),
    "124m": dict(d_model=768, n_layers=12, n_heads=12, vocab_size=50304),
    "350m": dict(d_model=1024, n_layers=24, n_heads=16, vocab_size=50304),
}
RUNS = ("pretrain", "sft_packed", "sft_unpacked", "lora", "qlora", "prompt", "reward", "dpo")
N_VIRTUAL = 16


class Stream:
    """Endless (x, y) rows of `seq` tokens from one token array (the pretraining loader's shape)."""

    def __init__(self, tokens: np.ndarray, batch: int, seq: int):
        self.tokens, self.batch, self.seq, self.pos = tokens, batch, seq, 0

    def __iter__(self):
        n = self.batch * self.seq + 1
        while True:
            if self.pos + n > len(self.tokens):
                self.pos = 0
            t = torch.from_numpy(self.tokens[self.pos : self.pos + n].astype(np.int64))
            self.pos += n - 1
            yield t[:-1].view(self.batch, self.seq), t[1:].view(self.batch, self.seq)

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.pos = s["pos"]


def make_data(vocab: int, n: int, seed: int) -> tuple[list[Example], list[Pair]]:
    """Chat-shaped examples (prompt 40-600 tokens, answer 20-300) and pairs over the same prompts."""
    rng = np.random.default_rng(seed)
    exs, pairs = [], []
    for _ in range(n):
        p, a, r = int(rng.integers(40, 600)), int(rng.integers(20, 300)), int(rng.integers(20, 300))
        prompt = rng.integers(8, vocab, p).tolist()
        answer, other = rng.integers(8, vocab, a).tolist(), rng.integers(8, vocab, r).tolist()
        exs.append(Example(prompt + answer, [False] * p + [True] * a))
        pairs.append(Pair(prompt, answer, other))
    return exs, pairs


def build(run: str, model_dir: Path, cfg: ModelConfig, device: torch.device, seed: int):
    """(model, objective) for a run, built the way the sft / reward / align stages build them."""
    torch.manual_seed(seed)
    base_dtype = resolve_base_dtype("auto", device)
    if run == "qlora":
        model = load_quantized(model_dir, QLoraSettings(), device=device)
        apply_lora(model, LoraSettings(r=8))
        return model, SFTObjective()
    if run in ("lora", "prompt"):
        dt = base_dtype if base_dtype != "float32" else None
        model = load_pretrained(model_dir, device=device, dtype=dt).train()
        if run == "lora":
            apply_lora(model, LoraSettings(r=8))
            return model, SFTObjective()
        return PromptTuned(model, N_VIRTUAL, None, seed).to(device), SFTObjective()
    model = load_pretrained(model_dir, device=device).train()
    if run == "pretrain":
        return model, pretrain_objective()
    if run == "reward":
        return RewardModel.from_causal_lm(model, seed).to(device).train(), RewardObjective(False)
    if run == "dpo":
        return model, PreferenceObjective("dpo", 0.1)
    return model, SFTObjective()


def loader(run: str, exs: list[Example], pairs: list[Pair], batch: int, seq: int, seed: int):
    if run == "pretrain":
        return Stream(np.concatenate([np.asarray(e.ids) for e in exs]), batch, seq)
    if run in ("reward", "dpo"):
        mean_pair = np.mean([len(p.prompt) * 2 + len(p.chosen) + len(p.rejected) for p in pairs])
        n = max(1, round(batch * seq / mean_pair))
        ref = {p.key(): (0.0, 0.0) for p in pairs} if run == "dpo" else None
        return PairLoader(pairs, n, 0, seed=seed, ref=ref, packed=run == "dpo")
    L = seq - N_VIRTUAL if run == "prompt" else seq
    cut = [Example(e.ids[:L], e.mask[:L]) for e in exs]
    cut = [e for e in cut if e.n_targets]  # as encode_records: no answer left, no example
    if run == "sft_unpacked":
        return row_loader([example_row(e) for e in cut], batch, L, 0, packed=False, seed=seed)
    return RowLoader(pack(cut, L), batch, 0, packed=True, seed=seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_run(run: str, args, shape: str, model_dir: Path, device: torch.device, out_dir: Path) -> dict:
    cfg = ModelConfig(**SHAPES[shape], max_seq_len=args.seq)
    exs, pairs = make_data(cfg.vocab_size, args.examples, args.seed)
    model, objective = build(run, model_dir, cfg, device, args.seed)
    data = loader(run, exs, pairs, args.batch, args.seq, args.seed)
    tcfg = TrainConfig(
        max_steps=10**6,
        batch_size=args.batch,
        lr=1e-4,
        warmup_steps=0,
        compile=args.compile,
        activation_checkpointing=args.checkpointing,
    )
    trainer = Trainer(
        model, objective, data, tcfg, out_dir / run, device=device, dtype="auto", log=lambda m: None
    )
    it = iter(data)
    for _ in range(args.warmup):
        trainer._train_step([next(it)])
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens = units = 0
    losses = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        out = trainer._train_step([next(it)])
        tokens, units = tokens + out.tokens, units + out.units
        losses.append(out.loss)
    _sync(device)
    dt = time.perf_counter() - t0
    mem, kind = peak_memory(device)
    unit = getattr(objective, "unit_name", "tokens")
    row = {
        "run": run,
        "shape": shape,
        "tokens_per_s": round(tokens / dt, 1),
        "tokens_per_step": round(tokens / args.steps),
        unit + "_per_s": round(units / dt, 2),
        "peak_memory_gib": round(mem / 2**30, 3),
        "peak_memory_kind": kind,
        "step_s": round(dt / args.steps, 4),
        "loss_last": losses[-1],
    }
    del trainer, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--shape", action="append", choices=sorted(SHAPES), help="repeatable; cpu: tiny, cuda: 124m"
    )
    ap.add_argument("--seq", type=int, default=None, help="default: 1024 on cpu, 2048 on cuda")
    ap.add_argument("--batch", type=int, default=None, help="rows of seq per step (default: cpu 2, cuda 8)")
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="fewer steps (the GPU command)")
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--compile", action="store_true", help="TrainConfig.compile for every run")
    ap.add_argument(
        "--checkpointing",
        action="store_true",
        help="TrainConfig.activation_checkpointing for every run (memory: recompute blocks in backward)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)  # one run in a fresh process
    ap.add_argument("--_model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    shapes = args.shape or (["124m"] if cuda else ["tiny"])
    args.seq = args.seq or (2048 if cuda else 1024)
    args.batch = args.batch or (8 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    args.steps = args.steps if args.steps is not None else (4 if args.quick else 8 if cuda else 4)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    runs = [r for r in args.runs.split(",") if r]
    if bad := [r for r in runs if r not in RUNS]:
        raise SystemExit(f"--runs: unknown {bad}; choose from {', '.join(RUNS)}")

    if args._one:  # child process: one run, its row as JSON on stdout
        with tempfile.TemporaryDirectory() as tmp:
            row = time_run(args._one, args, shapes[-1], Path(args._model), device, Path(tmp))
        print("ROW " + json.dumps(row))
        return {"rows": [row]}

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            cfg = ModelConfig(**SHAPES[shape], max_seq_len=args.seq)
            torch.manual_seed(args.seed)
            model_dir = Path(tmp) / shape
            save_pretrained(Transformer(cfg), model_dir, bos_id=1, eos_id=2)
            for run in runs:
                t = time.perf_counter()
                if cuda:
                    try:
                        row = time_run(run, args, shape, model_dir, device, Path(tmp))
                    except Exception as e:  # e.g. QLoRA without an NF4 backend: report, go on
                        print(f"{shape:>5} {run:<13} failed: {type(e).__name__}: {e}", flush=True)
                        rows.append({"run": run, "shape": shape, "error": f"{type(e).__name__}: {e}"})
                        continue
                else:  # a fresh process per run, so its peak RSS is its own
                    cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
                    cmd += ["--_one", run, "--_model", str(model_dir), "--shape", shape]
                    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    line = next((x for x in res.stdout.splitlines() if x.startswith("ROW ")), None)
                    if line is None:
                        raise SystemExit(f"run {run} failed:\n{res.stderr[-3000:]}")
                    row = json.loads(line[4:])
                row["wall_s"] = round(time.perf_counter() - t, 1)
                rows.append(row)
                if args.out:  # written as it goes: a run cut short keeps what it measured
                    Path(args.out).write_text(json.dumps({"partial": True, "rows": rows}, indent=2))
                print(
                    f"{shape:>5} {run:<13} {row['tokens_per_s']:>12,.0f} tokens/s  "
                    f"peak {row['peak_memory_gib']:.2f} GiB ({row['peak_memory_kind']})  "
                    f"{row['tokens_per_step']:,} tokens/step",
                    flush=True,
                )
    for shape in shapes:
        base = next((r for r in rows if r["shape"] == shape and r["run"] == "pretrain"), None)
        full = next((r for r in rows if r["shape"] == shape and r["run"] == "sft_packed"), None)
        for r in rows:
            if "error" in r:
                continue
            if r["shape"] == shape and base:
                r["vs_pretrain"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
            if r["shape"] == shape and full:
                r["memory_vs_full_sft"] = round(r["peak_memory_gib"] / max(full["peak_memory_gib"], 1e-9), 3)
    res = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seq": args.seq,
        "batch": args.batch,
        "warmup": args.warmup,
        "steps": args.steps,
        "compile": args.compile,
        "activation_checkpointing": args.checkpointing,
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
