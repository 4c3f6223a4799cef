"""End-to-end tests of `run_data_stage`: builtin corpus, web pages + WARC, bad input, resume, workers."""

from __future__ import annotations

import json
import random
import shutil
import sys
import unicodedata
from pathlib import Path

import pytest

from lmforge.data import stage as stage_mod
from lmforge.data.builtin import harvest_builtin_corpus
from lmforge.data.config import DataConfig
from lmforge.data.output import iter_records
from lmforge.data.stage import iter_output_texts, run_data_stage, unit_hash
from lmforge.errors import DataError
from tests.conftest import SHARED_DATA

SHARED = SHARED_DATA / "html"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared HTML/WARC test data not present")


def quiet(_msg: str) -> None:
    pass


def texts(out: Path, split: str) -> list[str]:
    return list(iter_output_texts(out, split))


def outputs(out: Path) -> tuple[list[str], list[str]]:
    return texts(out, "train"), texts(out, "val")


def make_corpus(folder: Path, n_files: int = 6, per_file: int = 8, start: int = 100) -> list[str]:
    """JSONL files of real prose (builtin docs), plus one exact and one near duplicate."""
    docs = [d.text for d in harvest_builtin_corpus()][start : start + n_files * per_file]
    rng = random.Random(0)
    words = docs[3].split()
    for _ in range(max(1, len(words) // 100)):  # ~1% of the words changed: a near duplicate
        words[rng.randrange(len(words))] = "changed"
    docs[-1] = " ".join(words)
    docs[-2] = (
        "  " + docs[5].replace(". ", " . ").replace(",", " ,") + "\n"
    )  # exact duplicate once normalised
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        chunk = docs[f * per_file : (f + 1) * per_file]
        (folder / f"part-{f:02d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in chunk))
    return docs


# ----------------------------------------------------------------------------- builtin, default config
@pytest.fixture(scope="module")
def builtin_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin") / "data"
    metrics = run_data_stage(DataConfig(), out, seed=0, log=quiet)
    return out, metrics


def test_builtin_default_pipeline_keeps_most(builtin_run):
    out, m = builtin_run
    assert m["docs_in"] > 300
    assert m["docs_out"] / m["docs_in"] > 0.7 and m["bytes_out"] / m["bytes_in"] > 0.7
    assert m["train_docs"] + m["val_docs"] == m["docs_out"] and m["val_docs"] >= 1
    for name in (
        "funnel.json",
        "report.md",
        "report.html",
        "dedup_clusters.jsonl",
        "dropped_examples.jsonl",
        "done.json",
        "train/shard-00000.jsonl",
        "val/shard-00000.jsonl",
    ):
        assert (out / name).is_file(), name
    assert not (out / "work" / "tasks").exists()  # intermediate files cleaned up


def test_builtin_funnel_is_consistent(builtin_run):
    out, m = builtin_run
    funnel = json.loads((out / "funnel.json").read_text())
    steps = funnel["steps"]
    names = [s["name"] for s in steps]
    assert names[0] == "read" and names[-1] == "mixing"
    assert names.index("gopher_quality") < names.index("exact_dedup") < names.index("near_dedup")
    for a, b in zip(steps, steps[1:]):  # each step starts with what the previous one kept
        assert a["docs_out"] == b["docs_in"], (a["name"], b["name"])
    for s in steps:
        assert s["docs_in"] - s["docs_out"] == sum(v["docs"] for v in s["dropped"].values()), s["name"]
    assert (
        m["dropped_gopher_quality"]
        == steps[names.index("gopher_quality")]["docs_in"] - steps[names.index("gopher_quality")]["docs_out"]
    )
    assert funnel["classifier"]["trained"] and "quality_score" in funnel["histograms"]
    assert sum(funnel["histograms"]["lang_score"]) == m["docs_in"]
    report = (out / "report.md").read_text()
    assert "## Funnel" in report and "gopher_quality" in report and "Examples of dropped text" in report
    assert "<svg" in (out / "report.html").read_text()
    dropped = [json.loads(line) for line in (out / "dropped_examples.jsonl").read_text().splitlines()]
    assert any(d["step"] == "gopher_quality" for d in dropped)


def test_builtin_outputs_split_and_metadata(builtin_run):
    out, m = builtin_run
    train, val = outputs(out)
    assert len(train) == m["train_docs"] and len(val) == m["val_docs"]
    assert not set(train) & set(val)
    assert all(unit_hash(0, t) < 0.05 for t in val) or len(val) == 1
    rec = next(iter_records(out / "train"))
    assert rec["meta"]["lang"] == "en" and 0 <= rec["meta"]["quality_score"] <= 1 and rec["meta"]["domain"]
    assert texts(out, "train") == train  # deterministic order


def test_builtin_rerun_is_a_no_op(builtin_run):
    out, m = builtin_run
    logs: list[str] = []
    again = run_data_stage(DataConfig(), out, seed=0, log=logs.append)
    assert again == m and "already complete" in logs[0]


# ----------------------------------------------------------------------------- real web pages + WARC/WET
@needs_shared
def test_web_pages_and_warc(tmp_path):
    pages = tmp_path / "in" / "pages"
    pages.mkdir(parents=True)
    anns = [json.loads(line) for line in (SHARED / "annotations.jsonl").read_text().splitlines()]
    english = [a for a in anns if a["url"].startswith("http") and ".com" in a["url"]][:10]
    for a in english:
        shutil.copy(SHARED / "pages" / a["file"], pages / a["file"])
    shutil.copytree(SHARED / "warc", tmp_path / "in" / "warc")
    cfg = DataConfig(
        inputs=[str(tmp_path / "in")],
        language={"languages": []},
        gopher_quality={"enabled": False},
        quality_classifier={"enabled": False},
    )
    out = tmp_path / "out"
    m = run_data_stage(cfg, out, seed=1, log=quiet)
    assert m["docs_in"] == len(english) + 2
    records = list(iter_records(out / "train")) + list(iter_records(out / "val"))
    assert records and all(r["meta"]["format"] == "text" for r in records)
    warc = [r for r in records if "Escopete" in (r["meta"].get("url") or "")]
    assert warc and all(r["meta"]["lang"] for r in warc)
    by_file = {a["file"]: a for a in english}
    found = 0
    for r in records:
        a = by_file.get(Path(r["source"]).name)
        if a:
            assert r["meta"].get("title") or r["meta"].get("url")
            found += any(s in r["text"] for s in a.get("with", []))
    assert found >= 1
    funnel = json.loads((out / "funnel.json").read_text())
    read = funnel["steps"][0]
    assert read["counters"]["warc_request_records_skipped"] == 1


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_counted_never_fatal(tmp_path):
    src = tmp_path / "in"
    make_corpus(src, n_files=1, per_file=6)
    (src / "binary.txt").write_bytes(bytes(range(256)) * 40)
    (src / "bad_utf8.jsonl").write_bytes(b'{"text": "caf\xe9 ' + b"word " * 60 + b'"}\n{"text": ""}\n{oops\n')
    whole = (src / "part-00.jsonl").read_bytes()
    import gzip

    (src / "trunc.jsonl.gz").write_bytes(gzip.compress(whole)[:200])
    (src / "giant.jsonl").write_text(json.dumps({"text": "x" * 150_000}) + "\n")
    (src / "broken.html").write_text("<html><body><div><p>unclosed <b><i>")
    (src / "empty.html").write_text("")
    (src / "script.html").write_text(
        "<html><head><style>p{}</style></head><body><script>var x;</script></body></html>"
    )
    (src / "cut.warc").write_bytes(
        b"WARC/1.0\r\nWARC-Type: response\r\nContent-Length: 5000\r\n\r\nHTTP/1.1 200"
    )
    m = run_data_stage(DataConfig(inputs=[str(src)]), tmp_path / "out", seed=0, log=quiet)
    funnel = json.loads((tmp_path / "out" / "funnel.json").read_text())
    by = {s["name"]: s for s in funnel["steps"]}
    read_reasons = set(by["read"]["dropped"])
    assert {"empty", "bad_json", "truncated_compressed"} <= read_reasons
    assert read_reasons & {"truncated_record", "corrupt_warc"}
    assert by["read"]["counters"]["replaced_bytes"] >= 1
    assert "gigantic_line" in by["sanity"]["dropped"] or "too_long" in by["sanity"]["dropped"]
    assert "garbled" in by["sanity"]["dropped"]
    assert by["extract"]["dropped"]["no_main_text"]["docs"] >= 1  # the script-only page
    assert m["docs_out"] >= 4
    total = sum(s["docs_in"] - s["docs_out"] for s in funnel["steps"][1:]) + m["docs_out"]
    assert total == by["read"]["docs_out"]  # nothing vanished without a reason


def test_nothing_survives_is_a_clear_error(tmp_path):
    (tmp_path / "a.txt").write_text("tiny")
    with pytest.raises(DataError, match="no documents survived"):
        run_data_stage(DataConfig(inputs=[str(tmp_path / "a.txt")]), tmp_path / "out", seed=0, log=quiet)
    assert (tmp_path / "out" / "report.md").is_file()


# ----------------------------------------------------------------------------- resume, workers, formats
def small_cfg(src: Path, **kw) -> DataConfig:
    return DataConfig(inputs=[str(src)], task_bytes=20_000, shard_docs=10, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    src = tmp_path_factory.mktemp("corpus") / "in"
    make_corpus(src)
    ref = tmp_path_factory.mktemp("ref") / "clean"
    run_data_stage(small_cfg(src), ref, seed=3, log=quiet)
    return src, ref


def test_dedup_clusters_written(corpus):
    src, ref = corpus
    funnel = json.loads((ref / "funnel.json").read_text())
    assert funnel["dedup"]["exact_clusters"] == 1 and funnel["dedup"]["near_clusters"] >= 1
    clusters = [json.loads(line) for line in (ref / "dedup_clusters.jsonl").read_text().splitlines()]
    kinds = {c["kind"] for c in clusters}
    assert kinds == {"exact", "near"}
    near = next(c for c in clusters if c["kind"] == "near")
    assert near["members"][0]["kept"] and near["members"][1]["jaccard_estimate"] > 0.5
    assert len(list(iter_records(ref / "train"))) > 10 and len(list((ref / "train").iterdir())) >= 2


def test_resume_after_a_killed_task(corpus, tmp_path, monkeypatch):
    src, ref = corpus
    calls = {"n": 0}
    real = stage_mod.run_task

    def dying(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args)

    monkeypatch.setattr(stage_mod, "run_task", dying)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_data_stage(small_cfg(src), out, seed=3, log=quiet)
    done = sorted(p.name for p in (out / "work" / "tasks").glob("*.stats.json"))
    assert len(done) == 2 and not (out / "done.json").exists()
    monkeypatch.setattr(stage_mod, "run_task", real)
    logs: list[str] = []
    run_data_stage(small_cfg(src), out, seed=3, log=logs.append)
    assert any("2 already done" in line for line in logs)
    assert outputs(out) == outputs(ref)
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(
        p.name for p in (ref / "train").iterdir()
    )


def test_resume_after_a_crash_while_writing(corpus, tmp_path, monkeypatch):
    src, ref = corpus
    import lmforge.data.report as report

    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "shard-00042.jsonl").write_text('{"text": "stale"}\n')  # left by an older run
    monkeypatch.setattr(report, "render_html", lambda funnel: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        run_data_stage(small_cfg(src, keep_work=True), out, seed=3, log=quiet)
    monkeypatch.undo()
    run_data_stage(small_cfg(src, keep_work=True), out, seed=3, log=quiet)
    assert outputs(out) == outputs(ref)
    assert not (out / "train" / "shard-00042.jsonl").exists()


def test_two_workers_give_the_same_output(corpus, tmp_path):
    src, ref = corpus
    out = tmp_path / "out"
    m = run_data_stage(small_cfg(src, workers=2), out, seed=3, log=quiet)
    assert m["tasks"] >= 4
    assert outputs(out) == outputs(ref)


def test_ray_executor_gives_the_same_output(corpus, tmp_path):
    """Ray on this one machine (a local cluster started by the stage): same shards as in-process."""
    ray = pytest.importorskip("ray")
    src, ref = corpus
    out = tmp_path / "out"
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        m = run_data_stage(small_cfg(src, executor="ray", workers=2), out, seed=3, log=quiet)
    finally:
        ray.shutdown()
    assert m["tasks"] >= 4
    assert outputs(out) == outputs(ref)


def test_config_change_starts_over(corpus, tmp_path):
    src, ref = corpus
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    logs: list[str] = []
    m = run_data_stage(small_cfg(src, val_fraction=0.5), out, seed=3, log=logs.append)
    assert not any("already complete" in line for line in logs)
    assert m["val_docs"] > len(texts(ref, "val"))


def test_parquet_mixing_decontam_and_reference_classifier(corpus, tmp_path):
    src, _ = corpus
    docs = [json.loads(line)["text"] for line in (src / "part-01.jsonl").read_text().splitlines()]
    leaked = docs[2]
    ev = tmp_path / "eval.jsonl"
    ev.write_text(json.dumps({"question": " ".join(leaked.split()[10:40])}) + "\n")
    ref = tmp_path / "reference.jsonl"
    ref.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in harvest_builtin_corpus()[:40]))
    neg = tmp_path / "neg.jsonl"
    rng = random.Random(0)
    neg.write_text(
        "".join(
            json.dumps(
                {"text": " ".join(rng.choice(["buy", "now", "cheap", "deal", "click"]) for _ in range(80))}
            )
            + "\n"
            for _ in range(40)
        )
    )
    cfg = small_cfg(
        src,
        output_format="parquet",
        decontam={"eval_sets": [str(ev)]},
        domain={"weights": {"code": 1.0, "prose": 1.0, "legal": 2.0}},
        quality_classifier={"reference": [str(ref)], "negatives": [str(neg)], "mode": "weight"},
    )
    out = tmp_path / "out"
    m = run_data_stage(cfg, out, seed=3, log=quiet)
    assert m["dropped_decontam"] == 1
    all_texts = texts(out, "train") + texts(out, "val")
    assert leaked not in all_texts
    assert all(p.suffix == ".parquet" for p in (out / "train").iterdir())
    funnel = json.loads((out / "funnel.json").read_text())
    after = funnel["domain_mix"]["after"]
    assert set(after) == {"code", "prose"} and funnel["domain_mix"]["missing"] == ["legal"]
    assert abs(after["code"]["token_share"] - 0.5) < 0.2
    assert funnel["classifier"]["trained"] and funnel["classifier"]["negatives"].startswith("negatives")
    rec = next(iter_records(out / "train"))
    assert 0 <= rec["meta"]["weight"] <= 1
    assert (out / "quality_classifier.npz").is_file()
    # the dropped document names the eval item it matched, in the side file and the report
    dropped = [json.loads(x) for x in (out / "dropped_examples.jsonl").read_text().splitlines()]
    assert [d["matched"] for d in dropped if d["step"] == "decontam"] == ["eval.jsonl:1"]
    assert "matched eval item `eval.jsonl:1`" in (out / "report.md").read_text()
    rows = {st["name"]: st for st in funnel["steps"]}
    assert rows["quality_classifier"]["seconds"] > 0 and rows["mixing"]["seconds"] > 0


def test_iter_output_texts_errors(tmp_path):
    with pytest.raises(DataError):
        list(iter_output_texts(tmp_path, "train"))
    with pytest.raises(ValueError):
        list(iter_output_texts(tmp_path, "test"))


def test_batch_cluster_recipe_plan_tasks_then_finalise(corpus, tmp_path):
    from lmforge.data.stage import prepare_stage, run_planned_task

    src, ref = corpus
    out = tmp_path / "out"
    plan, done = prepare_stage(small_cfg(src), out, seed=3, log=quiet)
    assert done is None and len(plan["tasks"]) >= 4
    for i in reversed(range(len(plan["tasks"]))):  # any order, any machine sharing `out`
        run_planned_task(out, i)
    assert run_planned_task(out, 0)["skipped"]
    logs: list[str] = []
    run_data_stage(small_cfg(src), out, seed=3, log=logs.append)
    assert any(f"{len(plan['tasks'])} already done" in line for line in logs)
    assert outputs(out) == outputs(ref)
    with pytest.raises(DataError, match="out of range"):
        run_planned_task(out, 999)


def test_ray_executor_without_ray_is_a_config_error(corpus, tmp_path, monkeypatch):
    from lmforge.errors import ConfigError

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if absent
    src, _ = corpus
    with pytest.raises(ConfigError, match="pip install"):
        run_data_stage(small_cfg(src, executor="ray"), tmp_path / "out", seed=3, log=quiet)


def test_max_docs_keeps_the_first_documents(corpus, tmp_path):
    src, ref = corpus
    m = run_data_stage(small_cfg(src, max_docs=7), tmp_path / "out", seed=3, log=quiet)
    assert m["docs_out"] == m["docs"] == 7
    train, val = outputs(tmp_path / "out")
    ref_all = set(texts(ref, "train") + texts(ref, "val"))
    assert set(train + val) <= ref_all
    funnel = json.loads((tmp_path / "out" / "funnel.json").read_text())
    assert funnel["steps"][-1]["name"] == "max_docs" and funnel["steps"][-1]["docs_out"] == 7


def test_one_big_file_runs_as_several_tasks_with_the_same_output(tmp_path):
    docs = [d.text for d in harvest_builtin_corpus()][100:160]
    docs[0] = "Cafe\u0301 nai\u0308ve " + docs[0]  # decomposed accents: must come out NFC
    big = tmp_path / "in" / "big.jsonl"
    big.parent.mkdir()
    big.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    cfg = dict(inputs=[str(big)], shard_docs=10, task_bytes=1 << 20)
    logs: list[str] = []
    one = run_data_stage(DataConfig(**cfg), tmp_path / "one", seed=0, log=quiet)
    two = run_data_stage(DataConfig(workers=2, **cfg), tmp_path / "two", seed=0, log=logs.append)
    assert one["tasks"] == 2 and two["tasks"] == 4  # ~2 tasks per worker, cut at line starts
    assert any("1 large file(s) cut into" in line for line in logs)
    assert outputs(tmp_path / "one") == outputs(tmp_path / "two")
    out = [t for split in outputs(tmp_path / "two") for t in split]
    assert any(t.startswith("Caf\u00e9 na\u00efve") for t in out)
    assert all(unicodedata.is_normalized("NFC", t) for t in out)


def test_blas_pinned_in_tasks_and_global_steps_timed(corpus, tmp_path, monkeypatch):
    from threadpoolctl import threadpool_info

    from lmforge.data.steps.classifier import QualityScorer

    seen: list[int] = []
    real_score = QualityScorer.score

    def spy(self, texts, max_chars=20_000):
        seen.extend(lib["num_threads"] for lib in threadpool_info())
        return real_score(self, texts, max_chars)

    monkeypatch.setattr(QualityScorer, "score", spy)
    real_task = stage_mod._run_claimed_task

    def spy_task(*args):
        seen.extend(lib["num_threads"] for lib in threadpool_info())
        return real_task(*args)

    monkeypatch.setattr(stage_mod, "_run_claimed_task", spy_task)
    src, ref = corpus
    run_data_stage(small_cfg(src), tmp_path / "out", seed=3, log=quiet, threads=2)
    assert seen and set(seen) == {1}
    funnel = json.loads((tmp_path / "out" / "funnel.json").read_text())
    rows = {st["name"]: st for st in funnel["steps"]}
    for name in ("exact_dedup", "near_dedup", "mixing") + (
        ("quality_classifier",) if "quality_classifier" in rows else ()
    ):
        assert rows[name]["seconds"] > 0, name
    assert outputs(tmp_path / "out") == outputs(ref)
