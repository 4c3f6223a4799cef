"""The report's figures: training curves, task scores with their intervals, the data funnel.

matplotlib is imported lazily (Agg backend) and every figure comes back as PNG bytes, so the
report renders the same image into Markdown (a file) and HTML (a data URI).
"""

from __future__ import annotations

import io

from .render import _num


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return buf.getvalue()


def plot_curves(records: list[dict], title: str) -> bytes | None:
    """Train loss (and eval loss) against step; learning rate on a second panel when logged."""
    train = [(r["step"], r["loss"]) for r in records if "step" in r and _num(r.get("loss"))]
    evals = [(r["step"], r["eval/loss"]) for r in records if "step" in r and _num(r.get("eval/loss"))]
    lr = [(r["step"], r["lr"]) for r in records if "step" in r and _num(r.get("lr"))]
    if not train and not evals:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2 if lr else 1, figsize=(9 if lr else 5.5, 3.2))
    ax = axes[0] if lr else axes
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.5)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.5, ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if lr:
        axes[1].plot(*zip(*lr), color="tab:green", lw=1.5)
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("learning rate")
        axes[1].set_title("schedule")
        axes[1].grid(alpha=0.3)
    return _png(fig)


def plot_tasks(tasks: dict) -> bytes | None:
    """Headline accuracy per task with its 95% interval and the chance level."""
    rows = []
    for name, r in tasks.items():
        key = next((k for k in ("acc_norm", "acc", "exact_match", "pass@1") if k in r), None)
        if key:
            rows.append((f"{name}\n{key}", r[key]["value"], r[key]["ci95"], r.get("chance")))
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(rows) + 1.5), 3.2))
    xs = range(len(rows))
    vals = [r[1] for r in rows]
    err = [[v - r[2][0] for v, r in zip(vals, rows)], [r[2][1] - v for v, r in zip(vals, rows)]]
    ax.bar(xs, vals, yerr=err, capsize=4, color="tab:blue", alpha=0.8)
    for x, r in zip(xs, rows):
        if r[3] is not None and _num(r[3]):
            ax.hlines(
                r[3], x - 0.4, x + 0.4, colors="tab:red", linestyles="--", label="chance" if x == 0 else None
            )
    ax.set_xticks(list(xs), [r[0] for r in rows], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title("tasks (95% interval)")
    ax.grid(axis="y", alpha=0.3)
    if any(r[3] is not None for r in rows):
        ax.legend()
    return _png(fig)


def plot_funnel(steps: list[dict]) -> bytes | None:
    pts = [
        (s.get("name", "?"), s.get("docs_in"), s.get("docs_out"))
        for s in steps
        if isinstance(s, dict) and s.get("docs_out") is not None
    ]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(pts) + 1.2))
    names = [p[0] for p in pts][::-1]
    ax.barh(names, [p[2] for p in pts][::-1], color="tab:blue", alpha=0.85, label="docs out")
    ax.set_xlabel("documents")
    ax.set_title("data funnel")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)
