"""The `lmforge` command line: one subcommand per pipeline stage, plus `run` to chain them.

    lmforge run [CONFIG] [KEY=VALUE ...]         run the pipeline (default CONFIG: tiny)
    lmforge <stage> [CONFIG] [KEY=VALUE ...]     run one stage into the same run directory
    lmforge config [CONFIG] [KEY=VALUE ...]      validate and print the resolved config
    lmforge status [CONFIG]                      what the run directory holds
    lmforge compare RUN [RUN ...]                config differences, metrics and curves of runs

CONFIG is a YAML file or the name of a pipeline shipped with lmforge (`tiny`). Overrides are
dotted keys with YAML values: `pretrain.max_steps=200 run.name=exp2`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from . import __version__
from .config import split_config_args as _split_args
from .errors import LMForgeError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "args",
        nargs="*",
        metavar="CONFIG|KEY=VALUE",
        help="pipeline YAML (or shipped name, default 'tiny') and dotted overrides, "
        "e.g. pretrain.max_steps=200",
    )


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


SPEED_KEYS = ["tokens_per_s", "peak_memory_gib"]  # every training stage (Trainer.speed_metrics)
SUMMARY_KEYS = {
    "data": ["docs", "bytes", "train_docs", "val_docs"],
    "tokenizer": ["vocab_size", "train_tokens", "val_tokens", "val_bytes_per_token"],
    "pretrain": ["params", "steps", "tokens", "train_loss", "val_loss", "val_bpb", *SPEED_KEYS],
    "sft": ["method", "train_examples", "val_loss_before", "val_loss_after", "trainable_params", *SPEED_KEYS],
    "reward": [
        "val_accuracy_before",
        "val_accuracy_after",
        "val_length_baseline",
        "train_pairs",
        "val_pairs",
        *SPEED_KEYS,
    ],
    "align": [
        "method",
        "val_accuracy_before",
        "val_accuracy_after",
        "val_reward_accuracy_after",
        "val_log_ratio_chosen_after",
        *SPEED_KEYS,
    ],
    "rl": [
        "method",
        "accuracy_before",
        "accuracy_after",
        "reward_before",
        "reward_after",
        "kl_after",
        "kl_target",
    ],
    "cpt": ["domain_loss_before", "domain_loss_after", "orig_loss_before", "orig_loss_after"],
    "eval": ["loss", "ppl", "bpb", "unigram_bpb", "word_ppl", "builtin_cloze/acc_norm"],
    "report": ["plots", "report"],
    "sample": ["samples"],
}


def print_summary(cfg, outcomes, wall: float) -> None:
    from rich.table import Table

    from .pipeline import console

    table = Table(title=f"lmforge run '{cfg.run.name}'  ({wall:.0f} s)", title_justify="left")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("time", justify="right")
    table.add_column("results")
    for o in outcomes:
        keys = (
            SUMMARY_KEYS.get(o.name) or [k for k, v in o.metrics.items() if isinstance(v, (int, float))][:5]
        )
        res = "  ".join(f"{k}={_fmt(o.metrics[k])}" for k in keys if o.metrics.get(k) is not None)
        table.add_row(o.name, o.status, f"{o.seconds:.1f}s", res)
    console.print(table)
    console.print(f"artifacts: {cfg.run.dir.resolve()}")
    ev = next((o.metrics for o in outcomes if o.name == "eval"), None)
    if ev and "bpb" in ev and "unigram_bpb" in ev:
        console.print(f"val bits-per-byte {ev['bpb']:.3f} vs unigram baseline {ev['unigram_bpb']:.3f}")
    from .serve.loading import model_stages

    model = next(
        (cfg.run.dir / n / "model" for n in model_stages() if (cfg.run.dir / n / "model").exists()), None
    )
    if model is not None:
        console.print(f"try: lmforge sample --model {model} --prompt 'Your prompt'")
        if model.parent.name != "pretrain":
            console.print(f"     lmforge chat {model}")


def cmd_run(a) -> int:
    import time

    from .pipeline import load_config, run_pipeline

    config, overrides = _split_args(a.args)
    cfg = load_config(config, overrides)
    only = [s.strip() for s in a.only.split(",")] if a.only else None
    t0 = time.time()
    outcomes = run_pipeline(cfg, only=only, force=a.force)
    print_summary(cfg, outcomes, time.time() - t0)
    return 0


def cmd_stage(a) -> int:
    import yaml

    from .pipeline import REGISTRY, load_config, run_stage

    config, overrides = _split_args(a.args)
    stage = REGISTRY[a.command]
    for flag, key, _ in stage.flags:
        val = getattr(a, _dest(flag))
        if val is not None:
            overrides.append(
                f"{a.command}.{key}={yaml.safe_dump(val, default_flow_style=True).strip()}"
                if isinstance(val, list)
                else f"{a.command}.{key}={_quote(val)}"
            )
    cfg = load_config(config, overrides)
    o = run_stage(cfg, a.command, force=a.force)
    print_summary(cfg, [o], o.seconds)
    return 0


def _quote(v: str) -> str:
    import json

    return json.dumps(v)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def cmd_config(a) -> int:
    import yaml

    from .pipeline import load_config

    config, overrides = _split_args(a.args)
    cfg = load_config(config, overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def cmd_status(a) -> int:
    from rich.markup import escape

    from .pipeline import ORDER, console, load_config, stage_status, stale_reason

    config, overrides = _split_args(a.args)
    cfg = load_config(config, overrides)
    st = stage_status(cfg.run.dir)
    if not st:
        console.print(f"{cfg.run.dir}: nothing run yet")
        return 0
    stale: list[str] = []
    rank = {n: i for i, n in enumerate(ORDER)}
    for name, m in sorted(st.items(), key=lambda kv: rank.get(kv[0], len(rank))):
        why = stale_reason(cfg, name, m, stale) if m.get("status") == "complete" else None
        if why or m.get("status") != "complete":
            stale.append(name)
        console.print(
            f"{name:<10} {m.get('status', '?'):<9} {m.get('seconds', 0):8.1f}s  {m.get('fingerprint', '')}"
            + (f"  [yellow]stale: {escape(why)}; `lmforge run` re-runs it[/yellow]" if why else ""),
            highlight=False,
        )
    return 0


class _Parser(argparse.ArgumentParser):
    commands: set[str] = set()  # the subcommands this parser knows


def build_parser(stages: bool = True) -> _Parser:
    """The whole command line; with `stages=False` only the tool commands (scaling, eval, serve,
    hf, synth), whose modules do not import torch: `lmforge scaling cost ...` then parses in a
    fraction of a second instead of paying torch's ~2 s import through the stage registry."""
    p = _Parser(
        prog="lmforge",
        description="The LLM training pipeline, from raw text to an "
        "evaluated model. Every stage is a subcommand and a step of `lmforge run`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lmforge run                       # tiny pipeline on the built-in corpus\n"
        "  lmforge run tiny pretrain.max_steps=200 run.name=longer\n"
        "  lmforge sample --prompt 'The function'\n"
        "  lmforge <command> --help\n",
    )
    p.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    if stages:
        _add_stage_commands(sub)

    from . import hf_cli
    from .data import synth_cli
    from .eval import cli as eval_cli
    from .eval import compare
    from .scaling import cli as scaling_cli
    from .serve import cli as serve_cli

    for module in (hf_cli, synth_cli, eval_cli, serve_cli, scaling_cli, compare):
        module.add_parser(sub)
    p.commands = set(sub.choices)
    return p


def _add_stage_commands(sub) -> None:
    from .pipeline import ORDER
    from .pipeline import REGISTRY as stages

    r = sub.add_parser(
        "run",
        help="run the pipeline's stages in order, skipping completed ones",
        description="Run every stage of the pipeline in order. Stages whose manifest matches "
        "their config and inputs are skipped; an interrupted stage resumes.",
    )
    _add_common(r)
    r.add_argument("--only", help="comma-separated stages to run (their inputs must exist)")
    r.add_argument("--force", action="store_true", help="re-run stages even if complete")
    r.set_defaults(func=cmd_run)

    for name in ORDER:
        st = stages[name]
        sp = sub.add_parser(
            name,
            help=st.help,
            description=f"{st.help}. Runs the '{name}' stage of the pipeline "
            f"config into its run directory" + (f"; needs: {', '.join(st.needs)}" if st.needs else "") + ".",
        )
        _add_common(sp)
        sp.add_argument("--force", action="store_true", help="re-run even if complete")
        for flag, key, hlp in st.flags:
            is_list = key.endswith("s") and key != "model"
            sp.add_argument(
                flag,
                dest=_dest(flag),
                action="append" if is_list else "store",
                help=f"{hlp} (sets {name}.{key})",
            )
        sp.set_defaults(func=cmd_stage)

    c = sub.add_parser("config", help="validate a pipeline config and print it resolved")
    _add_common(c)
    c.set_defaults(func=cmd_config)
    s = sub.add_parser("status", help="list the stages in a run directory and their state")
    _add_common(s)
    s.set_defaults(func=cmd_status)


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    command = next((x for x in args if not x.startswith("-")), None)
    parser = build_parser(stages=False)
    if command not in parser.commands:  # a stage, run/config/status, a typo, or top-level help
        parser = build_parser()
    # KEY=VALUE overrides may also follow the flags (`lmforge sft --model M sft.lr=1e-4`), which
    # argparse alone refuses once a positional list has been closed by an option
    a, extra = parser.parse_known_args(args)
    late = [x for x in extra if "=" in x and not x.startswith("-")]
    if extra and (len(late) < len(extra) or not hasattr(a, "args")):
        parser.error(
            "unrecognized arguments: " + " ".join(x for x in extra if x not in late or not hasattr(a, "args"))
        )
    if late:
        a.args = list(a.args or []) + late
    if not getattr(a, "func", None):
        parser.print_help()
        return 0
    # SIGTERM (schedulers, `kill`) stops like Ctrl-C for the whole command, also between
    # stages and while the summary prints: exit 130, never a hard kill mid-write
    old = (
        signal.signal(signal.SIGTERM, _sigterm)
        if threading.current_thread() is threading.main_thread()
        else None
    )
    try:
        return int(a.func(a) or 0)
    except LMForgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
