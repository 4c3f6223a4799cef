"""The report card of a run: `report.md` and a self-contained `report.html` from the run directory.

Everything comes from what the stages left on disk, so any stage -- including ones this module
has never heard of -- shows up: every `<stage>/manifest.json` (status, time, metrics, config),
every `<stage>/metrics.jsonl` (curves), `data/funnel.json` (the data funnel) when the data stage
wrote one, `eval/results.json` (perplexity and task tables), `*/samples.jsonl`, and the final
model's `config.json` (the model card).

The report is built once as a list of blocks (paragraph, table, image, preformatted text) and
rendered twice: Markdown (images as PNG files under `plots/`) and HTML (the same PNGs inlined as
data URIs, inline CSS, no scripts, no network) -- one content, two views that cannot disagree.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runs import read_jsonl, read_manifest
from .chain import chain_table

# ----------------------------------------------------------------------------- blocks


@dataclass
class Section:
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def p(self, text: str) -> Section:
        self.blocks.append(("p", text))
        return self

    def table(self, header: list[str], rows: list[list[Any]]) -> Section:
        if rows:
            self.blocks.append(("table", header, [[_cell(c) for c in r] for r in rows]))
        return self

    def image(self, name: str, png: bytes | None, alt: str) -> Section:
        if png:
            self.blocks.append(("img", name, png, alt))
        return self

    def pre(self, text: str) -> Section:
        self.blocks.append(("pre", text))
        return self


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, (dict, list)):
        s = json.dumps(v, default=str)
        return s if len(s) <= 80 else s[:77] + "..."
    return str(v)


def _count(x: float | None) -> str:
    if x is None:
        return "-"
    for div, suf in ((1e15, "P"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suf}"
    return f"{x:.3g}"


# ----------------------------------------------------------------------------- plots
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


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ----------------------------------------------------------------------------- collecting
def hardware() -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def collect(run_dir: Path, order: list[str], skip: tuple[str, ...] = ("report",)) -> dict:
    """Everything the report shows, read from the run directory."""
    run_dir = Path(run_dir)
    found = {}
    for d in sorted(run_dir.iterdir()) if run_dir.is_dir() else []:
        if d.is_dir() and d.name not in skip:
            m = read_manifest(d)
            if m is not None:
                found[d.name] = m
    rank = {n: i for i, n in enumerate(order)}
    names = sorted(found, key=lambda n: (rank.get(n, len(rank)), found[n].get("started_at", ""), n))
    stages = []
    for n in names:
        d = run_dir / n
        stages.append({"name": n, "dir": d, "manifest": found[n], "records": read_jsonl(d / "metrics.jsonl")})
    pipeline = None
    if (run_dir / "pipeline.yaml").exists():
        import yaml

        try:
            pipeline = yaml.safe_load((run_dir / "pipeline.yaml").read_text(encoding="utf-8"))
        except yaml.YAMLError:
            pipeline = None
    return {
        "run_dir": run_dir,
        "stages": stages,
        "pipeline": pipeline,
        "funnel": _read_json(run_dir / "data" / "funnel.json"),
        "eval": _read_json(run_dir / "eval" / "results.json"),
    }


def _model_dir(info: dict) -> Path | None:
    ev = info.get("eval") or {}
    if ev.get("model") and (Path(ev["model"]) / "config.json").exists():
        return Path(ev["model"])
    for st in reversed(info["stages"]):
        d = st["dir"] / "model"
        if st["manifest"].get("status") == "complete" and (d / "config.json").exists():
            return d
    return None


# ----------------------------------------------------------------------------- sections
KEY_METRICS = {
    "data": ["docs", "docs_out", "train_docs", "val_docs", "bytes", "bytes_out"],
    "tokenizer": ["vocab_size", "train_tokens", "val_tokens", "val_bytes_per_token"],
    "pretrain": ["params", "steps", "tokens", "train_loss", "val_loss", "val_bpb", "flops"],
    "eval": ["loss", "ppl", "bpb", "unigram_bpb", "word_ppl"],
}


def _headline(name: str, metrics: dict) -> str:
    keys = KEY_METRICS.get(name) or [k for k, v in metrics.items() if _num(v)][:5]
    return ", ".join(f"{k}={_cell(metrics[k])}" for k in keys if k in metrics and metrics[k] is not None)


def build_sections(
    info: dict, *, title: str | None = None, max_samples: int = 6, plots: bool = True
) -> list[Section]:
    run_dir: Path = info["run_dir"]
    stages = info["stages"]
    secs: list[Section] = []

    s = Section(title or f"Report card: run '{run_dir.name}'")
    total = sum(st["manifest"].get("seconds", 0) or 0 for st in stages)
    s.p(
        f"Run directory `{run_dir}`; {len(stages)} stage(s), {total:,.0f} s of stage time in all. "
        f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}."
    )
    s.table(
        ["stage", "status", "seconds", "key results"],
        [
            [
                st["name"],
                st["manifest"].get("status", "?"),
                st["manifest"].get("seconds"),
                _headline(st["name"], st["manifest"].get("metrics", {})),
            ]
            for st in stages
        ],
    )
    failed = [st for st in stages if st["manifest"].get("status") == "failed"]
    for st in failed:
        s.p(f"**{st['name']} failed**: {st['manifest'].get('error', '')}")
    secs.append(s)

    secs.append(_model_card(info))
    f = _funnel_section(info, plots)
    if f:
        secs.append(f)
    for st in stages:
        if st["records"]:
            t = Section(f"Training: {st['name']}")
            if plots:
                t.image(
                    f"{st['name']}_curves.png",
                    plot_curves(st["records"], st["name"]),
                    f"{st['name']} loss curve",
                )
            last = {k: v for r in st["records"] for k, v in r.items() if _num(v)}
            t.table(["metric", "last value"], [[k, v] for k, v in last.items() if k != "step"][:16])
            secs.append(t)
    e = _eval_section(info, plots)
    if e:
        secs.append(e)
    sm = _samples_section(stages, max_samples)
    if sm:
        secs.append(sm)
    o = Section("All stage metrics")
    for st in stages:
        m = {k: v for k, v in (st["manifest"].get("metrics") or {}).items()}
        if m:
            o.p(f"**{st['name']}**")
            o.table(["metric", "value"], [[k, v] for k, v in m.items()])
    secs.append(o)
    return secs


def _model_card(info: dict) -> Section:
    from ..errors import CheckpointError
    from ..model.hf import from_hf_config

    s = Section("Model card")
    mdir = _model_dir(info)
    rows: list[list[Any]] = []
    mcfg = None
    if mdir is not None:
        try:
            mcfg = from_hf_config(json.loads((mdir / "config.json").read_text()), str(mdir / "config.json"))
        except (CheckpointError, json.JSONDecodeError, KeyError):
            mcfg = None
        rows.append(["model folder", str(mdir)])
    if mcfg is not None:
        rows += [
            [
                "architecture",
                f"Llama-style decoder: {mcfg.n_layers} layers, d_model {mcfg.d_model}, "
                f"{mcfg.n_heads} heads ({mcfg.kv_heads} KV), SwiGLU {mcfg.ff_dim}, RoPE, RMSNorm",
            ],
            [
                "parameters",
                f"{_count(mcfg.param_count())} ({mcfg.param_count():,}; "
                f"{_count(mcfg.non_embedding_params())} non-embedding)",
            ],
            ["context length", mcfg.max_seq_len],
            ["vocabulary", mcfg.vocab_size],
            ["tied embeddings", mcfg.tie_embeddings],
        ]
    tokens, flops, train_s = 0, 0.0, 0.0
    for st in info["stages"]:
        m = st["manifest"].get("metrics") or {}
        if _num(m.get("tokens")) and st["name"] not in ("tokenizer", "eval"):
            tokens += int(m["tokens"])
            if _num(m.get("flops")):
                flops += float(m["flops"])
            elif mcfg is not None:
                flops += mcfg.flops_per_token() * m["tokens"]
            train_s += float(m.get("train_seconds") or st["manifest"].get("seconds") or 0)
    if tokens:
        rows += [
            ["training tokens", f"{_count(tokens)} ({tokens:,})"],
            ["training FLOPs", f"{flops:.3g}"],
            ["training time", f"{train_s:,.1f} s"],
        ]
    pipe = info.get("pipeline") or {}
    data_stage = next((st for st in info["stages"] if st["name"] == "data"), None)
    if pipe.get("data", {}).get("inputs"):
        rows.append(["training data", ", ".join(map(str, pipe["data"]["inputs"]))])
    if data_stage:
        m = data_stage["manifest"].get("metrics") or {}
        docs = m.get("docs", m.get("docs_out"))
        if docs is not None:
            rows.append(["documents", docs])
    ev = info.get("eval") or {}
    if _num(ev.get("bpb")):
        rows.append(
            [
                "val bits-per-byte",
                f"{ev['bpb']:.4f} (unigram baseline {ev.get('unigram_bpb', float('nan')):.4f})",
            ]
        )
    hw = ev.get("hardware") or hardware()
    rows.append(["hardware", ", ".join(f"{k} {v}" for k, v in hw.items())])
    if pipe.get("run"):
        rows.append(
            [
                "device / dtype / seed",
                f"{pipe['run'].get('device')} / {pipe['run'].get('dtype')} / {pipe['run'].get('seed')}",
            ]
        )
    s.table(["field", "value"], rows)
    s.p(
        "Intended use: research and teaching; a small model trained on the data above. It has not been "
        "evaluated for safety or factual accuracy and should not be deployed to answer people."
    )
    return s


def _funnel_section(info: dict, plots: bool) -> Section | None:
    funnel = info.get("funnel")
    data_stage = next((st for st in info["stages"] if st["name"] == "data"), None)
    s = Section("Data funnel")
    if isinstance(funnel, dict) and isinstance(funnel.get("steps"), list):
        rows = []
        for st in funnel["steps"]:
            if not isinstance(st, dict):
                continue
            dropped = st.get("dropped") or {}
            n_drop = sum(v.get("docs", 0) if isinstance(v, dict) else (v or 0) for v in dropped.values())
            reasons = sorted(
                dropped.items(), key=lambda kv: -(kv[1].get("docs", 0) if isinstance(kv[1], dict) else kv[1])
            )
            rows.append(
                [
                    st.get("name"),
                    st.get("docs_in"),
                    st.get("docs_out"),
                    n_drop,
                    st.get("tokens_out"),
                    ", ".join(k for k, _ in reasons[:4]) or "-",
                ]
            )
        s.table(["step", "docs in", "docs out", "dropped", "tokens out (est.)", "top drop reasons"], rows)
        if plots:
            s.image("data_funnel.png", plot_funnel(funnel["steps"]), "data funnel")
        if (info["run_dir"] / "data" / "report.html").exists():
            s.p("The data stage's own report: `data/report.html`.")
        return s
    if data_stage:
        m = data_stage["manifest"].get("metrics") or {}
        rows = [[k, v] for k, v in m.items() if not isinstance(v, dict)]
        dropped = m.get("dropped")
        if isinstance(dropped, dict):
            rows += [[f"dropped: {k}", v] for k, v in dropped.items()]
        s.table(["count", "value"], rows)
        return s
    return None


def _eval_section(info: dict, plots: bool) -> Section | None:
    ev = info.get("eval")
    if not isinstance(ev, dict):
        return None
    s = Section("Evaluation")
    ppl = [
        ["token stream", ev.get("tokens"), ev.get("loss"), ev.get("ppl"), None, ev.get("bpb")],
        ["unigram baseline", ev.get("tokens"), None, None, None, ev.get("unigram_bpb")],
    ]
    doc = ev.get("documents")
    if isinstance(doc, dict) and doc:
        ppl.append(
            [
                f"whole documents ({doc.get('docs')})",
                doc.get("tokens"),
                doc.get("loss"),
                doc.get("ppl"),
                doc.get("word_ppl"),
                doc.get("bpb"),
            ]
        )
    s.p("Perplexity on the validation split (bits-per-byte compares across tokenizers):")
    s.table(["scored on", "tokens", "loss", "perplexity", "word perplexity", "bits/byte"], ppl)
    chain = ev.get("chain") or []
    if chain:
        s.p(
            "Model chain: every model of the run on the same validation tokens. The delta is what each "
            "stage did to held-out bits/byte (post-training usually costs a little on raw text; a large "
            "rise is forgetting, or reward hacking for align/rl):"
        )
        s.table(*chain_table(chain))
    tasks = ev.get("tasks") or {}
    if tasks:
        rows = []
        for name, r in tasks.items():
            for k in ("acc", "acc_norm", "acc_bytes", "exact_match", "exact_match_strict") + tuple(
                k for k in r if k.startswith("pass@")
            ):
                if k in r and isinstance(r[k], dict):
                    lo, hi = r[k]["ci95"]
                    rows.append(
                        [
                            name,
                            k,
                            r[k]["value"],
                            f"[{lo:.3f}, {hi:.3f}]",
                            r.get("chance"),
                            r.get("n"),
                            r.get("num_fewshot"),
                            sum((r.get("skipped") or {}).values()),
                            r.get("truncated"),
                        ]
                    )
        s.p("Tasks (95% Wilson intervals; a tiny model near the chance level is expected):")
        s.table(["task", "metric", "value", "95% CI", "chance", "n", "shots", "skipped", "truncated"], rows)
        if plots:
            s.image("eval_tasks.png", plot_tasks(tasks), "task scores")
    return s


def _samples_section(stages: list[dict], k: int) -> Section | None:
    s = Section("Samples")
    any_rows = False
    for st in stages:
        rows = read_jsonl(st["dir"] / "samples.jsonl")[:k]
        if not rows:
            continue
        any_rows = True
        s.p(f"**{st['name']}**")
        keys = [
            c for c in ("prompt", "question", "completion", "reference", "before", "after") if c in rows[0]
        ]
        keys = keys or list(rows[0])[:3]
        s.table(keys, [[_short(r.get(c)) for c in keys] for r in rows])
    return s if any_rows else None


def _short(v: Any, n: int = 300) -> str:
    t = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    t = " ".join(t.split())
    return t if len(t) <= n else t[: n - 3] + "..."


# ----------------------------------------------------------------------------- rendering
def _md_escape(t: str) -> str:
    return t.replace("|", "\\|").replace("\n", " ")


def render_markdown(sections: list[Section], plot_dir: str = "plots") -> str:
    out = []
    for i, sec in enumerate(sections):
        out += [("# " if i == 0 else "## ") + sec.title, ""]
        for b in sec.blocks:
            if b[0] == "p":
                out += [b[1], ""]
            elif b[0] == "table":
                out.append("| " + " | ".join(_md_escape(h) for h in b[1]) + " |")
                out.append("|" + "---|" * len(b[1]))
                out += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in b[2]]
                out.append("")
            elif b[0] == "img":
                out += [f"![{b[3]}]({plot_dir}/{b[1]})", ""]
            elif b[0] == "pre":
                out += ["```", b[1], "```", ""]
    return "\n".join(out)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1050px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.45}h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}table{border-collapse:collapse;margin:.6em 0;font-size:.88em}td,th{border:1px solid #ddd;padding:.25em .55em;
text-align:left;vertical-align:top}th{background:#f4f4f6}tr:nth-child(even) td{background:#fafafa}img{max-width:100%;
margin:.5em 0}code,pre{background:#f4f4f6;padding:.1em .3em;border-radius:3px}nav a{margin-right:1em}"""


def _inline(t: str) -> str:
    """Markdown-ish inline markup of our own paragraphs: **bold** and `code`."""
    import re

    t = html.escape(t)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def render_html(sections: list[Section]) -> str:
    title = sections[0].title if sections else "report"
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body>",
    ]
    out.append(
        "<nav>"
        + "".join(f"<a href='#s{i}'>{html.escape(s.title)}</a>" for i, s in enumerate(sections[1:], 1))
        + "</nav>"
    )
    for i, sec in enumerate(sections):
        tag = "h1" if i == 0 else "h2"
        out.append(f"<{tag} id='s{i}'>{html.escape(sec.title)}</{tag}>")
        for b in sec.blocks:
            if b[0] == "p":
                out.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "table":
                out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in b[1]) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b[2]]
                out.append("</table>")
            elif b[0] == "img":
                data = base64.b64encode(b[2]).decode("ascii")
                out.append(f"<img alt='{html.escape(b[3])}' src='data:image/png;base64,{data}'>")
            elif b[0] == "pre":
                out.append(f"<pre>{html.escape(b[1])}</pre>")
    out.append("</body></html>")
    return "\n".join(out)


def images(sections: list[Section]) -> dict[str, bytes]:
    return {b[1]: b[2] for s in sections for b in s.blocks if b[0] == "img"}
