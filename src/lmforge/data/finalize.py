"""Phase 2 of the data stage: the global steps, the split, the shards and the report.

Input: the finished tasks under ``work/tasks`` (documents, indices, samples, stats). Two passes
over the task documents, in input order: pass A reads the text of documents that survived
dedup (classifier scores, the train/val hash) and of the documents shown in cluster and drop
examples; pass B writes the shards. Decisions in between use only the in-memory index (one
64-bit hash, `bands` band keys, a size and a domain per document: ~150 bytes each).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from lmforge.data.config import DataConfig
from lmforge.data.output import ShardWriter, read_jsonl_zst
from lmforge.data.readers import Document
from lmforge.data.sources import SourceStats, Task
from lmforge.data.steps import DOC_STEP_ORDER, StepStats
from lmforge.data.steps.base import snippet
from lmforge.errors import DataError
from lmforge.runs import atomic_path, atomic_write_json, atomic_write_text

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def finalize(
    cfg: DataConfig,
    out_dir: Path,
    work: Path,
    tasks: list[Task],
    skipped: list[str],
    seed: int,
    log,
    t0: float,
) -> tuple[dict, list[str]]:
    from lmforge.data.stage import unit_hash

    tdir = work / "tasks"
    ex_n = cfg.examples_per_reason
    summaries = [json.loads((tdir / f"{t.name}.stats.json").read_text()) for t in tasks]
    read = StepStats("read", max_examples=ex_n)
    doc_steps: dict[str, StepStats] = {}
    for s in summaries:
        read.merge(StepStats.from_dict(s["read"]))
        for st in s["steps"]:
            doc_steps.setdefault(st["name"], StepStats(st["name"], max_examples=ex_n)).merge(
                StepStats.from_dict(st)
            )

    # ---------------------------------------------------------------- the index of all survivors
    idx = [np.load(tdir / f"{t.name}.index.npz", allow_pickle=False) for t in tasks]
    counts = np.array([len(z["exact"]) for z in idx], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    n = int(offsets[-1])
    exact = np.concatenate([z["exact"] for z in idx]) if n else np.zeros(0, np.uint64)
    bands = np.concatenate([z["bands"] for z in idx]) if n else np.zeros((0, cfg.dedup.bands), np.uint64)
    nbytes = np.concatenate([z["bytes"] for z in idx]) if n else np.zeros(0, np.int64)
    domains = np.concatenate([z["domain"].astype(object) for z in idx]) if n else np.zeros(0, object)
    tokens = (nbytes + 3) // 4
    sigs = [np.load(tdir / f"{t.name}.sig.npy", mmap_mode="r") for t in tasks]

    def sig_of(i: int) -> np.ndarray:
        k = int(np.searchsorted(offsets, i, side="right") - 1)
        return np.asarray(sigs[k][i - offsets[k]])

    alive = np.ones(n, dtype=bool)
    clusters: list[tuple[str, np.ndarray]] = []
    dd = cfg.dedup
    exact_stats, near_stats = (
        StepStats("exact_dedup", max_examples=ex_n),
        StepStats("near_dedup", max_examples=ex_n),
    )
    if dd.enabled and dd.exact:
        before = alive.copy()
        for members in _groups(exact, np.arange(n)):
            alive[members[1:]] = False
            clusters.append(("exact", members))
        _set_counts(exact_stats, before, alive, nbytes, "duplicate")
    if dd.enabled and dd.near:
        from lmforge.data.steps.dedup import lsh_clusters

        before = alive.copy()
        surv = np.flatnonzero(alive)
        sub_sigs = (
            np.stack([sig_of(int(i)) for i in surv])
            if dd.verify_threshold is not None and len(surv)
            else None
        )
        roots = lsh_clusters(bands[surv], sub_sigs, dd.verify_threshold)
        for members in _groups(roots.astype(np.uint64), surv):
            alive[members[1:]] = False
            clusters.append(("near", members))
        _set_counts(near_stats, before, alive, nbytes, "near_duplicate")
    clusters.sort(key=lambda c: (-len(c[1]), int(c[1][0])))
    shown = {int(i) for _, m in clusters[: dd.cluster_examples] for i in m}
    log(
        f"data: dedup over {n:,} docs: {sum(1 for c in clusters if c[0] == 'exact'):,} exact and "
        f"{sum(1 for c in clusters if c[0] == 'near'):,} near-duplicate clusters"
    )

    # ---------------------------------------------------------------- quality classifier: train
    qc = cfg.quality_classifier
    clf_stats = StepStats("quality_classifier", max_examples=ex_n)
    clf_info: dict = {"enabled": qc.enabled, "mode": qc.mode, "threshold": qc.threshold}
    scorer = None
    if qc.enabled:
        scorer = _train_classifier(cfg, tasks, tdir, out_dir, seed, clf_info, log)

    # ---------------------------------------------------------------- pass A: scores, split hash, examples
    u = np.full(n, np.nan)
    scores = np.full(n, np.nan)
    texts: dict[int, dict] = {}
    batch_i: list[int] = []
    batch_t: list[str] = []

    def flush_scores():
        if batch_i:
            scores[np.array(batch_i)] = scorer.score(batch_t)
            batch_i.clear()
            batch_t.clear()

    for i, rec in enumerate(_all_docs(tdir, tasks)):
        if i in shown:
            texts[i] = {
                "id": rec["id"],
                "source": rec["source"],
                "url": rec["meta"].get("url"),
                "text": snippet(rec["text"]),
            }
        if alive[i]:
            u[i] = unit_hash(seed, rec["text"])
            if scorer is not None:
                batch_i.append(i)
                batch_t.append(rec["text"])
                if len(batch_i) >= 512:
                    flush_scores()
    flush_scores()
    for kind, members in clusters:  # dedup drop examples come from the clusters shown
        st = exact_stats if kind == "exact" else near_stats
        for m in members[1:]:
            if int(m) in texts:
                st.example("duplicate" if kind == "exact" else "near_duplicate", _doc(texts[int(m)]))

    if scorer is not None:
        before = alive.copy()
        scored = ~np.isnan(scores)
        for v in scores[scored]:
            clf_stats.observe("quality_score", float(v))
        if qc.mode == "filter":
            alive &= ~(scored & (scores < qc.threshold))
        _set_counts(clf_stats, before, alive, nbytes, "below_threshold")
        clf_info["mean_score"] = round(float(np.nanmean(scores)), 4) if scored.any() else None

    # ---------------------------------------------------------------- mixing
    from lmforge.data.steps.domain import mix_plan

    dm = cfg.domain
    mix_stats = StepStats("mixing", max_examples=ex_n)
    live = np.flatnonzero(alive)
    sizes = tokens[live] if dm.mix_by == "tokens" else np.ones(len(live), dtype=np.int64)
    order_keys = (exact[live] ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF)) * _GOLDEN
    weights = dm.weights if dm.enabled else {}
    copies_live, mix_summary = mix_plan(
        domains[live], sizes.astype(np.float64), order_keys, weights, dm.max_repeat
    )
    copies = np.zeros(n, dtype=np.int64)
    copies[live] = copies_live
    mix_stats.docs_in, mix_stats.bytes_in = len(live), int(nbytes[live].sum())
    mix_stats.tokens_in = int(tokens[live].sum())
    mix_stats.docs_out, mix_stats.bytes_out = int(copies.sum()), int((copies * nbytes).sum())
    mix_stats.tokens_out = int((copies * tokens).sum())
    down = live[copies_live == 0]
    if len(down):
        mix_stats.dropped["downsampled"] = {"docs": int(len(down)), "bytes": int(nbytes[down].sum())}
    if (copies > 1).any():
        mix_stats.counters["extra_copies"] = int((copies[copies > 1] - 1).sum())
    if mix_summary.get("missing"):
        log(f"data: mixing weights name domains with no documents: {mix_summary['missing']}")
    domain_mix = {
        "by": dm.mix_by,
        "weights": dict(weights),
        "missing": mix_summary.get("missing", []),
        "before": _mix_table(domains[live], tokens[live], np.ones(len(live), np.int64)),
        "after": _mix_table(domains, tokens, copies),
    }

    # ---------------------------------------------------------------- max_docs: the first N, in input order
    cap_stats = None
    if cfg.max_docs:
        cap_stats = StepStats("max_docs", max_examples=0)
        before = copies.copy()
        copies[np.cumsum(copies) > cfg.max_docs] = 0
        for attr, arr in (("docs", np.ones(n, np.int64)), ("bytes", nbytes), ("tokens", tokens)):
            setattr(cap_stats, f"{attr}_in", int((before * arr).sum()))
            setattr(cap_stats, f"{attr}_out", int((copies * arr).sum()))
        if cap_stats.docs_out < cap_stats.docs_in:
            cap_stats.dropped["over_max_docs"] = {
                "docs": cap_stats.docs_in - cap_stats.docs_out,
                "bytes": cap_stats.bytes_in - cap_stats.bytes_out,
            }

    # ---------------------------------------------------------------- split + pass B: write shards
    final = np.flatnonzero(copies > 0)
    is_val = np.zeros(n, dtype=bool)
    is_val[final] = u[final] < cfg.val_fraction
    if len(final) >= 2:
        if not is_val[final].any():
            is_val[final[np.argmin(u[final])]] = True
        if is_val[final].all():
            is_val[final[np.argmax(u[final])]] = False
    writers = {s: ShardWriter(out_dir / s, cfg.output_format, cfg.shard_docs) for s in ("train", "val")}
    out_stats = StepStats("output", max_examples=ex_n)
    down_set = set(int(i) for i in down[:ex_n])
    for i, rec in enumerate(_all_docs(tdir, tasks)):
        if i in down_set:
            mix_stats.example("downsampled", _doc(rec))
        c = int(copies[i])
        if not c:
            continue
        if not np.isnan(scores[i]):
            rec["meta"]["quality_score"] = round(float(scores[i]), 4)
            if qc.mode == "weight":
                rec["meta"]["weight"] = round(float(scores[i]), 4)
        out_stats.observe("log10_chars", float(np.log10(max(1, len(rec["text"])))))
        for _ in range(c):
            writers["val" if is_val[i] else "train"].write(rec)
    shard_names = {s: w.close() for s, w in writers.items()}

    # ---------------------------------------------------------------- funnel, reports, side files
    steps = [read] + [doc_steps[name] for name in DOC_STEP_ORDER if name in doc_steps]
    steps += [
        st
        for st, on in (
            (exact_stats, dd.enabled and dd.exact),
            (near_stats, dd.enabled and dd.near),
            (clf_stats, scorer is not None),
            (mix_stats, True),
            (cap_stats, cap_stats),
        )
        if on
    ]
    hist = {}
    for st in steps + [out_stats]:
        for name, h in st.hist.items():
            hist[name] = [a + b for a, b in zip(hist.get(name, [0] * len(h)), h)]
    seconds = time.time() - t0
    bytes_in = read.bytes_in
    funnel = {
        "steps": [st.to_dict() for st in steps],
        "train": {
            "docs": writers["train"].docs,
            "bytes": writers["train"].bytes,
            "shards": shard_names["train"],
        },
        "val": {"docs": writers["val"].docs, "bytes": writers["val"].bytes, "shards": shard_names["val"]},
        "dedup": {
            "exact_clusters": sum(1 for c in clusters if c[0] == "exact"),
            "near_clusters": sum(1 for c in clusters if c[0] == "near"),
            "ngram": dd.ngram,
            "bands": dd.bands,
            "rows": dd.rows,
        },
        "classifier": clf_info,
        "domain_mix": domain_mix,
        "histograms": hist,
        "skipped_files": skipped[:100],
        "skipped_files_count": len(skipped),
        "tasks": len(tasks),
        "seconds": round(seconds, 3),
        "input_mb_per_s": round(bytes_in / 1e6 / max(seconds, 1e-9), 3),
        "token_estimate": "UTF-8 bytes / 4",
    }
    atomic_write_json(out_dir / "funnel.json", funnel)
    _write_clusters(out_dir / "dedup_clusters.jsonl", clusters, texts, sig_of, dd.cluster_examples)
    _write_dropped(out_dir / "dropped_examples.jsonl", steps)
    from lmforge.data.report import render_html, render_markdown

    atomic_write_text(out_dir / "report.md", render_markdown(funnel))
    atomic_write_text(out_dir / "report.html", render_html(funnel))

    docs_out = writers["train"].docs + writers["val"].docs
    if docs_out == 0:
        raise DataError(
            f"data: no documents survived the pipeline ({read.docs_in:,} read); see "
            f"{out_dir / 'report.md'} for what each step dropped, and relax or disable it"
        )
    metrics = _flat_metrics(funnel, steps, read, docs_out)
    log(
        f"data: {read.docs_in:,} docs in -> {docs_out:,} out (train {writers['train'].docs:,}, "
        f"val {writers['val'].docs:,}) in {seconds:.1f}s; report: {out_dir / 'report.md'}"
    )
    shards = [f"{s}/{name}" for s in ("train", "val") for name in shard_names[s]]
    return metrics, shards


# ============================================================================ helpers
def _all_docs(tdir: Path, tasks: list[Task]):
    for t in tasks:
        yield from read_jsonl_zst(tdir / f"{t.name}.docs.jsonl.zst")


def _doc(d: dict) -> Document:
    meta = dict(d.get("meta") or {})
    if d.get("url"):
        meta["url"] = d["url"]
    meta["id"] = d.get("id")
    return Document(d["text"], d.get("source") or "", meta)


def _groups(keys: np.ndarray, ids: np.ndarray):
    """Groups (size > 1) of `ids` sharing a key; each group ascending, so [0] is the first seen."""
    if not len(keys):
        return
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    ends = np.r_[starts[1:], len(sk)]
    for a, b in zip(starts, ends):
        if b - a > 1:
            yield np.sort(ids[order[a:b]])


def _set_counts(
    st: StepStats, before: np.ndarray, after: np.ndarray, nbytes: np.ndarray, reason: str
) -> None:
    tok = (nbytes + 3) // 4
    st.docs_in, st.bytes_in, st.tokens_in = (
        int(before.sum()),
        int(nbytes[before].sum()),
        int(tok[before].sum()),
    )
    st.docs_out, st.bytes_out, st.tokens_out = (
        int(after.sum()),
        int(nbytes[after].sum()),
        int(tok[after].sum()),
    )
    gone = before & ~after
    if gone.any():
        st.dropped[reason] = {"docs": int(gone.sum()), "bytes": int(nbytes[gone].sum())}


def _mix_table(domains: np.ndarray, tokens: np.ndarray, copies: np.ndarray) -> dict:
    out = {}
    total_docs, total_tok = max(1, int(copies.sum())), max(1, int((copies * tokens).sum()))
    for d in sorted(set(domains[copies > 0].tolist())):
        m = domains == d
        docs, tok = int(copies[m].sum()), int((copies[m] * tokens[m]).sum())
        out[d or "(unlabelled)"] = {
            "docs": docs,
            "tokens": tok,
            "doc_share": round(docs / total_docs, 4),
            "token_share": round(tok / total_tok, 4),
        }
    return out


def _train_classifier(cfg: DataConfig, tasks, tdir: Path, out_dir: Path, seed: int, info: dict, log):
    from lmforge.data.steps.classifier import QualityScorer

    qc = cfg.quality_classifier
    samples: dict[str, list[tuple[int, str]]] = {}
    for t in tasks:
        for r in read_jsonl_zst(tdir / f"{t.name}.samples.jsonl.zst"):
            samples.setdefault(r["kind"], []).append((r["key"], r["text"]))
    pick = {k: [t for _, t in sorted(v)[: qc.max_train_docs]] for k, v in samples.items()}
    if qc.reference:
        pos, info["positives"] = _read_texts(qc.reference, cfg, seed), f"reference: {', '.join(qc.reference)}"
    else:
        pos, info["positives"] = pick.get("kept", []), "documents that passed every per-document step"
    if qc.negatives:
        neg, info["negatives"] = _read_texts(qc.negatives, cfg, seed), f"negatives: {', '.join(qc.negatives)}"
    elif qc.reference:
        neg, info["negatives"] = pick.get("input", []), "random sample of this run's extracted input"
    else:
        neg, info["negatives"] = pick.get("dropped", []), "documents dropped by the heuristic filters"
    info["n_positives"], info["n_negatives"] = len(pos), len(neg)
    if min(len(pos), len(neg)) < qc.min_class_docs:
        info["trained"] = False
        info["note"] = (
            f"not trained: {len(pos)} positive / {len(neg)} negative examples, need "
            f"{qc.min_class_docs} of each; give quality_classifier.reference (and negatives)"
        )
        log(f"data: quality classifier {info['note']}")
        return None
    scorer = QualityScorer.train(pos, neg, qc.n_features, seed)
    scorer.save(out_dir / "quality_classifier.npz")
    info["trained"] = True
    info.update(scorer.meta)
    log(
        f"data: quality classifier trained on {len(pos)} + {len(neg)} docs "
        f"(held-out accuracy {scorer.meta.get('heldout_accuracy', 'n/a')})"
    )
    return scorer


def _read_texts(specs: list[str], cfg: DataConfig, seed: int) -> list[str]:
    """A bottom-k sample of the texts of some inputs (HTML is extracted first)."""
    from lmforge.data.sources import iter_task_documents, plan_tasks
    from lmforge.data.stage import BottomK
    from lmforge.data.steps.extract import HtmlExtract

    qc = cfg.quality_classifier
    sample = BottomK(qc.max_train_docs, seed)
    tasks, _ = plan_tasks(specs, 1, 1 << 40)
    extract = HtmlExtract()
    for t in tasks:
        for doc in extract(iter_task_documents(t, qc.text_field, SourceStats())):
            sample.add(doc.text)
    return sample.texts()


def _write_clusters(path: Path, clusters, texts: dict, sig_of, n_full: int) -> None:
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


def _write_dropped(path: Path, steps: list[StepStats]) -> None:
    """Example snippets: {step, kind (dropped/flagged/modified), reason, id, source, url, text}."""
    from lmforge.data.report import example_kind

    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for st in steps:
                for reason, exs in st.examples.items():
                    kind = example_kind(reason)
                    for ex in exs:
                        rec = {
                            "step": st.name,
                            "kind": kind,
                            "reason": reason.split(":", 1)[-1] if kind != "dropped" else reason,
                            **ex,
                        }
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _flat_metrics(funnel: dict, steps: list[StepStats], read: StepStats, docs_out: int) -> dict:
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
