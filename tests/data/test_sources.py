"""Readers of the data stage: HTML folders, WARC/WET, compressed JSONL, bad input, task planning."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest
import zstandard

from lmforge.data.sources import SourceStats, Task, file_kind, iter_task_documents, plan_tasks
from lmforge.errors import DataError
from tests.conftest import SHARED_DATA

SHARED = SHARED_DATA / "html"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared HTML/WARC test data not present")


def read_all(paths, text_field="text"):
    stats = SourceStats()
    task = Task(0, "files", [str(p) for p in paths])
    return list(iter_task_documents(task, text_field, stats)), stats


def test_file_kinds():
    assert file_kind("a/b.warc.gz") == "warc" and file_kind("x.warc.wet.gz") == "warc"
    assert file_kind("p.html") == "html" and file_kind("d.jsonl.zst") == "compressed"
    assert (
        file_kind("d.jsonl") == "native" and file_kind("d.parquet") == "native" and file_kind("x.pdf") is None
    )


@needs_shared
def test_warc_and_wet_records():
    docs, stats = read_all(sorted((SHARED / "warc").iterdir()))
    kinds = sorted(d.meta["format"] for d in docs)
    assert kinds == ["html", "text"]  # the WARC response and the WET conversion; WAT has no documents
    assert all(d.meta["url"] == "https://an.wikipedia.org/wiki/Escopete" for d in docs)
    assert stats.info["warc_request_records_skipped"] == 1 and stats.files == 3
    assert not stats.dropped


@needs_shared
def test_truncated_warc_is_counted(tmp_path):
    data = (SHARED / "warc" / "whirlwind.warc.gz").read_bytes()
    (tmp_path / "cut.warc.gz").write_bytes(data[: len(data) // 2])
    raw = gzip.decompress(data)
    (tmp_path / "cut.warc").write_bytes(raw[: len(raw) * 2 // 3])
    (tmp_path / "junk.warc.gz").write_bytes(b"\x1f\x8b\x08garbage" * 10)
    docs, stats = read_all(sorted(tmp_path.iterdir()))
    assert docs == []
    assert stats.dropped == {"truncated_record": 2, "corrupt_warc": 1}
    assert "junk.warc.gz" in stats.examples["corrupt_warc"][0]


def test_html_folder_and_bad_files(tmp_path):
    (tmp_path / "good.html").write_text(
        "<html><head><title>T</title></head><body><p>Hello there.</p></body></html>"
    )
    (tmp_path / "empty.html").write_bytes(b"")
    (tmp_path / "bin.html").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00" + bytes(range(256)))
    (tmp_path / "latin1.html").write_bytes(
        "<html><body><p>Caf\xe9 cr\xe8me br\xfbl\xe9e</p></body></html>".encode("latin-1")
    )
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    tasks, skipped = plan_tasks([str(tmp_path)])
    assert skipped == [str(tmp_path / "notes.pdf")]
    stats = SourceStats()
    docs = [d for t in tasks for d in iter_task_documents(t, "text", stats)]
    assert sorted(Path(d.source).name for d in docs) == ["good.html", "latin1.html"]
    assert all(d.meta["format"] == "html" for d in docs)
    assert "Café crème" in next(d.text for d in docs if "latin1" in d.source)
    assert stats.dropped == {"empty": 1, "binary": 1}


def test_compressed_jsonl_and_truncation(tmp_path):
    lines = [json.dumps({"text": f"document number {i}", "n": i}) for i in range(5)]
    body = (
        "\n".join(lines[:3])
        + "\n{not json}\n"
        + json.dumps({"body": "no text"})
        + "\n"
        + json.dumps({"text": ""})
        + "\n"
    ).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(body))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body))
    whole = gzip.compress(("\n".join(lines) + "\n").encode() * 200)
    (tmp_path / "c.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "d.txt.gz").write_bytes(gzip.compress(b"plain \xff\xfe text"))
    docs, stats = read_all(sorted(tmp_path.iterdir()))
    a = [d for d in docs if d.source.endswith("a.jsonl.gz")]
    assert [d.text for d in a] == ["document number 0", "document number 1", "document number 2"]
    assert a[0].meta["n"] == 0 and a[0].meta["id"].endswith("a.jsonl.gz:1")
    assert len([d for d in docs if d.source.endswith("b.jsonl.zst")]) == 3
    assert any(d.source.endswith("c.jsonl.gz") for d in docs)  # what was readable before the cut is kept
    assert (
        stats.dropped["bad_json"] == 2 and stats.dropped["missing_field"] == 2 and stats.dropped["empty"] == 2
    )
    assert stats.dropped["truncated_compressed"] == 1
    assert stats.replaced_bytes == 2


def test_native_formats_delegate_to_readers(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"content": "hello"}\n{"content": 3}\n')
    (tmp_path / "y.txt").write_text("a plain text file")
    docs, stats = read_all([tmp_path / "x.jsonl", tmp_path / "y.txt"], text_field="content")
    assert [d.text for d in docs] == ["hello", "a plain text file"]
    assert stats.dropped == {"non_string_field": 1}
    assert all(d.meta["id"] for d in docs)


def test_plan_groups_files_in_order(tmp_path):
    for i in range(10):
        (tmp_path / f"f{i}.txt").write_text("x" * 1000)
    tasks, _ = plan_tasks([str(tmp_path)], workers=2, task_bytes=1 << 20)
    files = [f for t in tasks for f in t.items]
    assert files == sorted(files) and len(files) == 10
    assert 4 <= len(tasks) <= 5  # ~2 tasks per worker
    one, _ = plan_tasks([str(tmp_path)], workers=1, task_bytes=3000)
    assert all(t.bytes <= 3000 for t in one)
    b, _ = plan_tasks(["builtin"], workers=3)
    assert [(t.kind, t.part, t.parts) for t in b] == [("builtin", 0, 3), ("builtin", 1, 3), ("builtin", 2, 3)]
    with pytest.raises(DataError, match="no such file"):
        plan_tasks([str(tmp_path / "missing")])
    with pytest.raises(DataError, match="unsupported"):
        (tmp_path / "z.pdf").write_bytes(b"%PDF")
        plan_tasks([str(tmp_path / "z.pdf")])


def test_builtin_slices_cover_the_corpus_once():
    from lmforge.data.builtin import harvest_builtin_corpus

    n = len(harvest_builtin_corpus())
    seen = []
    for part in range(3):
        seen += [
            d.source
            for d in iter_task_documents(Task(part, "builtin", ["builtin"], part, 3), "text", SourceStats())
        ]
    assert len(seen) == n == len(set(seen))


def _arc(records: list[tuple[str, bytes]]) -> bytes:
    """An ARC v1 file (the Internet Archive's pre-WARC format), written by hand."""
    body = b"1 0 lmforge\nURL IP-address Archive-date Content-type Archive-length\n"
    out = b"filedesc://test.arc 0.0.0.0 20240101000000 text/plain %d\n" % len(body) + body + b"\n"
    for url, html in records:
        payload = b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n" + html
        out += b"%s 1.2.3.4 20240101000000 text/html %d\n" % (url.encode(), len(payload)) + payload + b"\n"
    return out


PAGE = b"<html><body><article><p>%s</p></article></body></html>"


def test_uncompressed_arc_is_read(tmp_path):
    (tmp_path / "old.arc").write_bytes(_arc([("http://a.example/x", PAGE % b"Hello from an ARC file")]))
    assert file_kind(tmp_path / "old.arc") == "warc"
    docs, stats = read_all([tmp_path / "old.arc"])
    assert [d.meta["url"] for d in docs] == ["http://a.example/x"] and b"Hello" in docs[0].text.encode()
    assert stats.records_read == 1 and stats.records_kept == 1 and not stats.dropped


def _balanced(stats: SourceStats) -> bool:
    return stats.records_read == stats.records_kept + sum(stats.dropped.values())


def _warc(n: int, gz: bool) -> bytes:
    """A WARC of `n` HTML responses written by warcio (per-record gzip members when `gz`)."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=gz)
    for i in range(n):
        headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.0")
        body = PAGE % (b"page %d " % i + b"text " * 50)
        writer.write_record(
            writer.create_warc_record(
                f"http://w.example/{i}", "response", payload=io.BytesIO(body), http_headers=headers
            )
        )
    return buf.getvalue()


def test_corrupt_warc_funnel_balances(tmp_path):
    gz, raw = _warc(4, gz=True), _warc(4, gz=False)
    for name, blob in (
        ("cut.warc.gz", gz[: len(gz) * 5 // 8]),
        ("cut.warc", raw[: len(raw) * 5 // 8]),
        ("junk.warc.gz", b"\x1f\x8b\x08garbage" * 10),
        ("tail.warc", raw + b"garbage that is not a record\r\n" * 3),
        ("tail.warc.gz", gz + b"\x1f\x8b\x08garbage"),
    ):
        (tmp_path / name).write_bytes(blob)
        docs, stats = read_all([tmp_path / name])
        assert stats.dropped and _balanced(stats), (name, stats)
        assert stats.records_kept == len(docs) <= 4


def test_large_jsonl_split_into_line_aligned_ranges(tmp_path):
    lines = [json.dumps({"text": f"document {i} " + "word " * (i % 17)}) for i in range(3000)]
    lines[5] = ""  # blank lines keep their line numbers
    lines[7] = "{broken"
    f = tmp_path / "big.jsonl"
    f.write_text("\n".join(lines) + "\n")
    whole, whole_stats = read_all([f])
    tasks, _ = plan_tasks([str(f)], workers=4, task_bytes=1 << 20)
    assert len(tasks) >= 4 and all(t.kind == "range" for t in tasks)
    assert tasks[0].span[0] == 0 and tasks[-1].span[1] == f.stat().st_size
    assert all(a.span[1] == b.span[0] for a, b in zip(tasks, tasks[1:]))
    docs, stats = [], SourceStats()
    for t in tasks:
        docs += list(iter_task_documents(t, "text", stats))
    assert [(d.text, d.meta["id"]) for d in docs] == [(d.text, d.meta["id"]) for d in whole]
    assert stats.dropped == whole_stats.dropped == {"bad_json": 1} and stats.files == 1


def test_large_warc_split_at_record_starts(tmp_path):
    pages = [(f"http://s.example/{i}", PAGE % (b"page %d " % i + b"text " * 40)) for i in range(60)]
    f = tmp_path / "big.arc"
    f.write_bytes(_arc(pages))
    whole, _ = read_all([f])
    tasks, _ = plan_tasks([str(f)], workers=3, task_bytes=1 << 20)
    assert len(tasks) >= 3 and all(t.kind == "range" for t in tasks)
    docs, stats = [], SourceStats()
    for t in tasks:
        docs += list(iter_task_documents(t, "text", stats))
    assert [d.meta["id"] for d in docs] == [d.meta["id"] for d in whole] and len(docs) == 60
    assert [d.meta["url"] for d in docs] == [u for u, _ in pages] and _balanced(stats)
