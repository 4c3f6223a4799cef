"""RAG quality: retrieval recall@k on questions whose answer chunk is known, and answer accuracy
of a model with vs without retrieval.

    python benchmarks/serve_rag_eval.py --model runs/tiny/pretrain/model
    python benchmarks/serve_rag_eval.py --embedders minilm,hash --haystack 300

Corpus (built deterministically, indexed with `lmforge.serve.rag` into a real sqlite-vec store):
  * 60 "country" fact sheets about fictional places (capital, river, export, animal, founding
    year): the answers exist nowhere else, so a model can only know them by retrieval;
  * a haystack of real text: the first N documents of lmforge's built-in corpus (Python
    standard-library docstrings), chunked the same way, as distractors.
Question sets:
  * `facts`: 3 paraphrased questions per fact sheet ("Which city is the seat of government of
    Varnolia?"), gold = that sheet's chunk. Wording deliberately differs from the sheet's.
  * `sentence`: for 100 haystack chunks, one of their sentences (>= 8 words) as the query,
    gold = that chunk (known-item retrieval on real text).
Answer accuracy (`--model`): greedy completion of `Question: ...\nAnswer:` (no sources) vs the
same with the top-k sources before it (what `lmforge rag query` does for plain LMs), and the
cloze form "The capital of Varnolia is"; an answer is right when it contains the gold string.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from pathlib import Path

SYL = [
    "var",
    "no",
    "li",
    "zor",
    "bi",
    "quen",
    "tal",
    "mox",
    "pel",
    "ra",
    "dun",
    "ke",
    "sha",
    "vel",
    "tor",
    "mi",
    "gal",
    "ek",
    "sor",
    "an",
    "bel",
    "ur",
    "fen",
    "do",
]
EXPORTS = [
    "copper",
    "purple wool",
    "salt",
    "glass beads",
    "rice",
    "timber",
    "silver",
    "olive oil",
    "tea",
    "amber",
]
ANIMALS = ["otter", "heron", "lynx", "ibex", "falcon", "tortoise", "badger", "crane", "marten", "gecko"]


def name(rng, n=3):
    return "".join(rng.choice(SYL) for _ in range(n)).capitalize()


def fact_sheets(n=60, seed=0):
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        country = name(rng) + rng.choice(["ia", "land", "ora"])
        if country in seen:
            continue
        seen.add(country)
        f = {
            "country": country,
            "capital": name(rng, 2) + rng.choice(["ville", "port", "grad", "ton"]),
            "river": "the " + name(rng, 2),
            "export": rng.choice(EXPORTS),
            "animal": rng.choice(ANIMALS),
            "year": str(rng.randint(1200, 1950)),
        }
        f["text"] = (
            f"{country} is a small nation in the northern hills. Its capital is {f['capital']}, a city "
            f"built on both banks of {f['river']} river. {country} was founded in {f['year']}. The economy "
            f"of {country} depends mostly on {f['export']}, which merchants carry to the coast. The national "
            f"animal of {country} is the {f['animal']}, shown on its flag."
        )
        out.append(f)
    return out


def questions(f):
    c = f["country"]
    return [
        (f"Which city is the seat of government of {c}?", f["capital"]),
        (f"What product does {c} mainly sell abroad?", f["export"]),
        (f"In which year did {c} come into existence?", f["year"]),
    ]


def recall_at(ranks, k):
    return sum(1 for r in ranks if r is not None and r < k) / len(ranks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--embedders", default="minilm,hash")
    ap.add_argument("--haystack", type=int, default=40, help="built-in corpus documents used as distractors")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--model", help="model folder for answer accuracy (the default pipeline's model)")
    ap.add_argument("--answer-k", type=int, default=2, help="sources put in the prompt for answers")
    ap.add_argument("--json")
    a = ap.parse_args()

    from lmforge.data.builtin import harvest_builtin_corpus
    from lmforge.serve.rag.chunk import chunk_text
    from lmforge.serve.rag.embed import get_embedder
    from lmforge.serve.rag.index import build_index
    from lmforge.serve.rag.query import Retriever

    tmp = Path(tempfile.mkdtemp())
    docs = tmp / "docs"
    docs.mkdir()
    sheets = fact_sheets()
    for i, f in enumerate(sheets):
        (docs / f"fact_{i:03d}.txt").write_text(f["text"])
    hay = harvest_builtin_corpus()[: a.haystack]
    rows = [json.dumps({"text": d.text}) for d in hay]
    (docs / "haystack.jsonl").write_text("\n".join(rows) + "\n")
    rng = random.Random(1)
    # sentence -> chunk queries over the haystack (chunked as the index will chunk it)
    hay_chunks = [
        (f"{docs / 'haystack.jsonl'}#{n}", j, c)
        for n, d in enumerate(hay)
        for j, c in enumerate(chunk_text(d.text, 120, 20))
    ]
    sent_q = []
    for src, j, c in rng.sample(hay_chunks, min(100, len(hay_chunks))):
        sents = [s for s in re.split(r"(?<=[.!?])\s+", c) if len(s.split()) >= 8]
        if sents:
            sent_q.append((rng.choice(sents), src, j))
    fact_q = [
        (q, str(docs / f"fact_{i:03d}.txt"), 0, gold)
        for i, f in enumerate(sheets)
        for q, gold in questions(f)
    ]

    report = {
        "corpus": {"fact_sheets": len(sheets), "haystack_docs": len(hay), "haystack_chunks": len(hay_chunks)},
        "retrieval": {},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    retrievers = {}
    for spec in a.embedders.split(","):
        emb = get_embedder(spec)
        t0 = time.perf_counter()
        _, stats = build_index(tmp / f"idx_{spec.replace(':', '_')}", [str(docs)], embedder=emb)
        t_index = time.perf_counter() - t0
        r = Retriever(tmp / f"idx_{spec.replace(':', '_')}", embedder=emb)
        retrievers[spec] = r
        res = {"index_s": round(t_index, 1), "chunks": stats["chunks"], "backend": stats["backend"]}
        for label, qs in (("facts", [(q, s, j) for q, s, j, _ in fact_q]), ("sentence", sent_q)):
            ranks, t0 = [], time.perf_counter()
            for q, src, j in qs:
                hits = r.search(q, a.k)
                ranks.append(next((n for n, h in enumerate(hits) if h.source == src and h.chunk == j), None))
            res[label] = {
                "n": len(qs),
                "recall@1": round(recall_at(ranks, 1), 3),
                f"recall@{a.k}": round(recall_at(ranks, a.k), 3),
                "ms_per_query": round((time.perf_counter() - t0) / len(qs) * 1000, 2),
            }
        report["retrieval"][spec] = res
        print(spec, json.dumps(res))

    if a.model:
        from lmforge.serve.engine import Engine, GenParams
        from lmforge.serve.rag.query import answer

        spec = a.embedders.split(",")[0]
        r = retrievers[spec]
        params = GenParams(max_tokens=12, temperature=0, stop=["\n"])
        acc = {"with_retrieval": 0, "without_retrieval": 0, "cloze_with": 0, "cloze_without": 0}
        examples = []
        with Engine.from_pretrained(a.model, max_batch=4) as eng:
            for q, src, j, gold in fact_q:
                w = answer(eng, r, q, k=a.answer_k, params=params, chat=False)
                wo = answer(eng, None, q, params=params, chat=False)
                acc["with_retrieval"] += gold.lower() in w["answer"].lower()
                acc["without_retrieval"] += gold.lower() in wo["answer"].lower()
                if len(examples) < 3:
                    examples.append({"q": q, "gold": gold, "with": w["answer"], "without": wo["answer"]})
            caps = [f for f in sheets]
            for f in caps:
                cloze = f"The capital of {f['country']} is"
                hits = r.search(cloze, a.answer_k)
                from lmforge.serve.rag.query import format_sources

                ctx = format_sources(hits) + "\n\n"
                for key, prompt in (("cloze_with", ctx + cloze), ("cloze_without", cloze)):
                    ids = eng.encode(prompt)[-(eng.context - 12) :]
                    out = eng.submit(ids, params).result().text
                    acc[key] += f["capital"].lower() in out.lower()
        n, nc = len(fact_q), len(caps)
        report["answers"] = {
            "model": a.model,
            "embedder": spec,
            "sources_in_prompt": a.answer_k,
            "qa_accuracy_with_retrieval": round(acc["with_retrieval"] / n, 3),
            "qa_accuracy_without_retrieval": round(acc["without_retrieval"] / n, 3),
            "cloze_capital_accuracy_with_retrieval": round(acc["cloze_with"] / nc, 3),
            "cloze_capital_accuracy_without_retrieval": round(acc["cloze_without"] / nc, 3),
            "n_questions": n,
            "n_cloze": nc,
            "examples": examples,
        }
        print(json.dumps(report["answers"], indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
