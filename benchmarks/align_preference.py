"""Alignment benchmark: a reward model on HH-RLHF, DPO / IPO / ORPO on the built-in preference set.

    python benchmarks/align_preference.py --model runs/tiny/sft/model
    python benchmarks/align_preference.py --model runs/tiny/sft/model --hh-dpo   # + DPO on HH (slower)

Everything runs through the real stages (`lmforge reward`, `lmforge align`) with the overrides
printed next to each figure, in run directories under --root (one run per experiment), so each
number can be reproduced with the printed `lmforge` command.

1. Reward model on ../shared/data/hh-rlhf (1,312 harmless-base pairs; a hashed 20% held out):
   held-out pairwise accuracy with its Wilson 95% interval, next to two trivial baselines on the
   same held-out pairs (always prefer the shorter / the longer answer).
2. DPO, IPO and ORPO from the SFT model on the built-in preference set: held-out preference
   accuracy (summed and length-normalised log-probs), the implicit-reward accuracy, the KL
   estimate to the reference, before and after -- overall and per kind of rejected answer
   (`swap`: another name's docstring, `truncated`, `evasive`; see docs/alignment.md).
3. With --hh-dpo, DPO on the HH pairs too.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base_test_first1312.jsonl"

PREF_METHODS = {  # method -> overrides chosen for the tiny model (lr, beta)
    "dpo": ["align.lr=5e-4", "align.beta=0.1"],
    "ipo": ["align.lr=5e-4", "align.beta=0.05"],
    "orpo": ["align.lr=2e-4", "align.beta=1.0"],
}


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(stage: str, root: Path, name: str, overrides: list[str], threads: int):
    from lmforge.pipeline import load_config, run_stage

    ov = [f"run.root={root}", f"run.name={name}", "run.device=cpu", f"run.threads={threads}", *overrides]
    cmd = f"lmforge {stage} " + " ".join(ov)
    print(f"\n$ {cmd}", flush=True)
    t, c = time.time(), cpu_s()
    o = run_stage(load_config(None, ov), stage, force=True)
    return o, cmd, round(time.time() - t, 1), round(cpu_s() - c, 1)


def length_baselines(
    data: Path, val_fraction: float, seed: int, max_prompt_len: int, seq_len: int, model: Path
):
    """Accuracy of 'prefer the shorter answer' and 'prefer the longer answer' on the held-out pairs."""
    from lmforge.align.preference import encode_pairs, load_preference_records
    from lmforge.chat import ChatFormat
    from lmforge.data.builtin import split_train_val

    recs = load_preference_records([str(data)])
    keys = [json.dumps(r, sort_keys=True, default=str) for _, r in recs]
    _, va = split_train_val(keys, val_fraction, seed)
    va = set(va)
    val = [wr for wr, k in zip(recs, keys) if k in va]
    pairs, _ = encode_pairs(val, ChatFormat.from_dir(model), seq_len, max_prompt_len=max_prompt_len)
    n = len(pairs)
    shorter = sum((len(p.chosen) < len(p.rejected)) + 0.5 * (len(p.chosen) == len(p.rejected)) for p in pairs)
    return {"pairs": n, "prefer_shorter": shorter / n, "prefer_longer": 1 - shorter / n}


def per_kind(
    model_before: Path, model_after: Path, max_examples: int, val_fraction: float, seed: int, seq_len: int
):
    """Held-out accuracy before/after for each kind of rejected answer: summed log-probs (`before`,
    `after`) and per-token mean log-probs (`before_norm`, `after_norm`)."""
    import torch

    from lmforge.align.preference import encode_pairs, load_preference_records
    from lmforge.align.reference import pair_logps
    from lmforge.chat import ChatFormat
    from lmforge.data.builtin import split_train_val
    from lmforge.model.hf import load_pretrained

    recs = load_preference_records(["builtin"], max_examples)
    keys = [json.dumps(r, sort_keys=True, default=str) for _, r in recs]
    _, va = split_train_val(keys, val_fraction, seed)
    va = set(va)
    groups = defaultdict(list)
    for (w, r), k in zip(recs, keys):
        if k in va:
            groups[r["kind"]].append((w, r))
    fmt = ChatFormat.from_dir(model_before)
    out = {}
    models = {"before": load_pretrained(model_before), "after": load_pretrained(model_after)}
    for kind, rs in sorted(groups.items()):
        pairs, _ = encode_pairs(rs, fmt, seq_len)
        row = {"pairs": len(pairs)}
        for tag, m in models.items():
            pc, pr, nc, nr = pair_logps(m, pairs, fmt.tok.pad_id, torch.device("cpu"), 32)
            for suffix, d in (("", pc - pr), ("_norm", pc / nc - pr / nr)):
                row[tag + suffix] = float(((d > 0).double() + 0.5 * (d == 0).double()).mean())
        out[kind] = row
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="SFT model folder (e.g. runs/tiny/sft/model)")
    ap.add_argument("--hh", type=Path, default=HH)
    ap.add_argument("--root", type=Path, default=Path("/tmp/lmforge-align-bench"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--rm-steps", type=int, default=150)
    ap.add_argument("--pref-steps", type=int, default=60)
    ap.add_argument("--pref-examples", type=int, default=800)
    ap.add_argument("--methods", default="dpo,ipo,orpo")
    ap.add_argument("--hh-dpo", action="store_true", help="also DPO on the HH pairs")
    ap.add_argument("--hh-dpo-steps", type=int, default=60)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    import torch

    import lmforge.stages.align  # noqa: F401

    torch.set_num_threads(a.threads)
    seed = [f"run.seed={a.seed}"]
    res: dict = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch threads {a.threads}",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "model": str(a.model),
    }

    # 1. reward model on HH-RLHF
    hh_common = [
        f"reward.data={a.hh}",
        "reward.max_examples=null",
        "reward.val_fraction=0.2",
        "reward.max_val_examples=1000",
        "reward.seq_len=256",
        "reward.max_prompt_len=160",
        "reward.batch_size=8",
    ]
    if a.hh.exists():
        o, cmd, wall, cpu = run(
            "reward",
            a.root,
            "rm-hh",
            seed
            + [
                f"reward.model={a.model}",
                *hh_common,
                f"reward.max_steps={a.rm_steps}",
                "reward.lr=3e-4",
                "reward.warmup_steps=10",
                "reward.checkpoint_every=0",
            ],
            a.threads,
        )
        m = o.metrics
        res["reward_hh"] = {
            "command": cmd,
            "wall_s": wall,
            "cpu_s": cpu,
            **{
                k: m.get(k)
                for k in (
                    "val_pairs",
                    "train_pairs",
                    "val_accuracy_before",
                    "val_accuracy_after",
                    "val_accuracy_ci_low",
                    "val_accuracy_ci_high",
                    "val_margin_after",
                    "val_loss_after",
                    "train_dropped",
                    "train_dropped_empty_completion",
                    "train_dropped_identical",
                    "train_truncated",
                    "val_dropped",
                )
            },
            "baselines": length_baselines(a.hh, 0.2, a.seed, 160, 256, a.model),
        }
        print(json.dumps(res["reward_hh"], indent=1), flush=True)
    else:
        print(f"{a.hh}: not found; skipping the HH reward model")

    # 2. DPO / IPO / ORPO on the built-in preference set
    res["builtin"] = {}
    for method in a.methods.split(","):
        ov = seed + [
            f"align.model={a.model}",
            f"align.method={method}",
            f"align.max_steps={a.pref_steps}",
            f"align.max_examples={a.pref_examples}",
            "align.batch_size=8",
            "align.seq_len=256",
            "align.checkpoint_every=0",
            *PREF_METHODS[method],
        ]
        o, cmd, wall, cpu = run("align", a.root, f"pref-{method}", ov, a.threads)
        m = o.metrics
        row = {
            "command": cmd,
            "wall_s": wall,
            "cpu_s": cpu,
            **{k: m.get(k) for k in m if k.startswith("val_") or k in ("steps", "train_pairs")},
        }
        row["per_kind"] = per_kind(a.model, o.dir / "model", a.pref_examples, 0.1, a.seed, 256)
        res["builtin"][method] = row
        print(json.dumps(row, indent=1), flush=True)

    # 3. DPO on HH
    if a.hh_dpo and a.hh.exists():
        ov = seed + [
            f"align.model={a.model}",
            "align.method=dpo",
            f"align.data={a.hh}",
            "align.max_examples=null",
            "align.val_fraction=0.2",
            "align.max_val_examples=1000",
            "align.seq_len=256",
            "align.max_prompt_len=160",
            f"align.max_steps={a.hh_dpo_steps}",
            "align.batch_size=8",
            "align.lr=2e-4",
            "align.beta=0.1",
            "align.checkpoint_every=0",
        ]
        o, cmd, wall, cpu = run("align", a.root, "dpo-hh", ov, a.threads)
        m = o.metrics
        res["dpo_hh"] = {
            "command": cmd,
            "wall_s": wall,
            "cpu_s": cpu,
            **{k: m.get(k) for k in m if k.startswith("val_") or k in ("steps", "train_pairs")},
        }
        print(json.dumps(res["dpo_hh"], indent=1), flush=True)

    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
