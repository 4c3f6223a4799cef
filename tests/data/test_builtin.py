"""The built-in corpus (harvest, dedup, split) and the readers (txt/jsonl/json/parquet, drops, errors)."""

from __future__ import annotations

import collections
import hashlib
import json
import re
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data.builtin import harvest_builtin_corpus, split_by_key, split_train_val
from lmforge.data.readers import Document, ReadStats, format_read_stats, iter_documents
from lmforge.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    return harvest_builtin_corpus()


# ----------------------------------------------------------------------------- built-in corpus
def test_builtin_corpus_size_and_sources(corpus):
    n_bytes = sum(len(d.text.encode("utf-8")) for d in corpus)
    kinds = collections.Counter(d.source.split(":")[0] for d in corpus)
    print(f"\nbuilt-in corpus: {len(corpus)} docs, {n_bytes / 1e6:.2f} MB, {dict(kinds)}")
    assert 1_000_000 < n_bytes < 50_000_000
    assert kinds["stdlib"] > 100 and kinds["pydoc"] > 20
    sources = {d.source for d in corpus}
    assert "stdlib:json/__init__.py" in sources
    assert "pydoc:topic:assert" in sources
    assert not any(re.search(r"(^|/)(tests?|idlelib|lib2to3|site-packages)/", s) for s in sources)
    assert all(len(d.text) >= 200 for d in corpus)
    assert len(harvest_builtin_corpus(min_chars=5000)) < len(corpus)


def test_builtin_corpus_is_english_prose(corpus):
    text = " ".join(d.text for d in corpus)
    words = re.findall(r"[a-z]+", text.lower())
    top = {w for w, _ in collections.Counter(words).most_common(20)}
    assert {"the", "of", "to", "a", "is"} <= top
    letters_or_space = sum(c.isalpha() or c.isspace() for c in text) / len(text)
    assert letters_or_space > 0.75


def test_builtin_corpus_deduplicated_and_sorted(corpus):
    keys = [hashlib.sha1(" ".join(d.text.split()).encode()).digest() for d in corpus]
    assert len(set(keys)) == len(keys)
    stdlib = [d.source for d in corpus if d.source.startswith("stdlib:")]
    assert stdlib == sorted(stdlib)
    # Many docstrings are repeated verbatim across files (_pyio copies io, ...): each survives once.
    import sysconfig

    from lmforge.data.builtin import _stdlib_docstrings

    where = collections.defaultdict(set)
    for rel, docstrings in _stdlib_docstrings(sysconfig.get_paths()["stdlib"]):
        for doc in docstrings:
            if len(doc) > 100:
                where[doc].add(rel)
    repeated = [doc for doc, files in where.items() if len(files) > 1]
    assert len(repeated) >= 10
    for doc in repeated:
        holders = [d.source for d in corpus if f"\n\n{doc}\n\n" in f"\n\n{d.text}\n\n"]
        assert len(holders) == 1, (doc[:80], holders)


def test_builtin_harvest_never_imports_modules(corpus):
    # Importing these has side effects (a browser tab, a Tk window, printed text).
    assert "antigravity" not in sys.modules and "turtle" not in sys.modules and "this" not in sys.modules
    assert any(d.source == "stdlib:turtle.py" for d in corpus)


def test_builtin_harvest_returns_fresh_objects(corpus):
    again = harvest_builtin_corpus()
    assert [d.text for d in again] == [d.text for d in corpus]
    again[0].meta["x"] = 1
    assert "x" not in harvest_builtin_corpus()[0].meta


def test_split_train_val_deterministic_and_stable(corpus):
    train, val = split_train_val(corpus, 0.1, seed=0)
    assert len(train) + len(val) == len(corpus) and val and train
    assert 0.03 < len(val) / len(corpus) < 0.2
    assert {d.source for d in train}.isdisjoint({d.source for d in val})
    train2, val2 = split_train_val(list(reversed(corpus)), 0.1, seed=0)
    assert {d.source for d in val2} == {d.source for d in val}  # per-document, order-independent
    _, val_other = split_train_val(corpus, 0.1, seed=1)
    assert {d.source for d in val_other} != {d.source for d in val}


def test_split_small_inputs_never_empty():
    for seed in range(20):
        train, val = split_train_val(["one document", "another document"], 0.01, seed=seed)
        assert len(train) == 1 and len(val) == 1
        train, val = split_train_val(["a", "b", "c"], 0.99, seed=seed)
        assert train and val
    assert split_train_val(["only"], 0.5, seed=0)[0] + split_train_val(["only"], 0.5, seed=0)[1] == ["only"]
    with pytest.raises(ConfigError, match="val_fraction"):
        split_train_val(["a", "b"], 0.0, seed=0)


def test_split_by_key_follows_the_keys():
    keys = [f"record {i}" for i in range(40)] + ["record 3"]  # a duplicate key
    items = [{"i": i} for i in range(len(keys))]
    train, val = split_by_key(items, keys, 0.25, seed=7)
    key_train, key_val = split_train_val(keys, 0.25, seed=7)
    assert [keys[x["i"]] for x in train] == key_train and [keys[x["i"]] for x in val] == key_val
    assert (items[3] in val) == (items[40] in val)  # equal keys land on the same side


# ----------------------------------------------------------------------------- readers
def test_txt_one_document_per_file_and_bad_bytes_counted(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xc3\xa9 ok \xff\xfe bad \xe2\x82 end")
    (tmp_path / "b.txt").write_text("second file", encoding="utf-8")
    (tmp_path / "blank.txt").write_text("  \n\t ", encoding="utf-8")
    stats = ReadStats()
    docs = list(iter_documents(tmp_path, stats=stats))
    assert [d.source for d in docs] == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    assert docs[0].text == "café ok \ufffd\ufffd bad \ufffd end"
    assert stats.replaced_bytes == 4
    assert stats.files == 3 and stats.records_read == 3 and stats.records_kept == 2
    assert stats.dropped == {"empty": 1}


def test_jsonl_bad_lines_are_counted_drops_with_location(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"text": "first good", "id": 1}),
        json.dumps({"text": "second good"}),
        '{"text": "broken',  # line 3: malformed
        json.dumps({"body": "wrong field"}),  # line 4
        json.dumps({"text": 42}),  # line 5
        "",  # blank: not a record
        json.dumps({"text": "   "}),  # line 7: empty
        json.dumps(["not", "an", "object"]),  # line 8
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    stats = ReadStats()
    docs = list(iter_documents(str(path), stats=stats))
    assert [d.text for d in docs] == ["first good", "second good"]
    assert docs[0].meta["id"] == 1 and docs[0].meta["location"] == f"{path}:1"
    assert stats.dropped == {
        "bad_json": 1,
        "missing_field": 1,
        "non_string_field": 1,
        "empty": 1,
        "not_object": 1,
    }
    assert stats.examples["bad_json"][0].startswith(f"{path}:3: malformed JSON")
    assert stats.examples["missing_field"][0].startswith(f"{path}:4:")
    assert stats.records_read == 7 and stats.records_kept == 2
    summary = format_read_stats(stats)
    assert "kept 2" in summary and "bad_json: 1" in summary and f"{path}:3" in summary


def test_jsonl_custom_field_and_invalid_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"content": "ok \xff"}\n{"content": "fine"}\n')
    stats = ReadStats()
    docs = list(iter_documents(path, text_field="content", stats=stats))
    assert [d.text for d in docs] == ["ok \ufffd", "fine"] and stats.replaced_bytes == 1


def test_json_array_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "one"}, {"text": None}, {"text": "two"}]), encoding="utf-8")
    stats = ReadStats()
    assert [d.text for d in iter_documents(path, stats=stats)] == ["one", "two"]
    assert stats.examples["missing_field"][0].startswith(f"{path}:item 1")


def test_parquet_streamed_by_row_group(tmp_path):
    path = tmp_path / "d.parquet"
    texts = [f"row number {i}" for i in range(25)] + [None, ""]
    pq.write_table(pa.table({"text": texts, "n": list(range(27))}), path, row_group_size=10)
    assert pq.ParquetFile(path).num_row_groups == 3
    stats = ReadStats()
    docs = list(iter_documents(path, stats=stats))
    assert [d.text for d in docs] == texts[:25]
    assert stats.dropped == {"missing_field": 1, "empty": 1} and stats.records_read == 27


def test_parquet_missing_column_names_file_and_columns(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["x"], "id": [1]}), path)
    with pytest.raises(DataError, match=r"d\.parquet: no column 'text'.*'content', 'id'"):
        list(iter_documents(path))


def test_folder_glob_and_list_specs(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "deeper" / "z.txt").write_text("z", encoding="utf-8")
    (tmp_path / "sub" / "a.jsonl").write_text('{"text": "a"}\n', encoding="utf-8")
    (tmp_path / "b.txt").write_text("b", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert [d.text for d in iter_documents(tmp_path)] == ["b", "a", "z"]  # sorted by path
    assert [d.text for d in iter_documents(str(tmp_path / "**" / "*.txt"))] == ["b", "z"]
    assert [d.text for d in iter_documents([tmp_path / "b.txt", tmp_path / "sub" / "a.jsonl"])] == ["b", "a"]


def test_missing_path_and_unsupported_spec_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"^{re.escape(str(missing))}: no such file or directory; "):
        iter_documents(missing)  # raised at call time, before iteration
    (tmp_path / "x.md").write_text("markdown", encoding="utf-8")
    with pytest.raises(DataError, match=r"matches no supported file.*\.txt, \.jsonl, \.json, \.parquet"):
        iter_documents(str(tmp_path / "*.md"))
    with pytest.raises(DataError, match="unsupported file type"):
        iter_documents(tmp_path / "x.md")


def test_builtin_spec_streams_the_corpus(corpus):
    stats = ReadStats()
    docs = list(iter_documents("builtin", stats=stats))
    assert [d.text for d in docs] == [d.text for d in corpus]
    assert stats.records_kept == len(corpus)


def test_hf_spec_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails as if absent
    with pytest.raises(DataError, match="needs the 'datasets' package"):
        list(iter_documents("hf:roneneldan/TinyStories:validation"))
