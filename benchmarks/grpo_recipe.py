"""Does GRPO raise held-out arithmetic accuracy on CPU, beyond seed noise? One recipe, several seeds.

    python benchmarks/grpo_recipe.py [--root /tmp/lmforge-grpo] [--seeds 1 2 3 4 5]
                                     [--pretrain-steps 60] [--sft-steps 400] [--steps 120]
                                     [--set rl.KEY=VALUE ...] [--out F.json]

1. The starting model, built through the CLI in `<root>/tiny` and cached there by the pipeline's
   own fingerprints (a second call with the same settings skips it): `lmforge data`,
   `tokenizer`, `pretrain` (the default tiny model, `--pretrain-steps`), then `lmforge sft` on
   the 1,801 built-in arithmetic train problems with worked answers ("6 + 7 = 13. The answer is
   13.", `--sft-steps`). GRPO needs a policy that is sometimes right: a group whose samples all
   get the same reward has zero advantage and teaches nothing. 400 SFT steps give a model that
   is right on 97% of the held-out problems greedily but on only ~88% of samples at T=1: GRPO
   has groups with mixed rewards and a greedy answer whose margins are wide enough that its
   noisy updates do not flip correct answers (docs/rl.md, "Practical notes").
2. For each seed, `lmforge rl` (GRPO, exact-match reward) from that SFT model, in its own run
   `<root>/seed<N>`, with the recipe below (`RECIPE`, changed with `--set`) and `--steps`
   optimizer steps. The held-out greedy answers to *all* 199 built-in held-out problems before
   and after training come back in the run's samples.jsonl (`rl.grpo.num_samples=199`).
3. Per seed: exact match before and after and the gain. Over seeds: the mean gain with a 95%
   t-interval (seeds are the unit: a recipe that helps one seed and hurts another has a wide
   interval), and a paired bootstrap over problems (each problem's gain averaged over the
   seeds, problems resampled): the interval of the same mean that counts the held-out set's
   finite size rather than the seeds' spread; and the same bootstrap over arithmetic facts
   (the problems with the same operands and answer resampled together: GRPO fixes or breaks a
   fact, not a wording, so problems of one fact are not independent).

The greedy "before" is the same for every seed (same model, greedy decoding); the seeds change
the rollouts' samples and the prompt order. Prints markdown for benchmarks/RESULTS.md; `--out`
writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# the recipe (see docs/rl.md, "Practical notes"); every key can be overridden with --set
RECIPE = {
    "rl.method": "grpo",
    "rl.data": "[builtin]",
    "rl.lr": "2e-5",
    "rl.batch_size": "32",
    "rl.grpo.group_size": "8",
    "rl.grpo.max_new_tokens": "24",
}
HELD_OUT = 199  # the built-in arithmetic held-out set, all of it

# two-sided 95% quantiles of Student's t, by degrees of freedom (scipy is not a dependency)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t-interval of the mean of `values` (at least two)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        raise ValueError("a t-interval needs at least two values (seeds)")
    half = T95.get(len(v) - 1, 1.96) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return float(v.mean()), float(v.mean()) - half, float(v.mean()) + half


def paired_bootstrap(
    before: np.ndarray, after: np.ndarray, n_boot: int = 10000, seed: int = 0, clusters=None
) -> tuple[float, float, float]:
    """(mean gain, low, high): `before` (problems) and `after` (seeds x problems) are 0/1 exact
    matches; each problem's gain is its mean over seeds minus before; problems are resampled, or
    with `clusters` (one key per problem) whole clusters are (problems that share an arithmetic
    fact are not independent draws)."""
    gain = np.asarray(after, dtype=np.float64).mean(axis=0) - np.asarray(before, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if clusters is None:
        idx = rng.integers(0, len(gain), size=(n_boot, len(gain)))
        means = gain[idx].mean(axis=1)
    else:
        keys = sorted(set(clusters))
        of = np.asarray([keys.index(k) for k in clusters])
        sums, sizes = np.bincount(of, weights=gain), np.bincount(of).astype(np.float64)
        idx = rng.integers(0, len(keys), size=(n_boot, len(keys)))
        means = sums[idx].sum(axis=1) / sizes[idx].sum(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(gain.mean()), float(lo), float(hi)


def fact(prompt: str, reference: str) -> str:
    """The arithmetic fact of a built-in problem: its two operands and the answer ("8 4 4")."""
    return " ".join([*re.findall(r"\d+", prompt), str(reference)])


def lmforge(args: list[str], log: Path) -> float:
    cmd = [sys.executable, "-m", "lmforge.cli", *args]
    t0 = time.time()
    with open(log, "a") as f:
        f.write("$ lmforge " + " ".join(args) + "\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.time() - t0


def exact_matches(samples: Path, key: str) -> np.ndarray:
    """0/1 exact match of the `key` ("before" / "after") answers in an rl run's samples.jsonl."""
    from lmforge.align.reward_functions import exact_match

    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    if len(rows) != HELD_OUT or any(r[key] is None for r in rows):
        raise RuntimeError(f"{samples}: expected {HELD_OUT} held-out answers ('{key}'), got {len(rows)}")
    return np.asarray(exact_match([r[key] for r in rows], [r["reference"] for r in rows]), dtype=np.float64)


def facts(samples: Path) -> list[str]:
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    return [fact(r["prompt"], r["reference"]) for r in rows]


def build_start(a, common: list[str], log: Path) -> tuple[Path, float]:
    """The SFT model GRPO starts from (cached by the pipeline), and the seconds it took."""
    from lmforge.align.tasks import arithmetic_sft_records, arithmetic_split

    t = sum(
        lmforge([stage, *common, f"pretrain.max_steps={a.pretrain_steps}"], log)
        for stage in ("data", "tokenizer", "pretrain")
    )
    train, _ = arithmetic_split()
    sft_file = Path(a.root) / "arithmetic_sft.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in arithmetic_sft_records(train))
    if not sft_file.exists() or sft_file.read_text() != text:
        sft_file.write_text(text)
    t += lmforge(
        ["sft", *common, f"sft.data=[{sft_file}]", f"sft.max_steps={a.sft_steps}", "sft.num_samples=0"], log
    )
    return Path(a.root) / "tiny" / "sft" / "model", t


def recipe_args(a, model: Path, seed: int) -> list[str]:
    rec = dict(RECIPE)
    rec.update(dict(kv.split("=", 1) for kv in a.set))
    rec.update(
        {
            "rl.model": str(model),
            "rl.max_steps": str(a.steps),
            "rl.eval_every": "0",
            "rl.max_val_examples": str(HELD_OUT),
            "rl.grpo.num_samples": str(HELD_OUT),
            "rl.checkpoint_every": "0",
        }
    )
    return [f"run.seed={seed}", f"run.name={a.name}seed{seed}", *(f"{k}={v}" for k, v in rec.items())]


def summarise(
    before: np.ndarray, after: dict[int, np.ndarray], seconds: dict[int, float], clusters=None
) -> dict:
    """Per-seed accuracies and gains, the t-interval over seeds and the paired bootstrap (over
    problems, and over `clusters` of problems when given)."""
    b = float(before.mean())
    per_seed = {
        s: {"before": b, "after": float(x.mean()), "gain": float(x.mean()) - b} for s, x in after.items()
    }
    for s in per_seed:
        per_seed[s]["seconds"] = seconds.get(s)
    out: dict = {"per_seed": per_seed, "n_problems": len(before), "before": b}
    if len(after) >= 2:
        m, lo, hi = t_interval([r["gain"] for r in per_seed.values()])
        out["t_interval"] = {"mean": m, "low": lo, "high": hi}
    m, lo, hi = paired_bootstrap(before, np.stack(list(after.values())))
    out["bootstrap"] = {"mean": m, "low": lo, "high": hi}
    if clusters is not None:
        m, lo, hi = paired_bootstrap(before, np.stack(list(after.values())), clusters=clusters)
        out["fact_bootstrap"] = {"mean": m, "low": lo, "high": hi, "facts": len(set(clusters))}
    return out


def report(fig: dict, cmd: str, say) -> None:
    say("```\n" + cmd + "\n```\n")
    say(f"Held-out greedy exact match on all {fig['n_problems']} built-in held-out problems:\n")
    say("| seed | before | after | gain | GRPO wall time |")
    say("|---|---:|---:|---:|---:|")
    for s, r in fig["per_seed"].items():
        say(f"| {s} | {r['before']:.3f} | {r['after']:.3f} | {r['gain']:+.3f} | {r['seconds'] or 0:.0f} s |")
    t, bs = fig.get("t_interval"), fig["bootstrap"]
    say("")
    if t:
        say(f"Mean gain {t['mean']:+.3f}, 95% t-interval over seeds [{t['low']:+.3f}, {t['high']:+.3f}]; ")
    line = f"paired bootstrap over problems (gain averaged over seeds) [{bs['low']:+.3f}, {bs['high']:+.3f}]"
    fb = fig.get("fact_bootstrap")
    if fb:
        line += f"; over the {fb['facts']} arithmetic facts (clusters) [{fb['low']:+.3f}, {fb['high']:+.3f}]"
    say(line + ".\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/lmforge-grpo")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--pretrain-steps", type=int, default=60)
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--steps", type=int, default=120, help="GRPO optimizer steps per seed")
    ap.add_argument("--name", default="", help="prefix of the per-seed run names (<root>/<name>seed<N>)")
    ap.add_argument("--set", action="append", default=[], metavar="rl.KEY=VALUE", help="recipe override")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    bad = [kv for kv in a.set if "=" not in kv or not kv.startswith("rl.")]
    if bad:
        ap.error(f"--set takes rl.KEY=VALUE, got {bad[0]!r}")
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    log = root / "bench.log"
    # one thread: the tiny model's small matmuls lose more to contention than they gain
    common = [f"run.root={root}", "run.device=cpu", "run.threads=1"]
    model, t_start = build_start(a, common, log)
    before, after, seconds = None, {}, {}
    for seed in a.seeds:
        args = ["rl", *common, *recipe_args(a, model, seed)]
        lmforge(args, log)
        stage = root / f"{a.name}seed{seed}" / "rl"
        # the stage's own time (a run already done with the same settings is skipped, not re-timed)
        seconds[seed] = float(json.loads((stage / "manifest.json").read_text())["seconds"])
        samples = stage / "samples.jsonl"
        b = exact_matches(samples, "before")
        if before is not None and not np.array_equal(before, b):
            raise RuntimeError(f"{samples}: the greedy 'before' answers differ between seeds")
        before = b
        after[seed] = exact_matches(samples, "after")
        print(f"seed {seed}: {b.mean():.3f} -> {after[seed].mean():.3f} ({seconds[seed]:.0f} s)", flush=True)
    assert before is not None
    fig = summarise(before, after, seconds, clusters=facts(samples))
    fig.update({"start_model_seconds": t_start, "recipe": recipe_args(a, model, 0)[2:], "steps": a.steps})
    out: list[str] = []
    cmd = "python benchmarks/grpo_recipe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report(fig, cmd + "\nlmforge rl " + " ".join(common + recipe_args(a, model, a.seeds[0])), out.append)
    print("\n".join(out))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(fig, indent=1))
    return fig


if __name__ == "__main__":
    main()
