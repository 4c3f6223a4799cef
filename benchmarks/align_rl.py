"""GRPO and PPO on the tiny CPU model: do the held-out numbers move the right way?

    python benchmarks/align_rl.py [--root /tmp/lmforge-rl] [--pretrain-steps 60] [--sft-steps 250]
                                  [--grpo-steps 60] [--ppo-steps 24] [--reward-steps 60] [--skip-ppo]
                                  [--skip-grpo] [--device cpu|cuda] [--set KEY=VALUE ...] [--out F.json]

On a GPU, the 76M shape of issue 19 (PPO's KL against target_kl; about two minutes on one H200):

    python benchmarks/align_rl.py --root /tmp/rl76m --device cuda --skip-grpo --pretrain-steps 300 \
        --sft-steps 150 --reward-steps 60 --ppo-steps 24 --set pretrain.model.d_model=768 \
        --set pretrain.model.n_layers=12 --set pretrain.model.n_heads=12 --set pretrain.seq_len=1024 \
        --out /tmp/rl76m.json

Everything goes through the CLI, in one run directory (`<root>/tiny`), so each figure comes with
the command that produced it:

1. `lmforge data`, `lmforge tokenizer`, `lmforge pretrain` (the default pipeline's start, short
   pretraining);
2. `lmforge sft` on the built-in arithmetic *train* problems with worked answers
   ("3 + 4 = 7. The answer is 7."): GRPO needs a policy that sometimes gets the answer right,
   or every group has zero reward variance and there is nothing to learn;
3. `lmforge rl` (GRPO, exact-match reward) on the arithmetic train prompts; the held-out
   exact-match accuracy (greedy) every `eval_every` steps is the curve;
4. `lmforge reward` (Bradley-Terry on the built-in preference pairs), then `lmforge rl
   rl.method=ppo` against that reward model on the pairs' prompts: held-out mean reward-model
   score (greedy) before/after, and the KL to the reference of sampled held-out answers against
   the configured `target_kl` (adaptive controller with its default horizon of one rollout, KL
   guard at 3 x target), with the per-rollout KL and the reward-hacking signals of the last rollout.

GSM8K is not run: a 2M-parameter CPU model scores 0 on it before and after, which says nothing;
`rl.data=<gsm8k train.jsonl> rl.val_data=[<gsm8k test.jsonl>]` is the command for a real model.
Prints markdown for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path


def lmforge(args: list[str], log: Path) -> float:
    cmd = [sys.executable, "-m", "lmforge.cli", *args]
    t0 = time.time()
    with open(log, "a") as f:
        f.write("$ lmforge " + " ".join(args) + "\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.time() - t0


def manifest(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "manifest.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/lmforge-rl")
    ap.add_argument("--pretrain-steps", type=int, default=60)
    ap.add_argument("--sft-steps", type=int, default=250)
    ap.add_argument("--grpo-steps", type=int, default=60)
    ap.add_argument("--reward-steps", type=int, default=60)
    ap.add_argument("--ppo-steps", type=int, default=24)
    ap.add_argument("--skip-ppo", action="store_true")
    ap.add_argument("--skip-grpo", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for every stage, e.g. pretrain.model.d_model=768 (repeatable)",
    )
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    a = ap.parse_args()
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    run = root / "tiny"
    log = root / "bench.log"
    # one thread: the tiny model's small matmuls lose more to thread contention than they gain
    # on a shared 2-core machine (measured: 0.4 s vs 13 s for one rollout under load)
    common = [f"run.root={root}", f"run.device={a.device}", *a.set]
    if a.device == "cpu":
        common.append("run.threads=1")
    figures: dict = {"device": a.device, "overrides": a.set}
    out: list[str] = []
    say = out.append

    from lmforge.align.tasks import arithmetic_sft_records, arithmetic_split

    # 1. pretrain (cached by the pipeline when already done with the same settings)
    # (one subcommand per stage: their order does not depend on the stage registry's)
    t_pre = sum(
        lmforge([stage, *common, f"pretrain.max_steps={a.pretrain_steps}"], log)
        for stage in ("data", "tokenizer", "pretrain")
    )
    # 2. SFT on arithmetic worked answers
    train, _ = arithmetic_split()
    sft_file = root / "arithmetic_sft.jsonl"
    sft_file.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_sft_records(train)))
    sft_args = ["sft", *common, f"sft.data=[{sft_file}]", f"sft.max_steps={a.sft_steps}", "sft.num_samples=0"]
    t_sft = lmforge(sft_args, log)
    # 3. GRPO
    # explicit start model: a stale align/ (later in the pipeline order) must not be picked up
    grpo_args = [
        "rl",
        *common,
        f"rl.model={run / 'sft' / 'model'}",
        "rl.method=grpo",
        f"rl.max_steps={a.grpo_steps}",
        "rl.lr=2e-5",
        "rl.batch_size=32",
        "rl.grpo.group_size=8",
        "rl.grpo.max_new_tokens=24",
        "rl.eval_every=10",
        "rl.max_val_examples=199",
        "rl.log_every=10",
    ]
    say(
        f"Machine: {platform.machine()}, {platform.system()}, python {platform.python_version()}, "
        + (
            "CPU only, 2 shared cores (other jobs running: wall times are upper bounds)"
            if a.device == "cpu"
            else f"device {a.device}"
        )
        + f". Date: {time.strftime('%Y-%m-%d')}.\n"
    )
    say(
        "Base: the default tiny model (d_model 192, 4 layers, 2.4M parameters) pretrained "
        f"{a.pretrain_steps} steps ({t_pre:.0f} s with data and tokenizer), then SFT {a.sft_steps} steps on the 1,801 built-in arithmetic train "
        f"problems with worked answers ({t_sft:.0f} s).\n"
    )
    if not a.skip_grpo:
        t = lmforge(grpo_args, log)
        figures["grpo"] = {"seconds": t, **manifest(run, "rl")["metrics"]}
        grpo_section(a, t, grpo_args, figures["grpo"], say)
    if not a.skip_ppo:
        figures["ppo"] = ppo_section(a, root, run, common, log, say)
    print("\n".join(out))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(figures, indent=1, default=str))


def grpo_section(a, t_grpo: float, grpo_args: list[str], g: dict, say) -> None:
    say("### GRPO on built-in arithmetic (exact-match reward)\n")
    say(
        "```\npython benchmarks/align_rl.py "
        + " ".join(sys.argv[1:])
        + "\nlmforge "
        + " ".join(grpo_args)
        + "\n```\n"
    )
    say(
        f"Held-out exact-match accuracy (greedy, {g['val_prompts']} held-out problems), every 10 steps "
        f"(rollout: 4 prompts x 8 samples per step, {a.grpo_steps} steps, {t_grpo:.0f} s):\n"
    )
    say("| step | " + " | ".join(str(c["step"]) for c in [{"step": 0}] + g.get("eval_curve", [])) + " |")
    say("|---|" + "---:|" * (1 + len(g.get("eval_curve", []))))
    say(
        "| accuracy (greedy) | "
        + " | ".join(
            f"{x:.3f}"
            for x in [g["accuracy_before"]]
            + [c.get("accuracy", float("nan")) for c in g.get("eval_curve", [])]
        )
        + " |"
    )
    say(
        "| accuracy (1 sample, T=1) | "
        + " | ".join(
            f"{x:.3f}"
            for x in [g["sampled_accuracy_before"]]
            + [c.get("sampled_accuracy", float("nan")) for c in g.get("eval_curve", [])]
        )
        + " |\n"
    )
    say(
        f"Accuracy {g['accuracy_before']:.3f} -> {g['accuracy_after']:.3f}; share of zero-variance groups over the "
        f"run {g.get('zero_std_group_frac', 0):.2f}; {g['failed_reward_samples']} failed reward samples.\n"
    )


def ppo_section(a, root: Path, run: Path, common: list[str], log: Path, say) -> dict:
    from lmforge.align.preference import builtin_preferences

    # 4. reward model + PPO on its prompts
    prompts = root / "rm_prompts.jsonl"
    prefs = builtin_preferences()
    prompts.write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in prefs))
    rm_args = [
        "reward",
        *common,
        f"reward.model={run / 'sft' / 'model'}",
        f"reward.max_steps={a.reward_steps}",
    ]
    t_rm = lmforge(rm_args, log)
    rm = manifest(run, "reward")["metrics"]
    # PPO through the align stage (align.method=ppo hands over to the same RL code), so the
    # GRPO result in rl/ stays; both start from sft/model
    ppo_args = [
        "align",
        *common,
        f"align.model={run / 'sft' / 'model'}",
        "align.method=ppo",
        f"align.data=[{prompts}]",
        "align.max_val_examples=64",
        f"align.max_steps={a.ppo_steps}",
        "align.batch_size=16",
        "align.lr=2e-5",
        "align.warmup_steps=0",
        "align.ppo.epochs=2",
        "align.ppo.max_new_tokens=24",
        "align.ppo.adaptive_kl=true",
        "align.ppo.kl_coef=0.1",
        "align.ppo.target_kl=2.0",
        "align.eval_every=6",
        "align.log_every=6",
    ]
    t_ppo = lmforge(ppo_args, log)
    p = manifest(run, "align")["metrics"]
    say("### PPO against the reward model\n")
    say("```\nlmforge " + " ".join(rm_args) + "\nlmforge " + " ".join(ppo_args) + "\n```\n")
    say(
        f"Reward model: `lmforge reward` on the built-in preference pairs ({a.reward_steps} steps, {t_rm:.0f} s), "
        f"held-out pair accuracy {rm.get('val_accuracy_before', float('nan')):.3f} -> {rm.get('val_accuracy_after', float('nan')):.3f} ({rm.get('val_pairs')} pairs).\n"
    )
    curve = p.get("eval_curve", [])
    say(
        f"PPO: {a.ppo_steps} steps (16 prompts per rollout, 2 epochs), adaptive KL towards target_kl = "
        f"{p['kl_target']} nats, {t_ppo:.0f} s. Held-out ({p['val_prompts']} prompts): mean reward-model score "
        f"of greedy answers, and KL(policy || reference) of sampled answers (nats per answer):\n"
    )
    say("| step | " + " | ".join(str(c["step"]) for c in [{"step": 0}] + curve) + " |")
    say("|---|" + "---:|" * (1 + len(curve)))
    say(
        "| mean RM score | "
        + " | ".join(f"{x:.3f}" for x in [p["reward_before"]] + [c["reward"] for c in curve])
        + " |"
    )
    say("| KL | " + " | ".join(f"{x:.3f}" for x in [p["kl_before"]] + [c["kl"] for c in curve]) + " |\n")
    say(
        f"Score {p['reward_before']:.3f} -> {p['reward_after']:.3f}; KL {p['kl_after']:.3f} vs bound "
        f"{p['kl_target']} ({'under' if p['kl_after'] <= p['kl_target'] else 'OVER'}); final kl_coef "
        f"{p['kl_coef_final']:.4f}; KL / target {p.get('kl_to_target')}; guard trips "
        f"{p.get('kl_guard_trips')}; hacking warning: {p.get('hacking_warning')}.\n"
    )
    rolls = [json.loads(x) for x in (run / "align" / "metrics.jsonl").read_text().splitlines()]
    rolls = [r for r in rolls if "rollout" in r]
    say("| rollout | " + " | ".join(str(r["rollout"]) for r in rolls) + " |")
    say("|---|" + "---:|" * len(rolls))
    for k, name in (
        ("objective/kl_k3", "KL (k3, nats/seq)"),
        ("objective/kl_coef", "kl_coef"),
        ("reward", "RM score"),
        ("truncated_frac", "truncated"),
        ("distinct_2", "distinct-2"),
    ):
        say(f"| {name} | " + " | ".join(f"{r.get(k, float('nan')):.3f}" for r in rolls) + " |")
    say("")
    keys = (
        "objective/kl_k3",
        "objective/kl_coef",
        "reward",
        "truncated_frac",
        "distinct_2",
        "kl_guard_tripped",
    )
    return {
        "seconds": t_ppo,
        "reward_model": rm,
        "metrics": p,
        "rollouts": [{"rollout": r["rollout"], **{k: r.get(k) for k in keys}} for r in rolls],
    }


if __name__ == "__main__":
    main()
