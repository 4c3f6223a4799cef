"""Tables `scaling sweep` prints: the plan before training, the results after."""

from __future__ import annotations

from collections.abc import Sequence

from lmforge.scaling.fmt import fmt_count, fmt_sci, print_notes
from lmforge.scaling.sweep_plan import SweepPoint, SweepSpec


def print_table(title: str, rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    """Like `scaling fit`'s tables, but at least 132 columns wide when writing to a log file,
    so that a 10-column plan does not wrap into an unreadable strip."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        t.add_row(*r)
    c = Console(highlight=False)
    if not c.is_terminal:
        c = Console(highlight=False, width=max(c.width, 132))
    c.print(t)


def print_plan(points: list[SweepPoint], spec: SweepSpec, batch_tokens: int, cfg) -> None:
    total = sum(p.flops_6nd for p in points)
    rows = [
        (
            p.name,
            fmt_count(p.params),
            fmt_count(p.non_embedding_params),
            fmt_count(p.tokens),
            f"{p.tokens / p.params:.2g}",
            str(p.steps),
            "-" if p.epochs is None else f"{p.epochs:.2f}",
            f"{p.lr:.3g}",
            str(p.warmup_steps),
            fmt_sci(p.flops_6nd),
        )
        for p in points
    ]
    print_table(
        f"Sweep plan: {len(points)} runs ({spec.mode}), {batch_tokens:,} tokens/step, "
        f"{fmt_sci(total)} FLOPs (6ND) in all",
        rows,
        ("point", "N", "N non-emb", "D", "D/N", "steps", "epochs", "peak LR", "warmup", "C=6ND"),
    )


def print_results(points: list[SweepPoint]) -> None:
    rows = [
        (
            p.name,
            fmt_count(p.params),
            fmt_count(p.tokens),
            fmt_sci(p.flops_6nd),
            "-" if p.val_loss is None else f"{p.val_loss:.4f}",
            "-" if p.seconds is None else f"{p.seconds:.0f}",
            p.status,
        )
        for p in points
    ]
    print_table(
        "Sweep results (final val loss, nats/token)",
        rows,
        ("point", "N", "D", "C=6ND", "val loss", "train s", "status"),
    )


def print_sweep_notes(notes: list[str]) -> None:
    print_notes("notes", notes)
