"""The data stage's record of itself: funnel.json, the flat metrics, and the side files
(dedup_clusters.jsonl, dropped_examples.jsonl) that show what each step did, with examples."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.data import report
from lmforge.data.steps import StepStats
from lmforge.runs import atomic_path


def histograms(steps: list[StepStats]) -> dict[str, list[int]]:
    hist: dict[str, list[int]] = {}
    for st in steps:
        for name, h in st.hist.items():
            hist[name] = [a + b for a, b in zip(hist.get(name, [0] * len(h)), h)]
    return hist


def funnel_dict(cfg, steps, writers, shard_names, dec, clf_info, domain_mix, skipped, tasks, seconds) -> dict:
    dd = cfg.dedup
    return {
        "steps": [st.to_dict() for st in steps],
        "train": {
            "docs": writers["train"].docs,
            "bytes": writers["train"].bytes,
            "shards": shard_names["train"],
        },
        "val": {"docs": writers["val"].docs, "bytes": writers["val"].bytes, "shards": shard_names["val"]},
        "dedup": {
            "exact_clusters": sum(1 for c in dec.clusters if c[0] == "exact"),
            "near_clusters": sum(1 for c in dec.clusters if c[0] == "near"),
            "ngram": dd.ngram,
            "bands": dd.bands,
            "rows": dd.rows,
        },
        "classifier": clf_info,
        "domain_mix": domain_mix,
        "histograms": {},
        "skipped_files": skipped[:100],
        "skipped_files_count": len(skipped),
        "tasks": len(tasks),
        "range_tasks": sum(t.kind == "range" for t in tasks),
        "seconds": round(seconds, 3),
        "input_mb_per_s": round(steps[0].bytes_in / 1e6 / max(seconds, 1e-9), 3),
        "token_estimate": "UTF-8 bytes / 4",
    }


def write_clusters(path: Path, clusters, texts: dict, sig_of, n_full: int) -> None:
    from lmforge.data.steps.dedup import jaccard_estimate

    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for c, (kind, members) in enumerate(clusters):
                rec: dict = {"cluster": c, "kind": kind, "size": int(len(members))}
                if c < n_full:
                    kept_sig = sig_of(int(members[0])) if kind == "near" else None
                    rows = []
                    for j, m in enumerate(members):
                        row = dict(texts.get(int(m), {"id": None}))
                        row["kept"] = j == 0
                        if kept_sig is not None and j:
                            row["jaccard_estimate"] = round(jaccard_estimate(kept_sig, sig_of(int(m))), 3)
                        rows.append(row)
                    rec["members"] = rows
                else:
                    rec["member_index"] = [int(m) for m in members]
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def write_dropped(path: Path, steps: list[StepStats]) -> None:
    """Example snippets: {step, kind (dropped/flagged/modified), reason, id, source, url, text}."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for st in steps:
                for reason, exs in st.examples.items():
                    kind = report.example_kind(reason)
                    for ex in exs:
                        rec = {
                            "step": st.name,
                            "kind": kind,
                            "reason": reason.split(":", 1)[-1] if kind != "dropped" else reason,
                            **ex,
                        }
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def flat_metrics(funnel: dict, steps: list[StepStats], read: StepStats, docs_out: int) -> dict:
    m: dict = {
        "docs_in": read.docs_in,
        "docs_out": docs_out,
        "docs": docs_out,
        "bytes": funnel["train"]["bytes"] + funnel["val"]["bytes"],  # short names
        "replaced_bytes": read.counters.get("replaced_bytes", 0),
        "bytes_in": read.bytes_in,
        "bytes_out": funnel["train"]["bytes"] + funnel["val"]["bytes"],
        "tokens_in_est": next((st.tokens_out for st in steps if st.name == "extract"), read.tokens_out),
        "tokens_out_est": (funnel["train"]["bytes"] + funnel["val"]["bytes"] + 3) // 4,
        "train_docs": funnel["train"]["docs"],
        "val_docs": funnel["val"]["docs"],
        "train_bytes": funnel["train"]["bytes"],
        "val_bytes": funnel["val"]["bytes"],
        "train_shards": len(funnel["train"]["shards"]),
        "val_shards": len(funnel["val"]["shards"]),
        "tasks": funnel["tasks"],
        "seconds": funnel["seconds"],
        "input_mb_per_s": funnel["input_mb_per_s"],
        "dedup_exact_clusters": funnel["dedup"]["exact_clusters"],
        "dedup_near_clusters": funnel["dedup"]["near_clusters"],
        "quality_classifier_trained": bool(funnel["classifier"].get("trained", False)),
    }
    for st in steps:
        m[f"dropped_{st.name}"] = st.docs_dropped
        flagged = sum(v["docs"] for v in st.flagged.values())
        if flagged:
            m[f"flagged_{st.name}"] = flagged
    if "heldout_accuracy" in funnel["classifier"]:
        m["quality_classifier_heldout_accuracy"] = funnel["classifier"]["heldout_accuracy"]
    return m
