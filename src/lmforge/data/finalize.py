"""Phase 2 of the data stage: the global steps, the split, the shards and the report.

Input: the finished tasks under ``work/tasks`` (documents, indices, samples, stats). Two passes
over the task documents, in input order: pass A reads the text of documents that survived
dedup (classifier scores, the train/val hash) and of the documents shown in cluster and drop
examples; pass B writes the shards. Decisions in between use only the in-memory index (one
64-bit hash, `bands` band keys, a size and a domain per document: ~150 bytes each).

`finalize` runs the phases in order -- merge the task stats, load the index, dedup, train the
classifier, pass A, apply scores, mix, cap, write the shards -- each timed into its own funnel
row; funnel.py writes funnel.json and the side files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from lmforge.data import report
from lmforge.data.config import DataConfig
from lmforge.data.funnel import flat_metrics, funnel_dict, histograms, write_clusters, write_dropped
from lmforge.data.output import ShardWriter, read_jsonl_zst
from lmforge.data.readers import Document
from lmforge.data.sampling import BottomK, unit_hash
from lmforge.data.sources import SourceStats, Task, iter_task_documents, plan_tasks
from lmforge.data.steps import DOC_STEP_ORDER, StepStats
from lmforge.data.steps.base import nfc, snippet
from lmforge.errors import DataError
from lmforge.runs import atomic_write_json, atomic_write_text

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class Index:
    """What pass A and the decisions need of every surviving document, in input order."""

    tdir: Path
    tasks: list[Task]
    offsets: np.ndarray
    exact: np.ndarray
    bands: np.ndarray
    nbytes: np.ndarray
    domains: np.ndarray
    sigs: list[np.ndarray]

    @property
    def n(self) -> int:
        return int(self.offsets[-1])

    @property
    def tokens(self) -> np.ndarray:
        return (self.nbytes + 3) // 4

    def sig_of(self, i: int) -> np.ndarray:
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return np.asarray(self.sigs[k][i - self.offsets[k]])

    def docs(self) -> Iterator[dict]:
        for t in self.tasks:
            yield from read_jsonl_zst(self.tdir / f"{t.name}.docs.jsonl.zst")


@dataclass
class Decisions:
    """The outcome of the global steps: who survives, with how many copies, in which split."""

    alive: np.ndarray
    clusters: list[tuple[str, np.ndarray]] = field(default_factory=list)
    scores: np.ndarray | None = None
    u: np.ndarray | None = None
    texts: dict[int, dict] = field(default_factory=dict)
    copies: np.ndarray | None = None
    down: np.ndarray | None = None


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
    """Merge the task stats, run the global steps (each timed into its funnel row), write the
    shards, the funnel and the reports; returns (flat metrics, shard paths)."""
    ex_n = cfg.examples_per_reason
    read, doc_steps = merge_task_stats(work / "tasks", tasks, ex_n)
    ix = load_index(work / "tasks", tasks, cfg.dedup.bands)
    dec = Decisions(alive=np.ones(ix.n, dtype=bool))
    exact_stats, near_stats = dedup(cfg, ix, dec, log)
    qc = cfg.quality_classifier
    clf_stats = StepStats("quality_classifier", max_examples=ex_n)
    clf_info: dict = {"enabled": qc.enabled, "mode": qc.mode, "threshold": qc.threshold}
    scorer = None
    if qc.enabled:
        t = time.perf_counter()
        with threadpool_limits(1):  # scores must not depend on the BLAS thread count
            scorer = _train_classifier(cfg, tasks, work / "tasks", out_dir, seed, clf_info, log)
        clf_stats.seconds += time.perf_counter() - t
    shown = {int(i) for _, m in dec.clusters[: cfg.dedup.cluster_examples] for i in m}
    clf_stats.seconds += pass_a(ix, dec, scorer, shown, seed)
    for kind, members in dec.clusters:  # dedup drop examples come from the clusters shown
        st = exact_stats if kind == "exact" else near_stats
        for m in members[1:]:
            if int(m) in dec.texts:
                st.example("duplicate" if kind == "exact" else "near_duplicate", _doc(dec.texts[int(m)]))
    if scorer is not None:
        apply_scores(cfg, ix, dec, clf_stats, clf_info)
    mix_stats, domain_mix = mix(cfg, ix, dec, seed, log)
    cap_stats = cap(cfg, ix, dec)
    writers, shard_names, out_stats = write_shards(cfg, out_dir, ix, dec, mix_stats)
    dd = cfg.dedup
    steps = [read] + [doc_steps[name] for name in DOC_STEP_ORDER if name in doc_steps]
    steps += [
        st
        for st, on in (
            (exact_stats, dd.enabled and dd.exact),
            (near_stats, dd.enabled and dd.near),
            (clf_stats, scorer is not None),
            (mix_stats, True),
            (cap_stats, cap_stats is not None),
        )
        if on and st is not None
    ]
    seconds = time.time() - t0
    funnel = funnel_dict(cfg, steps, writers, shard_names, dec, clf_info, domain_mix, skipped, tasks, seconds)
    funnel["histograms"] = histograms(steps + [out_stats])
    funnel["write_seconds"] = round(out_stats.seconds, 3)
    atomic_write_json(out_dir / "funnel.json", funnel)
    write_clusters(out_dir / "dedup_clusters.jsonl", dec.clusters, dec.texts, ix.sig_of, dd.cluster_examples)
    write_dropped(out_dir / "dropped_examples.jsonl", steps)
    atomic_write_text(out_dir / "report.md", report.render_markdown(funnel))
    atomic_write_text(out_dir / "report.html", report.render_html(funnel))
    docs_out = writers["train"].docs + writers["val"].docs
    if docs_out == 0:
        raise DataError(
            f"data: no documents survived the pipeline ({read.docs_in:,} read); see "
            f"{out_dir / 'report.md'} for what each step dropped, and relax or disable it"
        )
    metrics = flat_metrics(funnel, steps, read, docs_out)
    log(
        f"data: {read.docs_in:,} docs in -> {docs_out:,} out (train {writers['train'].docs:,}, "
        f"val {writers['val'].docs:,}) in {seconds:.1f}s; report: {out_dir / 'report.md'}"
    )
    shards = [f"{s}/{name}" for s in ("train", "val") for name in shard_names[s]]
    return metrics, shards


# ============================================================================ phases
def merge_task_stats(tdir: Path, tasks: list[Task], ex_n: int) -> tuple[StepStats, dict[str, StepStats]]:
    """The read row and every per-document step's row, summed over the tasks."""
    read = StepStats("read", max_examples=ex_n)
    doc_steps: dict[str, StepStats] = {}
    for t in tasks:
        s = json.loads((tdir / f"{t.name}.stats.json").read_text())
        read.merge(StepStats.from_dict(s["read"]))
        for st in s["steps"]:
            doc_steps.setdefault(st["name"], StepStats(st["name"], max_examples=ex_n)).merge(
                StepStats.from_dict(st)
            )
    return read, doc_steps


def load_index(tdir: Path, tasks: list[Task], n_bands: int) -> Index:
    idx = [np.load(tdir / f"{t.name}.index.npz", allow_pickle=False) for t in tasks]
    counts = np.array([len(z["exact"]) for z in idx], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    n = int(offsets[-1])
    return Index(
        tdir=tdir,
        tasks=tasks,
        offsets=offsets,
        exact=np.concatenate([z["exact"] for z in idx]) if n else np.zeros(0, np.uint64),
        bands=np.concatenate([z["bands"] for z in idx]) if n else np.zeros((0, n_bands), np.uint64),
        nbytes=np.concatenate([z["bytes"] for z in idx]) if n else np.zeros(0, np.int64),
        domains=np.concatenate([z["domain"].astype(object) for z in idx]) if n else np.zeros(0, object),
        sigs=[np.load(tdir / f"{t.name}.sig.npy", mmap_mode="r") for t in tasks],
    )


def dedup(cfg: DataConfig, ix: Index, dec: Decisions, log) -> tuple[StepStats, StepStats]:
    """Exact, then near (MinHash LSH) dedup over all tasks: the first document of a cluster stays."""
    from lmforge.data.steps.dedup import lsh_clusters

    ex_n, dd, alive = cfg.examples_per_reason, cfg.dedup, dec.alive
    exact_stats = StepStats("exact_dedup", max_examples=ex_n)
    near_stats = StepStats("near_dedup", max_examples=ex_n)
    if dd.enabled and dd.exact:
        t, before = time.perf_counter(), alive.copy()
        for members in _groups(ix.exact, np.arange(ix.n)):
            alive[members[1:]] = False
            dec.clusters.append(("exact", members))
        _set_counts(exact_stats, before, alive, ix.nbytes, "duplicate")
        exact_stats.seconds += time.perf_counter() - t
    if dd.enabled and dd.near:
        t, before = time.perf_counter(), alive.copy()
        surv = np.flatnonzero(alive)
        verify = dd.verify_threshold is not None and len(surv)
        sub_sigs = np.stack([ix.sig_of(int(i)) for i in surv]) if verify else None
        roots = lsh_clusters(ix.bands[surv], sub_sigs, dd.verify_threshold)
        for members in _groups(roots.astype(np.uint64), surv):
            alive[members[1:]] = False
            dec.clusters.append(("near", members))
        _set_counts(near_stats, before, alive, ix.nbytes, "near_duplicate")
        near_stats.seconds += time.perf_counter() - t
    dec.clusters.sort(key=lambda c: (-len(c[1]), int(c[1][0])))
    log(
        f"data: dedup over {ix.n:,} docs: {sum(1 for c in dec.clusters if c[0] == 'exact'):,} exact and "
        f"{sum(1 for c in dec.clusters if c[0] == 'near'):,} near-duplicate clusters"
    )
    return exact_stats, near_stats


def pass_a(ix: Index, dec: Decisions, scorer, shown: set[int], seed: int) -> float:
    """Read the survivors once: split hashes, classifier scores, texts of the examples shown.
    Returns the seconds spent scoring (the classifier's share of this pass)."""
    u, scores = np.full(ix.n, np.nan), np.full(ix.n, np.nan)
    dec.u, dec.scores = u, scores
    batch_i: list[int] = []
    batch_t: list[str] = []
    spent = 0.0

    def flush_scores() -> None:
        nonlocal spent
        if batch_i:
            t = time.perf_counter()
            with threadpool_limits(1):
                scores[np.array(batch_i)] = scorer.score(batch_t)
            spent += time.perf_counter() - t
            batch_i.clear()
            batch_t.clear()

    for i, rec in enumerate(ix.docs()):
        if i in shown:
            dec.texts[i] = {
                "id": rec["id"],
                "source": rec["source"],
                "url": rec["meta"].get("url"),
                "text": snippet(rec["text"]),
            }
        if dec.alive[i]:
            u[i] = unit_hash(seed, rec["text"])
            if scorer is not None:
                batch_i.append(i)
                batch_t.append(rec["text"])
                if len(batch_i) >= 512:
                    flush_scores()
    flush_scores()
    return spent


def apply_scores(cfg: DataConfig, ix: Index, dec: Decisions, clf_stats: StepStats, clf_info: dict) -> None:
    qc, scores = cfg.quality_classifier, dec.scores
    assert scores is not None, "pass_a fills the scores"
    before = dec.alive.copy()
    scored = ~np.isnan(scores)
    for v in scores[scored]:
        clf_stats.observe("quality_score", float(v))
    if qc.mode == "filter":
        dec.alive &= ~(scored & (scores < qc.threshold))
    _set_counts(clf_stats, before, dec.alive, ix.nbytes, "below_threshold")
    clf_info["mean_score"] = round(float(np.nanmean(scores)), 4) if scored.any() else None


def mix(cfg: DataConfig, ix: Index, dec: Decisions, seed: int, log) -> tuple[StepStats, dict]:
    """Domain mixing: copies per document (0 = downsampled) towards the configured shares."""
    from lmforge.data.steps.domain import mix_plan

    t = time.perf_counter()
    dm, nbytes, tokens, n = cfg.domain, ix.nbytes, ix.tokens, ix.n
    mix_stats = StepStats("mixing", max_examples=cfg.examples_per_reason)
    live = np.flatnonzero(dec.alive)
    sizes = tokens[live] if dm.mix_by == "tokens" else np.ones(len(live), dtype=np.int64)
    order_keys = (ix.exact[live] ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF)) * _GOLDEN
    weights = dm.weights if dm.enabled else {}
    copies_live, mix_summary = mix_plan(
        ix.domains[live], sizes.astype(np.float64), order_keys, weights, dm.max_repeat
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
        "before": _mix_table(ix.domains[live], tokens[live], np.ones(len(live), np.int64)),
        "after": _mix_table(ix.domains, tokens, copies),
    }
    dec.copies, dec.down = copies, down
    mix_stats.seconds += time.perf_counter() - t
    return mix_stats, domain_mix


def cap(cfg: DataConfig, ix: Index, dec: Decisions) -> StepStats | None:
    """max_docs: the first N documents, in input order."""
    if not cfg.max_docs:
        return None
    copies = dec.copies
    assert copies is not None, "mix sets the copies"
    cap_stats = StepStats("max_docs", max_examples=0)
    before = copies.copy()
    copies[np.cumsum(copies) > cfg.max_docs] = 0
    for attr, arr in (("docs", np.ones(ix.n, np.int64)), ("bytes", ix.nbytes), ("tokens", ix.tokens)):
        setattr(cap_stats, f"{attr}_in", int((before * arr).sum()))
        setattr(cap_stats, f"{attr}_out", int((copies * arr).sum()))
    if cap_stats.docs_out < cap_stats.docs_in:
        cap_stats.dropped["over_max_docs"] = {
            "docs": cap_stats.docs_in - cap_stats.docs_out,
            "bytes": cap_stats.bytes_in - cap_stats.bytes_out,
        }
    return cap_stats


def write_shards(
    cfg: DataConfig, out_dir: Path, ix: Index, dec: Decisions, mix_stats: StepStats
) -> tuple[dict[str, ShardWriter], dict[str, list[str]], StepStats]:
    """The seeded train/val split, then pass B: every kept document (times its copies) to its shard."""
    t = time.perf_counter()
    copies, u, scores, qc = dec.copies, dec.u, dec.scores, cfg.quality_classifier
    assert copies is not None and u is not None and scores is not None and dec.down is not None
    final = np.flatnonzero(copies > 0)
    is_val = np.zeros(ix.n, dtype=bool)
    is_val[final] = u[final] < cfg.val_fraction
    if len(final) >= 2:
        if not is_val[final].any():
            is_val[final[np.argmin(u[final])]] = True
        if is_val[final].all():
            is_val[final[np.argmax(u[final])]] = False
    writers = {s: ShardWriter(out_dir / s, cfg.output_format, cfg.shard_docs) for s in ("train", "val")}
    out_stats = StepStats("output", max_examples=cfg.examples_per_reason)
    down_set = set(int(i) for i in dec.down[: cfg.examples_per_reason])
    for i, rec in enumerate(ix.docs()):
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
        out_stats.add_out(Document(rec["text"], "", {}))
        for _ in range(c):
            writers["val" if is_val[i] else "train"].write(rec)
    shard_names = {s: w.close() for s, w in writers.items()}
    out_stats.docs_in = out_stats.docs_out
    out_stats.bytes_in, out_stats.tokens_in = out_stats.bytes_out, out_stats.tokens_out
    out_stats.seconds += time.perf_counter() - t
    return writers, shard_names, out_stats


# ============================================================================ helpers
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
    from lmforge.data.steps.extract import HtmlExtract

    qc = cfg.quality_classifier
    sample = BottomK(qc.max_train_docs, seed)
    tasks, _ = plan_tasks(specs, 1, 1 << 40)
    extract = HtmlExtract()
    for t in tasks:
        for doc in extract(iter_task_documents(t, qc.text_field, SourceStats())):
            sample.add(nfc(doc.text))
    return sample.texts()
