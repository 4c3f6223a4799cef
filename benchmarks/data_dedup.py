"""Near-duplicate detection: precision/recall on planted duplicates, throughput vs datasketch.

Corpus: the built-in corpus (real English prose, ~460 docs; the few pairs that are already
near-duplicates of each other, 5-gram Jaccard > 0.3, are removed first) plus planted copies
of a random third of the documents, four kinds of edit per copy:

* ``words5`` / ``words10``: 5% / 10% of the words replaced at random positions (scattered),
* ``span10``: one contiguous span of 10% of the words replaced,
* ``boiler``: a 10%-of-length block of boilerplate appended (a footer) and the first line cut.

Truth: a planted copy and its original belong together (a cluster per original). Predicted:
the clusters of the method. Pairwise precision = predicted same-cluster pairs that are true;
recall = true pairs that are predicted, overall and per edit kind. Both methods use the same
shingles (word 5-grams of the normalised text) and the same LSH setting (14 bands x 8 rows);
datasketch's `MinHash(num_perm=112)` + `MinHashLSH(params=(14, 8))`, queried for candidates
and merged with the same union-find. Throughput = signatures + LSH, documents per second, on
one process and on 2 processes (signatures in a fork pool; LSH on the driver).

    python benchmarks/data_dedup.py [--copies-frac 0.33] [--seed 0]
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmforge.data.builtin import harvest_builtin_corpus  # noqa: E402
from lmforge.data.steps.dedup import MinHasher, UnionFind, lsh_clusters, normalize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_common import cpu_seconds, machine  # noqa: E402

BOILER = (
    "Share this page on social media. Subscribe to our newsletter for updates. Copyright all rights "
    "reserved. Terms of use and privacy policy apply. Contact us for more information. "
)
HASHER = MinHasher(5, 14, 8)


def shingle_set(text: str) -> set[str]:
    w = normalize(text).split()
    return {" ".join(w[i : i + 5]) for i in range(len(w) - 4)} or {" ".join(w)}


def edit(text: str, kind: str, rng: random.Random) -> str:
    words = text.split()
    n = len(words)
    if kind.startswith("words"):
        rate = int(kind[5:]) / 100
        for i in rng.sample(range(n), max(1, int(rate * n))):
            words[i] = rng.choice(["lorem", "ipsum", "dolor", "amet", "velit", "magna"])
    elif kind == "span10":
        k = max(1, n // 10)
        start = rng.randrange(0, max(1, n - k))
        words[start : start + k] = ["replaced"] * k
    elif kind == "boiler":
        lines = text.split("\n")
        text = "\n".join(lines[1:]) if len(lines) > 2 else text
        reps = max(1, int(0.1 * len(text) / len(BOILER)))
        return text + "\n" + BOILER * reps
    return " ".join(words)


def build_corpus(frac: float, seed: int):
    rng = random.Random(seed)
    base = [d.text for d in harvest_builtin_corpus() if len(d.text.split()) >= 60]
    sets = [shingle_set(t) for t in base]
    drop = set()
    for i, j in combinations(range(len(base)), 2):  # remove natural near-duplicates from the base
        if i in drop or j in drop:
            continue
        a, b = sets[i], sets[j]
        if len(a & b) / len(a | b) > 0.3:
            drop.add(j)
    base = [t for i, t in enumerate(base) if i not in drop]
    docs, group, kinds = list(base), list(range(len(base))), ["orig"] * len(base)
    chosen = rng.sample(range(len(base)), int(frac * len(base)))
    for k, i in enumerate(chosen):
        kind = ["words5", "words10", "span10", "boiler"][k % 4]
        docs.append(edit(base[i], kind, rng))
        group.append(i)
        kinds.append(kind)
    order = list(range(len(docs)))
    rng.shuffle(order)
    return [docs[i] for i in order], [group[i] for i in order], [kinds[i] for i in order], len(drop)


def _ours_sig(text: str):
    sig = HASHER.signature(text)
    return sig, HASHER.band_keys(sig)


def ours(docs: list[str], procs: int = 1, bands: int = 14, rows: int = 8) -> tuple[np.ndarray, float]:
    global HASHER
    HASHER = MinHasher(5, bands, rows)
    t0 = time.perf_counter()
    if procs > 1:
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            res = pool.map(_ours_sig, docs, chunksize=16)
    else:
        res = [_ours_sig(t) for t in docs]
    bands = np.stack([b for _, b in res])
    roots = lsh_clusters(bands)
    return roots, time.perf_counter() - t0


def _ds_sig(text: str):
    from datasketch import MinHash

    m = MinHash(num_perm=112, seed=1)
    m.update_batch([s.encode("utf-8") for s in _shingles(text)])
    return m


def _shingles(text: str) -> list[str]:
    w = normalize(text).split()
    return [" ".join(w[i : i + 5]) for i in range(len(w) - 4)] or [" ".join(w)]


def datasketch(docs: list[str], procs: int = 1, bands: int = 14, rows: int = 8) -> tuple[np.ndarray, float]:
    from datasketch import MinHashLSH

    t0 = time.perf_counter()
    if procs > 1:
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            sigs = pool.map(_ds_sig, docs, chunksize=16)
    else:
        sigs = [_ds_sig(t) for t in docs]
    lsh = MinHashLSH(num_perm=112, params=(bands, rows))
    uf = UnionFind(len(docs))
    for i, m in enumerate(sigs):
        for j in lsh.query(m):
            uf.union(int(j), i)
        lsh.insert(i, m)
    roots = np.array([uf.find(i) for i in range(len(docs))])
    return roots, time.perf_counter() - t0


def pair_scores(roots: np.ndarray, group: list[int], kinds: list[str]) -> dict:
    def pairs(labels):
        by: dict = {}
        for i, g in enumerate(labels):
            by.setdefault(int(g), []).append(i)
        return {(a, b) for m in by.values() for a, b in combinations(sorted(m), 2)}

    pred, true = pairs(roots), pairs(group)
    tp = len(pred & true)
    out = {
        "precision": tp / len(pred) if pred else 1.0,
        "recall": tp / len(true) if true else 1.0,
        "pred_pairs": len(pred),
        "true_pairs": len(true),
    }
    for kind in ("words5", "words10", "span10", "boiler"):
        tk = {(a, b) for a, b in true if kind in (kinds[a], kinds[b])}
        out[f"recall_{kind}"] = len(tk & pred) / len(tk) if tk else float("nan")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies-frac", type=float, default=0.33)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    docs, group, kinds, removed = build_corpus(args.copies_frac, args.seed)
    planted = sum(k != "orig" for k in kinds)
    print(
        f"# near-dedup benchmark: {len(docs)} docs ({planted} planted near-duplicates, {removed} natural "
        f"near-duplicates removed from the base); {machine()}"
    )
    print(f"command: python benchmarks/data_dedup.py --copies-frac {args.copies_frac} --seed {args.seed}")
    print("shingles: word 5-grams of normalised text; LSH 14 bands x 8 rows (112 permutations)")
    print()
    _ds_sig(docs[0])  # import outside the timings
    jac: dict[str, list[float]] = {}
    first = {g: i for i, (g, k) in enumerate(zip(group, kinds)) if k == "orig"}
    for i, (g, k) in enumerate(zip(group, kinds)):
        if k != "orig":
            a, b = shingle_set(docs[first[g]]), shingle_set(docs[i])
            jac.setdefault(k, []).append(len(a & b) / len(a | b))
    print(
        "true 5-gram Jaccard of planted copies with their original (mean): "
        + ", ".join(f"{k} {np.mean(v):.2f}" for k, v in sorted(jac.items()))
    )
    print()
    print(
        "| method | LSH | procs | docs/s wall (best of 3) | docs per CPU-second | precision | recall | "
        "recall words5 | recall words10 | recall span10 | recall boiler |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    runs = [
        ("lmforge (numpy MinHash)", ours, 14, 8, (1, 2)),
        ("datasketch 2.0", datasketch, 14, 8, (1, 2)),
        ("lmforge (numpy MinHash)", ours, 20, 5, (1,)),
    ]
    for name, fn, b, r, procs_list in runs:
        for procs in procs_list:
            best, best_cpu = float("inf"), float("inf")
            for _ in range(3):
                c0 = cpu_seconds()
                roots, dt = fn(docs, procs, b, r)
                best, best_cpu = min(best, dt), min(best_cpu, cpu_seconds() - c0)
            s = pair_scores(roots, group, kinds)
            print(
                f"| {name} | {b}x{r} | {procs} | {len(docs) / best:,.0f} | {len(docs) / best_cpu:,.0f} | "
                f"{s['precision']:.3f} | {s['recall']:.3f} | "
                f"{s['recall_words5']:.3f} | {s['recall_words10']:.3f} | {s['recall_span10']:.3f} | "
                f"{s['recall_boiler']:.3f} |"
            )
    print()
    print(
        "(14x8 LSH makes a pair a candidate with probability 1-(1-J^8)^14: 0.92 at J=0.75, 0.05 at J=0.5; "
        "scattered 5-10% word edits bring 5-gram Jaccard below that, so FineWeb's setting misses them by "
        "design; 20x5 fires from J~0.5)"
    )


if __name__ == "__main__":
    main()
