"""Learning benchmark: character-level Tiny Shakespeare with lmforge's real training engine.

Data: `/work/shared/data/tinyshakespeare/input.txt`, vocabulary = the sorted set of its
characters (65), first 90% train / last 10% val, exactly as nanoGPT's `shakespeare_char`.
Batches are random windows (nanoGPT's `get_batch`), drawn from a seeded generator per batch
index so the loader's state is one integer and a resumed run sees the same batches.

Model and loop: `lmforge.model.Transformer` + `lmforge.train.engine.Trainer` with the pretrain
objective; nothing is re-implemented here except the loader and the evaluation.

Runs (`--runs`, comma separated; the names are in RUNS below):
- `nanogpt`: the configuration nanoGPT's README runs on CPU (4 layers, 4 heads, width 128,
  context 64, batch 12, 2000 steps, lr 1e-3 warmup 100 cosine to 1e-4, AdamW (0.9, 0.99),
  weight decay 0.1, clip 1.0, tied embeddings, no dropout). nanoGPT reaches val 1.886.
- `recommended`: lmforge's recommended settings for small character models (same model, same
  engine, same batch): lr 2e-3, warmup 50, WSD schedule (flat, then the last 40% linear to 0),
  700 steps. Found with `--runs sweep` .. `sweep4` (see RESULTS_foundation.md): what matters at
  this size is ending the run with a decay to 0 (lr 1e-3..3e-3 are within noise of each other
  in the flat phase; higher lr, bigger batches, beta2 0.95, an untied head did worse).
- anything else in RUNS: the sweep's candidates.

Val loss is measured two ways: `val_est`, nanoGPT's `estimate_loss` (mean over 200 random val
batches of 12 x 64; here a fixed seed so every evaluation sees the same batches) and `val_full`,
the whole val split cut into consecutive 64-character windows (deterministic; every
evaluation). Time to target is the training wall time (evaluations excluded, they are timed
separately) at the first evaluation whose `val_full` <= the target.

The machine these figures come from is shared, so wall times of runs made one after the other
drift with the load. `--calibrate N` therefore also times N engine steps of every run's
configuration *interleaved* (run A step, run B step, ...) and reports the projected training time
to target = steps to target x that median step time, which compares runs under the same load.

    python benchmarks/shakespeare_char.py --runs nanogpt,recommended
    python benchmarks/shakespeare_char.py --runs sweep --eval-every 100 --eval-from 0.5
    python benchmarks/shakespeare_char.py --runs sweep2 --eval-every 50 --eval-from 0.7
    python benchmarks/shakespeare_char.py --runs sweep3 --eval-every 50 --eval-from 0.7
    python benchmarks/shakespeare_char.py --runs sweep4 --eval-every 50 --eval-from 0.7
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.train.config import TrainConfig
from lmforge.train.engine import Trainer
from lmforge.train.objectives.pretrain import pretrain_objective

DATA = Path("/work/shared/data/tinyshakespeare/input.txt")
TARGET = 1.88


# ----------------------------------------------------------------------------- data
def load_char_data(path: Path = DATA) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    text = path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.int64)
    n = int(0.9 * len(data))
    return data[:n], data[n:], chars


class RandomWindows:
    """nanoGPT's get_batch as a StatefulIterator: batch i uses a generator seeded with (seed, i),
    so the state is just the number of batches handed out."""

    def __init__(self, data: torch.Tensor, block: int, batch: int, seed: int = 1337):
        self.data, self.block, self.batch, self.seed = data, block, batch, seed
        self.index = 0

    def batch_at(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        ix = torch.randint(len(self.data) - self.block, (self.batch,), generator=g)
        win = torch.stack([self.data[j : j + self.block + 1] for j in ix.tolist()])
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()

    def __iter__(self):
        while True:
            b = self.batch_at(self.index)
            self.index += 1
            yield b

    def state_dict(self) -> dict:
        return {"index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.index, self.seed = int(state["index"]), int(state["seed"])


class Evaluator:
    """Callable for Trainer(evaluate=...): returns {"loss": val_full, "est": val_est} and keeps
    a history with the training wall time at each evaluation (evaluations excluded)."""

    def __init__(
        self,
        val: torch.Tensor,
        block: int,
        eval_iters: int = 200,
        eval_batch: int = 12,
        seed: int = 4242,
        chunk: int = 256,
        est_every_eval: bool = False,
        wanted: Callable[[int], bool] | None = None,
    ):
        self.wanted = wanted
        self.est_every_eval = est_every_eval
        self.est_batches = [
            RandomWindows(val, block, eval_batch, seed).batch_at(i) for i in range(eval_iters)
        ]
        n = (len(val) - 1) // block
        self.full_x = val[: n * block].view(n, block)
        self.full_y = val[1 : n * block + 1].view(n, block)
        self.chunk = chunk
        self.eval_seconds = 0.0
        self.t_start: float | None = None
        self.history: list[dict] = []
        self.trainer: Trainer | None = None

    @staticmethod
    def _mean_loss(model, xs, ys) -> float:
        tot, cnt = 0.0, 0
        for x, y in zip(xs, ys):
            logits = model(x)
            tot += float(
                F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
            )
            cnt += y.numel()
        return tot / cnt

    def __call__(self, model) -> dict[str, float]:
        t0 = time.perf_counter()
        final = self.trainer is None or self.trainer.step >= self.trainer.cfg.max_steps
        if (
            not final
            and self.wanted is not None
            and self.trainer is not None
            and not self.wanted(self.trainer.step)
        ):
            return {}  # not an evaluation step of this run (saves wall time on a slow machine)
        est = float("nan")
        if final or self.est_every_eval:  # 153,600 tokens: only at the end unless asked
            est = self._mean_loss(model, [b[0] for b in self.est_batches], [b[1] for b in self.est_batches])
        full = self._mean_loss(model, self.full_x.split(self.chunk), self.full_y.split(self.chunk))
        dt = time.perf_counter() - t0
        self.eval_seconds += dt
        step = self.trainer.step if self.trainer else -1
        train_s = t0 - self.t_start - (self.eval_seconds - dt) if self.t_start else float("nan")
        self.history.append({"step": step, "val_full": full, "val_est": est, "train_s": train_s})
        return {"loss": full, "est": est}


# ----------------------------------------------------------------------------- runs
NANOGPT_MODEL = dict(vocab_size=65, d_model=128, n_layers=4, n_heads=4, max_seq_len=64, tie_embeddings=True)
NANOGPT_TRAIN = dict(
    max_steps=2000,
    batch_size=12,
    lr=1e-3,
    min_lr_ratio=0.1,
    warmup_steps=100,
    schedule="cosine",
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.99,
    grad_clip=1.0,
)


@dataclass
class Run:
    model: dict = field(default_factory=dict)  # overrides of NANOGPT_MODEL
    train: dict = field(default_factory=dict)  # overrides of NANOGPT_TRAIN
    note: str = ""
    # Evaluations: every `eval_every` steps inside `eval_window` (fractions of max_steps, where
    # the target is crossed), every `sparse_every` steps elsewhere (0 = none), and at the end.
    eval_every: int = 250
    eval_window: tuple[float, float] = (0.0, 1.0)
    sparse_every: int = 250


RUNS: dict[str, Run] = {
    "nanogpt": Run(note="nanoGPT shakespeare_char CPU config", eval_every=50, eval_window=(0.3, 0.5)),
    # lmforge's recommendation for small char-level models (chosen from the sweep below):
    "recommended": Run(
        train=dict(
            max_steps=700,
            batch_size=12,
            lr=2e-3,
            warmup_steps=50,
            schedule="wsd",
            decay_fraction=0.4,
            min_lr_ratio=0.0,
            weight_decay=0.1,
            beta1=0.9,
            beta2=0.99,
        ),
        note="lr 2e-3, warmup 50, WSD (last 40% linear to 0), batch 12, 700 steps",
        eval_every=50,
        eval_window=(0.6, 1.0),
    ),
    # sweep candidates, round 1 (`--runs sweep`)
    "lr3e-3_1000": Run(train=dict(lr=3e-3, max_steps=1000, warmup_steps=50), note="lr 3e-3, 1000 steps"),
    "lr6e-3_wsd_1000": Run(
        train=dict(
            lr=6e-3, max_steps=1000, warmup_steps=50, schedule="wsd", decay_fraction=0.4, min_lr_ratio=0.0
        ),
        note="lr 6e-3 WSD 1000 steps",
    ),
    "lr1e-2_wsd_1000": Run(
        train=dict(
            lr=1e-2, max_steps=1000, warmup_steps=50, schedule="wsd", decay_fraction=0.4, min_lr_ratio=0.0
        ),
        note="lr 1e-2 WSD 1000 steps",
    ),
    "b24_lr6e-3_wsd_800": Run(
        train=dict(
            batch_size=24,
            lr=6e-3,
            max_steps=800,
            warmup_steps=50,
            schedule="wsd",
            decay_fraction=0.4,
            min_lr_ratio=0.0,
        ),
        note="batch 24, lr 6e-3 WSD 800",
    ),
    "b48_lr8e-3_wsd_500": Run(
        train=dict(
            batch_size=48,
            lr=8e-3,
            max_steps=500,
            warmup_steps=30,
            schedule="wsd",
            decay_fraction=0.4,
            min_lr_ratio=0.0,
        ),
        note="batch 48, lr 8e-3 WSD 500",
    ),
    # round 2 (`--runs sweep2`: small batch, lr ~3e-3, schedules that end at the target)
    "lr3e-3_600": Run(train=dict(lr=3e-3, max_steps=600, warmup_steps=50), note="lr 3e-3 cosine 600"),
    "lr3e-3_500": Run(train=dict(lr=3e-3, max_steps=500, warmup_steps=50), note="lr 3e-3 cosine 500"),
    "lr3e-3_wsd_600": Run(
        train=dict(
            lr=3e-3, max_steps=600, warmup_steps=50, schedule="wsd", decay_fraction=0.4, min_lr_ratio=0.0
        ),
        note="lr 3e-3 WSD 600",
    ),
    "lr4e-3_b2.95_600": Run(
        train=dict(lr=4e-3, beta2=0.95, max_steps=600, warmup_steps=50), note="lr 4e-3 beta2 0.95 cosine 600"
    ),
    "b8_lr3e-3_800": Run(
        train=dict(batch_size=8, lr=3e-3, max_steps=800, warmup_steps=50), note="batch 8, lr 3e-3 cosine 800"
    ),
    # round 3 (`--runs sweep3`: ~700 steps; untied head; longer decay)
    "wsd_700": Run(
        train=dict(
            lr=3e-3, max_steps=700, warmup_steps=50, schedule="wsd", decay_fraction=0.4, min_lr_ratio=0.0
        ),
        note="lr 3e-3 WSD 700",
    ),
    "wsd_700_untied": Run(
        model=dict(tie_embeddings=False),
        train=dict(
            lr=3e-3, max_steps=700, warmup_steps=50, schedule="wsd", decay_fraction=0.4, min_lr_ratio=0.0
        ),
        note="lr 3e-3 WSD 700, untied head",
    ),
    "wsd_700_d0.6": Run(
        train=dict(
            lr=3e-3, max_steps=700, warmup_steps=50, schedule="wsd", decay_fraction=0.6, min_lr_ratio=0.0
        ),
        note="lr 3e-3 WSD 700, decay 60%",
    ),
    "wsd_700_lr2e-3": Run(
        train=dict(
            lr=2e-3, max_steps=700, warmup_steps=50, schedule="wsd", decay_fraction=0.4, min_lr_ratio=0.0
        ),
        note="lr 2e-3 WSD 700",
    ),
    "wsd_700_wd0": Run(
        train=dict(
            lr=3e-3,
            max_steps=700,
            warmup_steps=50,
            schedule="wsd",
            decay_fraction=0.4,
            min_lr_ratio=0.0,
            weight_decay=0.0,
        ),
        note="lr 3e-3 WSD 700, no weight decay",
    ),
    # round 4 (`--runs sweep4`: lr 1.5e-3..2e-3, 600-650 steps)
    "wsd_600_lr2e-3": Run(
        train=dict(
            lr=2e-3, max_steps=600, warmup_steps=50, schedule="wsd", decay_fraction=0.4, min_lr_ratio=0.0
        ),
        note="lr 2e-3 WSD 600",
    ),
    "wsd_650_lr2e-3": Run(
        train=dict(
            lr=2e-3, max_steps=650, warmup_steps=50, schedule="wsd", decay_fraction=0.4, min_lr_ratio=0.0
        ),
        note="lr 2e-3 WSD 650",
    ),
    "wsd_650_lr1.5e-3": Run(
        train=dict(
            lr=1.5e-3, max_steps=650, warmup_steps=50, schedule="wsd", decay_fraction=0.4, min_lr_ratio=0.0
        ),
        note="lr 1.5e-3 WSD 650",
    ),
    "wsd_650_lr2e-3_d0.5": Run(
        train=dict(
            lr=2e-3, max_steps=650, warmup_steps=50, schedule="wsd", decay_fraction=0.5, min_lr_ratio=0.0
        ),
        note="lr 2e-3 WSD 650, decay 50%",
    ),
}
SWEEP = ["lr3e-3_1000", "lr6e-3_wsd_1000", "lr1e-2_wsd_1000", "b24_lr6e-3_wsd_800", "b48_lr8e-3_wsd_500"]
SWEEP2 = ["lr3e-3_600", "lr3e-3_500", "lr3e-3_wsd_600", "lr4e-3_b2.95_600", "b8_lr3e-3_800"]
SWEEP3 = ["wsd_700", "wsd_700_untied", "wsd_700_d0.6", "wsd_700_lr2e-3", "wsd_700_wd0"]
SWEEP4 = ["wsd_600_lr2e-3", "wsd_650_lr2e-3", "wsd_650_lr1.5e-3", "wsd_650_lr2e-3_d0.5"]


def run_one(name: str, run: Run, train: torch.Tensor, val: torch.Tensor, args) -> dict:
    mcfg = ModelConfig(**{**NANOGPT_MODEL, **run.model})
    tkw = {**NANOGPT_TRAIN, **run.train}
    steps = tkw["max_steps"]
    every = run.eval_every if args.eval_every is None else args.eval_every
    every = every if every > 0 else steps
    (lo, hi), sparse = run.eval_window, run.sparse_every
    if args.eval_from is not None:  # sweeps: only the end of the run, nothing sparse before it
        (lo, hi), sparse = (args.eval_from, 1.0), 0

    def wanted(step: int) -> bool:
        return (lo * steps <= step <= hi * steps and step % every == 0) or bool(sparse and step % sparse == 0)

    eval_every = math.gcd(every, sparse) if sparse else every
    tcfg = TrainConfig(
        **tkw,
        eval_every=eval_every,
        checkpoint_every=0,
        keep_checkpoints=1,
        log_every=args.log_every,
        compile=args.compile,
    )
    torch.manual_seed(args.seed)
    model = Transformer(mcfg)
    loader = RandomWindows(train, mcfg.max_seq_len, tcfg.batch_size, seed=args.seed)
    ev = Evaluator(val, mcfg.max_seq_len, wanted=wanted)
    out = Path(tempfile.mkdtemp(prefix=f"lmforge_shk_{name}_"))
    log = print if args.verbose else (lambda s: None)
    tr = Trainer(
        model,
        pretrain_objective(),
        loader,
        tcfg,
        out,
        device=torch.device("cpu"),
        dtype="float32",
        evaluate=ev,
        log=log,
    )
    ev.trainer = tr
    print(
        f"[{name}] {run.note or ''}: steps {tcfg.max_steps} batch {tcfg.batch_size} lr {tcfg.lr} "
        f"{tcfg.schedule} params {model.num_params() / 1e6:.3f}M  eval every {every} in steps "
        f"{int(lo * steps)}-{int(hi * steps)}" + (f", every {sparse} elsewhere" if sparse else ""),
        flush=True,
    )
    t0 = time.perf_counter()
    ev.t_start = t0
    res = tr.fit(resume=False)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    hit = next((h for h in ev.history if h["val_full"] <= args.target), None)
    final = ev.history[-1]
    row = {
        "name": name,
        "note": run.note,
        "steps": tcfg.max_steps,
        "batch": tcfg.batch_size,
        "lr": tcfg.lr,
        "schedule": tcfg.schedule,
        "val_full": final["val_full"],
        "val_est": final["val_est"],
        "train_loss": res.final.get("loss"),
        "wall_s": wall,
        "eval_s": ev.eval_seconds,
        "train_s": wall - ev.eval_seconds,
        "hit_step": hit["step"] if hit else None,
        "hit_train_s": hit["train_s"] if hit else None,
        "history": ev.history,
    }
    for h in ev.history:
        print(
            f"    step {h['step']:>5}  val_full {h['val_full']:.4f}  val_est {h['val_est']:.4f}  "
            f"train {h['train_s']:.1f}s",
            flush=True,
        )
    print(
        f"  -> val_full {row['val_full']:.4f} val_est {row['val_est']:.4f}  train {row['train_s']:.1f}s "
        f"(+ eval {row['eval_s']:.1f}s)  {_fmt_hit(row)}",
        flush=True,
    )
    return row


def _fmt_hit(r: dict) -> str:
    if r["hit_step"] is None:
        return f"never <= {TARGET} at the evaluations"
    return f"<= {TARGET} at step {r['hit_step']} after {r['hit_train_s']:.1f}s"


def main(argv=None) -> int:
    global TARGET
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--runs", default="nanogpt,recommended", help=f"comma list of {sorted(RUNS)} or 'sweep' .. 'sweep4'"
    )
    ap.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="evaluate every N steps (0 = only at the end); default: each run's own (RUNS)",
    )
    ap.add_argument(
        "--eval-from",
        type=float,
        default=None,
        help="sweeps: evaluate only from this fraction of each run's steps on (and at the end)",
    )
    ap.add_argument("--target", type=float, default=TARGET)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0 = torch default). 1: on a loaded 2-core machine two OpenMP threads "
        "wait on each other at every op (measured 3-40x slower steps; RESULTS_foundation.md)",
    )
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--log-every", type=int, default=250)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--calibrate", type=int, default=30, help="interleaved timed steps per run (0 = off)")
    ap.add_argument("--verbose", action="store_true", help="print the engine's progress lines")
    args = ap.parse_args(argv)
    TARGET = args.target
    if args.threads:
        torch.set_num_threads(args.threads)
    names = []
    for n in args.runs.split(","):
        names += {"sweep": SWEEP, "sweep2": SWEEP2, "sweep3": SWEEP3, "sweep4": SWEEP4}.get(n, [n])
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        ap.error(f"unknown run(s) {unknown}; choose from {sorted(RUNS)} or 'sweep' .. 'sweep4'")

    train, val, chars = load_char_data()
    print(
        f"# shakespeare_char  torch {torch.__version__}  threads {torch.get_num_threads()}  vocab {len(chars)}  "
        f"train {len(train):,} val {len(val):,} chars  target val <= {TARGET}"
    )
    rows = [run_one(n, RUNS[n], train, val, args) for n in names]

    step_ms = calibrate(names, train, args) if args.calibrate else {}

    print(
        "\n| run | settings | steps | batch | final val (full) | final val (est, 200x12) | train wall (s) "
        f"| eval wall (s) | first eval <= {TARGET:.2f}: step / train wall (s) | interleaved ms/step | projected train s to target |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        hit = "no" if r["hit_step"] is None else f"{r['hit_step']} / {r['hit_train_s']:.1f}"
        ms = step_ms.get(r["name"])
        proj = "-" if ms is None or r["hit_step"] is None else f"{r['hit_step'] * ms / 1e3:.1f}"
        print(
            f"| {r['name']} | {r['note']} | {r['steps']} | {r['batch']} | {r['val_full']:.4f} | "
            f"{r['val_est']:.4f} | {r['train_s']:.1f} | {r['eval_s']:.1f} | {hit} | "
            f"{'-' if ms is None else f'{ms:.1f}'} | {proj} |"
        )
    return 0


def calibrate(names: list[str], train: torch.Tensor, args, warmup: int = 5) -> dict[str, float]:
    """Median engine-step time of each run's configuration, timed interleaved in one loop.

    Runs with the same model and batch do the same work per step, so they share one timing
    (the learning rate and schedule do not change the cost of a step)."""
    import statistics

    groups: dict[str, list[str]] = {}
    for n in dict.fromkeys(names):
        run = RUNS[n]
        tkw = {**NANOGPT_TRAIN, **run.train}
        key = repr(
            (sorted({**NANOGPT_MODEL, **run.model}.items()), tkw["batch_size"], tkw.get("grad_accum", 1))
        )
        groups.setdefault(key, []).append(n)
    trainers = {}
    for key, members in groups.items():
        run = RUNS[members[0]]
        mcfg = ModelConfig(**{**NANOGPT_MODEL, **run.model})
        tcfg = TrainConfig(**{**NANOGPT_TRAIN, **run.train}, compile=args.compile)
        torch.manual_seed(args.seed)
        tr = Trainer(
            Transformer(mcfg),
            pretrain_objective(),
            None,
            tcfg,
            Path(tempfile.mkdtemp(prefix="lmforge_cal_")),
            device=torch.device("cpu"),
            dtype="float32",
            log=lambda s: None,
        )
        tr._set_lr()
        loader = RandomWindows(train, mcfg.max_seq_len, tcfg.batch_size, seed=args.seed)
        trainers[key] = (tr, loader)
    times = {k: [] for k in trainers}
    for i in range(warmup + args.calibrate):
        order = list(trainers.items())
        if i % 2:
            order.reverse()
        for k, (tr, loader) in order:
            batches = [loader.batch_at(i * tr.cfg.grad_accum + j) for j in range(tr.cfg.grad_accum)]
            t0 = time.perf_counter()
            tr._train_step(batches)
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    out = {}
    for k, members in groups.items():
        ms = statistics.median(times[k]) * 1e3
        for n in members:
            out[n] = ms
    print(
        f"\ninterleaved engine-step time (median of {args.calibrate}, one timing per distinct model+batch): "
        + "  ".join(f"{'/'.join(m)} {out[m[0]]:.1f} ms" for m in groups.values())
    )
    return out


if __name__ == "__main__":
    sys.exit(main())
