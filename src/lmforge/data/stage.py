"""The data stage: raw inputs -> filtered, deduplicated, scored, mixed train/val shards.

Two phases, as in datatrove:

1. **Tasks** (parallel; `executors.py`): each task streams its files through the per-document
   steps (steps/__init__.py) and writes, atomically, its surviving documents, an index
   (normalised-text hash, MinHash band keys and signature, size, domain), small text samples
   for the quality classifier, and last its ``stats.json``, the completion marker. A rerun
   skips every task whose marker exists. A task is claimed (an exclusive lock) before it runs,
   and runs on one BLAS/OpenMP thread, so its scores do not depend on the machine.
2. **Finalise** (driver, `finalize.py`): exact and near dedup over all indices, the quality
   classifier (train, score, filter/weight), domain mixing, the seeded train/val split, the
   shards, funnel.json, report.md/html, dedup_clusters.jsonl and dropped_examples.jsonl.
   Its outputs have deterministic names and are rewritten whole, so a crash here is repaired
   by running again; ``done.json`` (written last) makes a finished stage return at once.

Everything under ``out_dir/work`` belongs to one fingerprint of (config, seed, input files):
change any of them and the stage starts over rather than mixing old and new tasks. The output
does not depend on the number of workers: tasks are contiguous slices of the input (a large
file is cut into byte ranges at record starts, with ids unchanged), dedup keeps the first
document in input order, samples are bottom-k by seeded hash.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from lmforge.data.builtin import harvest_builtin_corpus
from lmforge.data.config import DataConfig
from lmforge.data.executors import run_tasks
from lmforge.data.finalize import finalize
from lmforge.data.output import iter_records, list_shards, write_jsonl_zst
from lmforge.data.readers import Document
from lmforge.data.sampling import BottomK, unit_hash
from lmforge.data.sources import SourceStats, Task, iter_task_documents, plan_tasks
from lmforge.data.steps import HEURISTIC_STEPS, StepStats, build_doc_steps
from lmforge.data.steps.base import nfc, text_bytes
from lmforge.errors import DataError
from lmforge.runs import atomic_path, atomic_write_json, fingerprint

EXECUTION_ONLY = ("workers", "executor", "ray_address", "keep_work")
__all__ = ["BottomK", "unit_hash", "run_data_stage", "prepare_stage", "run_planned_task", "iter_output_texts"]


# ============================================================================ public API
def run_data_stage(
    cfg: DataConfig,
    out_dir: Path,
    *,
    seed: int,
    log: Callable[[str], None] = print,
    threads: int | None = None,
) -> dict:
    """Run (or resume, or skip if complete) the data stage into `out_dir`; returns flat metrics.

    `threads` (``run.threads``) caps the BLAS/OpenMP threads of the driver (threadpoolctl); the
    task workers and the quality classifier always use one, so no score depends on it."""
    with threadpool_limits(threads) if threads else contextlib.nullcontext():
        return _run_data_stage(cfg, Path(out_dir), seed, log)


def _run_data_stage(cfg: DataConfig, out_dir: Path, seed: int, log: Callable[[str], None]) -> dict:
    t0 = time.time()
    plan, finished_metrics = prepare_stage(cfg, out_dir, seed=seed, log=log)
    if finished_metrics is not None:
        return finished_metrics
    work = out_dir / "work"
    tasks = [Task.from_dict(t) for t in plan["tasks"]]
    pending = [t for t in tasks if not _task_done(work, t)]
    split = {t.items[0] for t in tasks if t.kind == "range"}
    ranges = sum(t.kind == "range" for t in tasks)
    log(
        f"data: {len(tasks)} task(s) over {len(cfg.inputs)} input spec(s)"
        + (f" ({len(split)} large file(s) cut into {ranges} byte-range tasks)" if split else "")
        + f"; {len(tasks) - len(pending)} already done; executor={cfg.executor}, workers={cfg.workers}"
    )
    finished = [0]

    def on_done(i: int, result: dict) -> None:
        finished[0] += 1
        log(
            f"data: [{finished[0]}/{len(pending)}] {result['task']}: {result['docs_in']:,} docs read, "
            f"{result['docs_out']:,} kept ({result['seconds']:.1f}s)"
        )

    if pending and cfg.executor == "local" and cfg.workers > 1:
        _warm_up(cfg)  # forked workers inherit the imports and the language model
    cfg_dict = cfg.model_dump(mode="json")
    run_tasks(
        run_task,
        [(t.to_dict(), cfg_dict, str(work), seed) for t in pending],
        executor=cfg.executor,
        workers=cfg.workers,
        ray_address=cfg.ray_address,
        on_done=on_done,
    )

    metrics, shards = finalize(cfg, out_dir, work, tasks, plan.get("skipped_files", []), seed, log, t0)
    atomic_write_json(
        out_dir / "done.json", {"fingerprint": plan["fingerprint"], "metrics": metrics, "shards": shards}
    )
    if not cfg.keep_work:
        shutil.rmtree(work / "tasks", ignore_errors=True)
    return metrics


def prepare_stage(
    cfg: DataConfig, out_dir: Path, *, seed: int, log: Callable[[str], None] = print
) -> tuple[dict, dict | None]:
    """Plan the tasks into ``out_dir/work/plan.json`` (kept if still valid) and build the
    decontamination index. Returns (plan, metrics-if-the-stage-is-already-complete).

    For batch clusters: call this once, run `run_planned_task(out_dir, i)` for every task index
    anywhere that sees `out_dir` (e.g. a Slurm array), then `run_data_stage` to finalise.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks, skipped = plan_tasks(cfg.inputs, cfg.workers, cfg.task_bytes)
    fp = _fingerprint(cfg, seed, tasks)
    done = _read_json(out_dir / "done.json")
    work = out_dir / "work"
    plan = _read_json(work / "plan.json")
    if (
        done
        and done.get("fingerprint") == fp
        and all((out_dir / s).is_file() for s in done.get("shards", []))
    ):
        log(f"data: already complete in {out_dir} (fingerprint {fp})")
        return plan or {"fingerprint": fp, "tasks": []}, done["metrics"]
    if plan is None or plan.get("fingerprint") != fp:
        if work.exists():
            log("data: config, seed or inputs changed since the last attempt; starting over")
            shutil.rmtree(work)
        (out_dir / "done.json").unlink(missing_ok=True)
        plan = {
            "fingerprint": fp,
            "seed": seed,
            "cfg": cfg.model_dump(mode="json"),
            "tasks": [t.to_dict() for t in tasks],
            "skipped_files": skipped,
        }
        atomic_write_json(work / "plan.json", plan)
    _prepare_decontam(cfg, work, log)
    return plan, None


def run_planned_task(out_dir: Path, index: int) -> dict:
    """Run task `index` of ``out_dir/work/plan.json`` (written by `prepare_stage`); idempotent."""
    work = Path(out_dir) / "work"
    plan = _read_json(work / "plan.json")
    if plan is None:
        raise DataError(f"{work / 'plan.json'}: no plan; call prepare_stage (or run_data_stage) first")
    if not 0 <= index < len(plan["tasks"]):
        raise DataError(f"task index {index} out of range: the plan has {len(plan['tasks'])} tasks")
    task = Task.from_dict(plan["tasks"][index])
    if _task_done(work, task):
        return {"task": task.name, "skipped": True}
    return run_task(plan["tasks"][index], plan["cfg"], str(work), plan["seed"])


def iter_output_texts(out_dir: Path, split: str) -> Iterator[str]:
    """The texts of `split` ("train" or "val") in shard order, then record order."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    folder = Path(out_dir) / split
    if not list_shards(folder):
        raise DataError(f"{folder}: no shards; run the data stage first (lmforge data)")
    for record in iter_records(folder):
        yield record["text"]


# ============================================================================ phase 1: a task
def run_task(task_dict: dict, cfg_dict: dict, work_dir: str, seed: int) -> dict:
    """Process one task end to end and write its files; the entry point of every executor.

    The task is claimed first (an exclusive lock on ``tasks/<task>.claim``, released by the OS
    when its holder dies): a second process given the same task, e.g. a rerun beside survivors
    of a killed run, fails with the holder's pid instead of writing the same files."""
    task = Task.from_dict(task_dict)
    tdir = Path(work_dir) / "tasks"
    tdir.mkdir(parents=True, exist_ok=True)
    # one BLAS/OpenMP thread per worker: parallelism is across tasks, and the language scores
    # (numpy dot products) then do not depend on the machine's or the environment's thread count
    with claim_task(tdir / f"{task.name}.claim"), threadpool_limits(1):
        if _task_done(Path(work_dir), task):
            done = json.loads((tdir / f"{task.name}.stats.json").read_text())
            return {k: done[k] for k in ("task", "docs_in", "docs_out", "seconds")}
        return _run_claimed_task(task, DataConfig.model_validate(cfg_dict), Path(work_dir), seed)


@contextlib.contextmanager
def claim_task(path: Path) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock on `path` (pid and host written into it)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; tasks are still exclusive within one pool
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "another process"
            raise DataError(
                f"{path}: task is being run by {holder}; wait for it to finish or stop it, then run again"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield
    finally:
        os.close(fd)


def _run_claimed_task(task: Task, cfg: DataConfig, work: Path, seed: int) -> dict:
    from lmforge.data.steps.dedup import MinHasher, exact_hash, normalize

    t0 = time.time()
    tdir = work / "tasks"
    work_dir = str(work)
    read = SourceStats()
    read_text = StepStats("read")
    steps = build_doc_steps(cfg, _load_decontam(Path(work_dir)))

    qc = cfg.quality_classifier
    want = set()
    if qc.enabled:
        want = {"kept"} if not qc.reference else ({"input"} if not qc.negatives else set())
        if not qc.reference and not qc.negatives:
            want.add("dropped")
    samples = {k: BottomK(qc.max_train_docs, seed) for k in want}
    if "dropped" in samples:
        for s in steps:
            if s.name in HEURISTIC_STEPS:
                s.on_drop = lambda doc, reason: samples["dropped"].add(doc.text)

    def counted(docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            doc.text = nfc(doc.text)  # one form for every source, so n-grams and hashes compare
            read_text.add_out(doc)
            yield doc

    source: Iterable[Document] = iter_task_documents(task, cfg.text_field, read, cfg.extract.max_html_bytes)
    if cfg.max_docs:  # room for the filters to drop some; finalize keeps the first max_docs
        source = itertools.islice(source, max_docs_read(cfg.max_docs))
    stream: Iterable[Document] = counted(source)
    tapped = False
    for step in steps:
        if not tapped and step.name not in ("extract", "sanity") and "input" in samples:
            stream, tapped = _tap(stream, samples["input"]), True
        stream = step(stream)

    hasher = MinHasher(cfg.dedup.ngram, cfg.dedup.bands, cfg.dedup.rows)
    index: dict[str, list] = {"exact": [], "bands": [], "sig": [], "bytes": [], "domain": []}

    def records() -> Iterator[dict]:
        for doc in stream:
            norm = normalize(doc.text)
            index["exact"].append(exact_hash(doc.text, norm))
            sig = hasher.signature(doc.text, norm)
            index["sig"].append(sig)
            index["bands"].append(hasher.band_keys(sig))
            index["bytes"].append(text_bytes(doc.text))
            index["domain"].append(str(doc.meta.get("domain", "")))
            if "kept" in samples:
                samples["kept"].add(doc.text)
            yield {
                "text": doc.text,
                "id": str(doc.meta.get("id", doc.source)),
                "source": doc.source,
                "meta": _jsonable(doc.meta),
            }

    n = write_jsonl_zst(tdir / f"{task.name}.docs.jsonl.zst", records())
    P, B = hasher.num_perm, cfg.dedup.bands
    with atomic_path(tdir / f"{task.name}.index.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                exact=np.array(index["exact"], dtype=np.uint64),
                bands=np.array(index["bands"], dtype=np.uint64).reshape(n, B),
                bytes=np.array(index["bytes"], dtype=np.int64),
                domain=np.array(index["domain"], dtype=str),
            )
    with atomic_path(tdir / f"{task.name}.sig.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.array(index["sig"], dtype=np.uint32).reshape(n, P))
    write_jsonl_zst(
        tdir / f"{task.name}.samples.jsonl.zst",
        (
            {"kind": k, "key": key, "text": text}
            for k, s in sorted(samples.items())
            for key, text in s.items()
        ),
    )

    _fill_read_row(read_text, read, task)
    summary = {
        "task": task.name,
        "docs_in": read.records_read,
        "docs_out": n,
        "seconds": time.time() - t0,
        "read": read_text.to_dict(),
        "steps": [s.stats.to_dict() for s in steps],
    }
    atomic_write_json(tdir / f"{task.name}.stats.json", summary)  # the completion marker: last
    return {k: summary[k] for k in ("task", "docs_in", "docs_out", "seconds")}


def _fill_read_row(row: StepStats, read: SourceStats, task: Task) -> None:
    """The funnel's read row: documents counted by the readers, bytes of the task's input."""
    row.name = "read"
    row.docs_in = read.records_read
    row.bytes_in = task.bytes if task.kind in ("files", "range") else row.bytes_out
    row.dropped = {r: {"docs": c, "bytes": 0} for r, c in read.dropped.items()}
    row.examples = {
        r: [
            {"id": ex.split(": ", 1)[0], "source": None, "url": None, "text": ex.split(": ", 1)[-1]}
            for ex in exs
        ]
        for r, exs in read.examples.items()
    }
    row.counters = {"files": read.files, "replaced_bytes": read.replaced_bytes, **read.info}


def max_docs_read(max_docs: int) -> int:
    """Documents a task reads when `max_docs` is set."""
    return 2 * max_docs + 10


def _warm_up(cfg: DataConfig) -> None:
    build_doc_steps(cfg)
    if cfg.language.enabled:
        from lmforge.data.steps.language import identify

        identify("warm up")
    import trafilatura  # noqa: F401

    if "builtin" in cfg.inputs:  # harvested once here, not once per worker
        harvest_builtin_corpus()


def _tap(stream: Iterable[Document], sample: BottomK) -> Iterator[Document]:
    for doc in stream:
        sample.add(doc.text)
        yield doc


def _jsonable(meta: dict) -> dict:
    out = {}
    for k, v in meta.items():
        try:
            json.dumps(v)
            out[k] = v
        except (TypeError, ValueError):
            out[k] = str(v)
    return out


# ============================================================================ helpers
def _fingerprint(cfg: DataConfig, seed: int, tasks: list[Task]) -> str:
    d = cfg.model_dump(mode="json")
    for k in EXECUTION_ONLY:
        d.pop(k, None)
    files = sorted({tuple(f) for t in tasks for f in t.fingerprint})
    specials = sorted({t.items[0] for t in tasks if t.kind != "files"})
    extra = []
    for specs in (cfg.decontam.eval_sets, cfg.quality_classifier.reference, cfg.quality_classifier.negatives):
        for spec in specs:
            extra += _spec_files(spec)
    return fingerprint({"cfg": d, "seed": seed, "files": files, "specials": specials, "extra": sorted(extra)})


def _spec_files(spec: str) -> list:
    import glob
    import os

    paths = [Path(spec)] if Path(spec).exists() else [Path(p) for p in glob.glob(spec, recursive=True)]
    out = []
    for p in paths:
        for f in [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()):
            out.append((str(f), f.stat().st_size, int(os.path.getmtime(f))))
    return out


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _task_done(work: Path, task: Task) -> bool:
    tdir = work / "tasks"
    return all(
        (tdir / f"{task.name}.{suffix}").is_file()
        for suffix in ("stats.json", "docs.jsonl.zst", "index.npz", "sig.npy")
    )


def _prepare_decontam(cfg: DataConfig, work: Path, log) -> None:
    d = cfg.decontam
    path = work / "decontam.npz"
    if not d.enabled or not d.eval_sets or path.is_file():
        return
    from lmforge.data.steps.decontam import build_eval_index

    ix = build_eval_index(d.eval_sets, d.eval_fields or None, d.ngram, d.min_item_words)
    log(
        f"data: decontamination against {ix.items:,} eval items ({len(ix.hashes):,} {d.ngram}-grams "
        f"from fields {', '.join(d.eval_fields) or '*'})"
    )
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                hashes=ix.hashes,
                owners=ix.owners,
                labels=np.array(ix.labels, dtype=str),
                short=np.array(ix.short, dtype=np.int64),
                items=np.int64(ix.items),
            )


def _load_decontam(work: Path):
    path = work / "decontam.npz"
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        labels = [str(x) for x in z["labels"]]
        return z["hashes"], [int(x) for x in z["short"]], [labels[i] for i in z["owners"]]
