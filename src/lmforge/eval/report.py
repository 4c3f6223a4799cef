"""The report card of a run: `report.md` and a self-contained `report.html` from the run directory.

Everything comes from what the stages left on disk, so any stage -- including ones this module
has never heard of -- shows up: every `<stage>/manifest.json` (status, time, metrics, config),
every `<stage>/metrics.jsonl` (curves), `data/funnel.json` (the data funnel) when the data stage
wrote one, `eval/results.json` (perplexity and task tables), `*/samples.jsonl`, and the final
model's `config.json` (the model card).

The report is built once as a list of blocks (paragraph, table, image, preformatted text) and
rendered twice: Markdown (images as PNG files under `plots/`) and HTML (the same PNGs inlined as
data URIs, inline CSS, no scripts, no network) -- one content, two views that cannot disagree.
The blocks and both renderers live in `render`, the figures in `plots`; this module reads the run
and decides what goes in.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from ..runs import read_jsonl, read_manifest, run_relative
from .chain import chain_answers, chain_table
from .plots import plot_curves, plot_funnel, plot_tasks
from .render import Section, _cell, _count, _num


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
    model = Path(info["run_dir"]) / ev["model"] if ev.get("model") else None  # relative to the run
    if model is not None and (model / "config.json").exists():
        return model
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
        f"Run directory `{run_dir.name}`; {len(stages)} stage(s), {total:,.0f} s of stage time in all. "
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
        rows.append(["model folder", run_relative(mdir, info["run_dir"])])
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
            "rise is forgetting, or reward hacking for align/rl)."
            + (
                " The reward-model score is the run's reward model's mean score of each model's greedy "
                "answers to the same held-out chat prompts (a rise that comes with much longer answers "
                "is worth a look at the answers below):"
                if any(r.get("rm_score") is not None for r in chain)
                else ""
            )
        )
        s.table(*chain_table(chain))
        prompts = ev.get("chain_prompts") or []
        if prompts and any(r.get("answers") for r in chain):
            s.p("Greedy answers of every model to the first held-out chat prompts of the chain:")
            header, rows = chain_answers(chain, prompts)
            s.table(header, [[_short(c, 160) if c is not None else None for c in r] for r in rows])
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
