"""Fuzzing the data readers: JSONL (plain and gzip), JSON arrays, Parquet, HTML pages and WARC
archives, through the data stage's own entry point (`iter_task_documents`).

Properties: no exception except a documented `DataError`; every record read is either kept or
counted under a drop reason (read == kept + dropped); the kept texts are exactly the records'
non-blank string texts, in order."""

from __future__ import annotations

import gzip
import io
import json
import tempfile
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from lmforge.data.readers import ReadStats, iter_documents
from lmforge.data.sources import SourceStats, Task, iter_task_documents
from lmforge.data.steps.extract import HtmlExtract
from tests.fuzz_support import documented, fuzz

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6,
)
records = st.one_of(
    st.fixed_dictionaries({"text": st.text(max_size=40)}, optional={"id": json_values, "meta": json_values}),
    st.dictionaries(st.sampled_from(["text", "txt", "content", "id"]), json_values, max_size=3),
    json_values,
)
NASTY_LINES = [
    b"[" * 5000,
    b"1" * 5000,
    b'{"text": ' + b"9" * 5000 + b"}",
    b'{"text": "a"',
    b"\xff\xfe\x00",
    b'{"text": NaN}',
    b'{"text": "\\ud800"}',
    b"\r",
    b"  ",
    b'"just a string"',
    b'{"text": "\x00"}',
]
lines = st.one_of(
    records.map(lambda r: json.dumps(r).encode()),
    st.binary(max_size=30).filter(lambda b: b"\n" not in b),
    st.sampled_from(NASTY_LINES),
)


def _expected_jsonl(data: bytes) -> tuple[list[str], int]:
    """Oracle: (kept texts, records read) for JSON lines, written independently of the reader."""
    kept, read = [], 0
    for raw in data.split(b"\n"):
        line = raw.decode("utf-8", errors="replace")
        if not line.strip():
            continue
        read += 1
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("text"), str) and rec["text"].strip():
            kept.append(rec["text"])
    return kept, read


def _read_task(path: Path) -> tuple[list[str], SourceStats]:
    stats = SourceStats()
    docs = list(iter_task_documents(Task(0, "files", [str(path)]), "text", stats))
    return [d.text for d in docs], stats


def _balanced(stats: ReadStats, exclude: tuple[str, ...] = ()) -> bool:
    dropped = sum(v for k, v in stats.dropped.items() if k not in exclude)
    return stats.records_read == stats.records_kept + dropped


@fuzz(60)
@given(st.lists(lines, max_size=8))
@example([b"[" * 5000, b'{"text": "ok"}'])
@example([b"1" * 5000])
def test_jsonl(raw_lines):
    data = b"\n".join(raw_lines)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.jsonl"
        path.write_bytes(data)
        texts, stats = _read_task(path)
    want, read = _expected_jsonl(data)
    assert texts == want
    assert stats.records_read == read and _balanced(stats)


@fuzz(30)
@given(st.lists(lines, max_size=6), st.integers(0, 200), st.booleans())
def test_jsonl_gz_truncated(raw_lines, cut, truncate):
    data = b"\n".join(raw_lines)
    blob = gzip.compress(data)
    if truncate:
        blob = blob[: max(0, len(blob) - cut)]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.jsonl.gz"
        path.write_bytes(blob)
        texts, stats = _read_task(path)
    assert _balanced(stats, exclude=("truncated_compressed",))
    if not truncate:
        want, _ = _expected_jsonl(data)
        assert texts == want


@fuzz(30)
@given(
    st.one_of(
        st.lists(records, max_size=5).map(lambda r: json.dumps(r).encode()),
        st.binary(max_size=40).map(lambda b: b"[" + b),
        st.just(b"[" * 5000),
        st.just(b"[" + b"1" * 5000 + b"]"),
    )
)
def test_json_array(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.json"
        path.write_bytes(data)
        stats = ReadStats()
        docs, err = documented(lambda: list(iter_documents(path, stats=stats)))
    if err is None:
        items = json.loads(data)
        want = [
            r["text"]
            for r in items
            if isinstance(r, dict) and isinstance(r.get("text"), str) and r["text"].strip()
        ]
        assert [x.text for x in docs] == want and _balanced(stats)
    else:
        assert str(path) in str(err)


@fuzz(25)
@given(
    st.one_of(
        st.lists(st.one_of(st.none(), st.text(max_size=20)), max_size=6),
        st.lists(st.integers(-5, 5), max_size=4),
        st.lists(st.binary(max_size=6), max_size=4),
    ),
    st.sampled_from(["text", "body"]),
    st.integers(0, 64),
    st.booleans(),
)
def test_parquet(values, column, cut, truncate):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.parquet"
        buf = io.BytesIO()
        pq.write_table(pa.table({column: pa.array(values, type=None if values else pa.string())}), buf)
        blob = buf.getvalue()
        path.write_bytes(blob[: len(blob) - cut] if truncate else blob)
        stats = ReadStats()
        docs, err = documented(lambda: list(iter_documents(path, stats=stats)))
    if err is not None:
        assert str(path) in str(err)
        return
    assert _balanced(stats)
    if not truncate and column == "text":
        assert [x.text for x in docs] == [v for v in values if isinstance(v, str) and v.strip()]


html_fragments = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "<html>",
                "<body>",
                "<p>",
                "</p>",
                "<div class='main'>",
                "</div>",
                "<script>",
                "</script>",
                "<!--",
                "-->",
                "<![CDATA[",
                "<table><tr><td>",
                "&amp;",
                "&#0;",
                "&#xD800;",
                "<meta charset='utf-16'>",
                "<?xml version='1.0'?>",
                "<article>",
                "</article>",
                "<title>t</title>",
                "\x00",
                "\ufeff",
            ]
        ),
        st.text(max_size=30),
    ),
    max_size=25,
).map("".join)


@fuzz(30)
@given(
    st.one_of(html_fragments.map(lambda s: s.encode("utf-8", "surrogatepass")), st.binary(max_size=200)),
    st.booleans(),
)
def test_html_then_extract(page, gz):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("p.html.gz" if gz else "p.html")
        path.write_bytes(gzip.compress(page) if gz else page)
        stats = SourceStats()
        docs = list(iter_task_documents(Task(0, "files", [str(path)]), "text", stats))
    assert _balanced(stats) and stats.records_read == 1
    step = HtmlExtract(timeout_s=5)
    for doc in docs:
        reason = step.apply(doc)
        assert reason is None or isinstance(reason, str)
        if reason is None:
            assert doc.text.strip()


warc_records = st.lists(
    st.tuples(
        st.sampled_from(["response", "conversion", "resource", "request", "metadata"]),
        st.sampled_from(["200 OK", "404 Not Found", "301 Moved", "500 Oops"]),
        st.sampled_from(["text/html", "text/html; charset=utf-8", "application/pdf", "", "image/png"]),
        st.one_of(html_fragments.map(lambda s: s.encode("utf-8", "surrogatepass")), st.binary(max_size=60)),
    ),
    max_size=4,
)


def _warc(recs, gz: bool) -> bytes:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    out = io.BytesIO()
    w = WARCWriter(out, gzip=gz)
    for i, (rtype, status, ctype, payload) in enumerate(recs):
        http = None
        if rtype == "response":
            http = StatusAndHeaders(status, [("Content-Type", ctype)] if ctype else [], protocol="HTTP/1.1")
        elif rtype == "request":
            http = StatusAndHeaders("GET / HTTP/1.1", [("Host", "example.com")], is_http_request=True)
        rec = w.create_warc_record(
            f"http://example.com/{i}",
            rtype,
            payload=io.BytesIO(payload),
            http_headers=http,
            warc_content_type=ctype or None,
        )
        w.write_record(rec)
    return out.getvalue()


@fuzz(30)
@given(warc_records, st.booleans(), st.integers(0, 300), st.sampled_from(["none", "truncate", "garbage"]))
def test_warc(recs, gz, cut, damage):
    blob = _warc(recs, gz)
    if damage == "truncate":
        blob = blob[: max(0, len(blob) - cut)]
    elif damage == "garbage":
        blob = blob[:cut] + b"\x00garbage\xff" + blob[cut:]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("x.warc.gz" if gz else "x.warc")
        path.write_bytes(blob)
        texts, stats = _read_task(path)
    assert len(texts) <= len(recs)
    corrupt = stats.dropped.get("corrupt_warc", 0)
    assert corrupt <= 1
    # a record that breaks mid-way is counted as read and as corrupt; otherwise read == kept + dropped
    assert (
        stats.records_read + corrupt >= stats.records_kept + sum(stats.dropped.values()) >= stats.records_read
    )
    if damage == "none":
        assert not corrupt and _balanced(stats)
        readable = [r for r in recs if r[0] in ("response", "conversion", "resource")]
        assert stats.records_read == len(readable)
