"""Subcommands `lmforge chat`, `lmforge serve` and `lmforge rag index|query|delete|info`.

`add_parser(subparsers)` adds them to the main `lmforge` parser; `python -m lmforge.serve.cli`
runs them standalone. Each sets `func(args) -> int`; user errors are `LMForgeError`s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import ConfigError, LMForgeError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="model folder (config.json + model.safetensors + tokenizer files) or a run "
        "directory (its most fine-tuned model is used)",
    )
    p.add_argument("--adapter", help="LoRA adapter folder (PEFT format) to apply on top of the model")
    p.add_argument(
        "--merge", action="store_true", help="merge the adapter into the weights (faster decoding)"
    )
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="cap the context (KV cache per slot) below the model's, to save memory",
    )


def _add_sampling_args(p: argparse.ArgumentParser, temperature: float = 0.7) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument(
        "--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})"
    )
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.1)
    g.add_argument("--max-tokens", type=int, default=256, help="answer length limit (default 256)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)


def _params(a):
    from .engine import GenParams

    try:
        return GenParams(
            max_tokens=a.max_tokens,
            temperature=a.temperature,
            top_p=a.top_p,
            top_k=a.top_k,
            repetition_penalty=a.repetition_penalty,
            stop=tuple(a.stop),
            seed=a.seed,
        ).validate()
    except ValueError as e:
        raise ConfigError(f"--{str(e).split('=')[0].replace('_', '-')}: {e}") from None


def _engine(a, **kw):
    import torch

    from .engine import Engine

    if a.threads:
        torch.set_num_threads(a.threads)
    if getattr(a, "context", None) is not None and a.context < 2:
        raise ConfigError("--context must be at least 2 tokens")
    return Engine.from_pretrained(
        a.model,
        adapter=a.adapter,
        merge=a.merge,
        device=a.device,
        dtype=a.dtype,
        context=getattr(a, "context", None),
        **kw,
    )


def _retriever(a):
    if not getattr(a, "rag_index", None):
        return None
    from .rag.query import Retriever

    return Retriever(a.rag_index, embedder_spec=getattr(a, "embedder", None))


# ----------------------------------------------------------------------------- commands
def cmd_chat(a) -> int:
    from .chat_cli import run_chat

    params = _params(a)
    retriever = _retriever(a)
    with _engine(a, max_batch=1, max_queue=1) as engine:
        return run_chat(engine, params, system=a.system, retriever=retriever, rag_k=a.k)


def serve_engine(a):
    """The engine `lmforge serve` runs, from its flags (checked here, named in the errors)."""
    if a.prefill_chunk < 0:
        raise ConfigError("--prefill-chunk must be >= 0 (0 = prefill every prompt in one forward)")
    if a.kv_blocks is not None and (a.kv_cache != "paged" or a.kv_blocks < 2):
        raise ConfigError("--kv-blocks needs --kv-cache paged and at least 2 blocks (one is scratch)")
    return _engine(
        a,
        max_batch=a.max_batch,
        max_queue=a.max_queue,
        name=a.name,
        prefill_chunk=a.prefill_chunk or None,
        kv_cache=a.kv_cache,
        kv_blocks=a.kv_blocks,
    )


def cmd_serve(a) -> int:
    from .server import create_app, make_server

    api_key = a.api_key or os.environ.get("LMFORGE_API_KEY") or None
    if a.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"lmforge serve: warning: listening on {a.host} without an API key", file=sys.stderr)
    retriever = _retriever(a)
    engine = serve_engine(a)
    with engine:
        app = create_app(engine, api_key=api_key, retriever=retriever, max_body_bytes=a.max_body_bytes)
        server = make_server(app, a.host, a.port, log_level=a.log_level)
        print(
            f"lmforge serve: model {engine.name!r} on http://{a.host}:{a.port} (chat page at /, API at "
            f"/v1, {a.max_batch} concurrent, {a.max_queue} queued{', API key required' if api_key else ''})",
            file=sys.stderr,
        )
        server.run()
    return 0


def cmd_rag_index(a) -> int:
    from .rag.embed import get_embedder
    from .rag.index import build_index
    from .rag.store import DB_NAME, VectorStore

    spec = a.embedder
    if spec is None:  # an existing index keeps its embedder
        from pathlib import Path

        if (Path(a.index) / DB_NAME).exists():
            from .rag.embed import embedder_for_name

            st = VectorStore(a.index)
            name = st.embedder_name
            st.close()
            embedder = embedder_for_name(name)
        else:
            embedder = get_embedder("minilm")
    else:
        embedder = get_embedder(spec)
    report, stats = build_index(
        a.index,
        a.inputs,
        embedder=embedder,
        max_words=a.chunk_words,
        overlap=a.overlap,
        text_field=a.text_field,
        prune=a.prune,
        progress=(lambda s, n: print(f"  + {s} ({n} chunks)", file=sys.stderr)) if a.verbose else None,
    )
    print(json.dumps({**report.as_dict(), "index": stats}, indent=2))
    return 0


def cmd_rag_query(a) -> int:
    from .rag.query import Retriever, answer

    retriever = Retriever(a.index, embedder_spec=a.embedder)
    if not a.model:
        hits = retriever.search(a.question, a.k)
        out = {"question": a.question, "citations": [h.citation(snippet=10_000) for h in hits]}
    else:
        with _engine(a, max_batch=1) as engine:
            out = {"question": a.question, **answer(engine, retriever, a.question, a.k, _params(a))}
    if a.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        if "answer" in out:
            print(out["answer"])
            print()
        for n, c in enumerate(out["citations"], 1):
            print(f"[{n}] {c['source']} (chunk {c['chunk']}, score {c['score']:.3f})")
            if "answer" not in out:
                print(f"    {c['text']}")
    return 0


def _stored_source(st, source: str) -> str | None:
    """The stored source `source` names: as typed, or as its canonical path (how `rag index` keys
    files), or None."""
    from .rag.index import canonical_source

    if st.document_sha(source) is not None:
        return source
    canonical = canonical_source(source)
    return canonical if st.document_sha(canonical) is not None else None


def cmd_rag_delete(a) -> int:
    from .rag.store import VectorStore

    st = VectorStore(a.index)
    try:
        found = {s: _stored_source(st, s) for s in a.sources}
        missing = [s for s, stored in found.items() if stored is None]
        if missing:  # nothing is deleted (or printed) when any source is unknown
            raise LMForgeError(
                f"{a.index}: no document with source {missing[0]!r}; nothing was deleted. "
                f"See the sources with `lmforge rag info {a.index} --sources`"
            )
        res = {s: st.delete_document(stored) for s, stored in found.items() if stored is not None}
        print(json.dumps({"deleted_chunks": res, "index": st.stats()}, indent=2))
    finally:
        st.close()
    return 0


def cmd_rag_info(a) -> int:
    from .rag.store import VectorStore

    st = VectorStore(a.index)
    try:
        info = st.stats()
        if a.sources:
            info["sources"] = st.sources()
        print(json.dumps(info, indent=2))
    finally:
        st.close()
    return 0


# ----------------------------------------------------------------------------- parser
def add_parser(sub) -> None:
    c = sub.add_parser(
        "chat",
        help="chat with a model in the terminal (streaming)",
        description="Interactive chat with a checkpoint. Commands: /reset, /system TEXT, "
        "/history, /exit. Reads stdin, so it can also be driven by a pipe.",
    )
    _add_model_args(c)
    c.add_argument("--system", help="system prompt")
    c.add_argument("--rag-index", help="answer with retrieval from this index (see `lmforge rag index`)")
    c.add_argument("--k", type=int, default=3, help="chunks retrieved per question (with --rag-index)")
    c.add_argument("--embedder", default=None, help=argparse.SUPPRESS)
    _add_sampling_args(c)
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with a web chat page",
        description="Serve a model over an OpenAI-compatible API (/v1/models, /v1/chat/completions, "
        "/v1/completions, streaming) plus /health and a chat page at /.",
    )
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' (default: $LMFORGE_API_KEY, else none)"
    )
    s.add_argument("--name", help="model id to serve under (default: the model folder's name)")
    s.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond that; more get a 503")
    s.add_argument(
        "--prefill-chunk",
        type=int,
        default=512,
        help="prompts longer than this are prefilled in chunks between decode steps (default 512; 0 = never)",
    )
    s.add_argument(
        "--kv-cache",
        choices=("slot", "paged"),
        default="slot",
        help="K/V cache: slot (a full-context row per request, default) or paged (16-position blocks "
        "reserved per request for its prompt + max_tokens; identical prompts share their blocks)",
    )
    s.add_argument(
        "--kv-blocks",
        type=int,
        default=None,
        help="paged cache: blocks in the pool (default: what --max-batch full contexts need)",
    )
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get a 413")
    s.add_argument("--rag-index", help='enable retrieval (`"rag": true` in a chat request) from this index')
    s.add_argument("--embedder", default=None, help=argparse.SUPPRESS)
    s.add_argument("--log-level", default="warning")
    s.set_defaults(func=cmd_serve)

    r = sub.add_parser(
        "rag",
        help="retrieval-augmented generation: index documents, query them",
        description="Build and query a vector index (SQLite + sqlite-vec) of documents.",
    )
    rs = r.add_subparsers(dest="rag_command", metavar="ACTION", required=True)
    ri = rs.add_parser("index", help="add or update documents in an index (created if missing)")
    ri.add_argument("index", help="index folder (holds index.db)")
    ri.add_argument("inputs", nargs="+", help="files, folders or globs: .txt .jsonl .json .parquet .html")
    ri.add_argument(
        "--embedder", default=None, help="minilm (default for a new index), hash[:DIM], or lmforge:MODEL_DIR"
    )
    ri.add_argument("--chunk-words", type=int, default=120, help="words per chunk (default 120)")
    ri.add_argument("--overlap", type=int, default=20, help="words shared by consecutive chunks (default 20)")
    ri.add_argument("--text-field", default="text", help="field holding the text in JSONL/parquet")
    ri.add_argument(
        "--prune", action="store_true", help="delete indexed documents under INPUTS that are gone"
    )
    ri.add_argument("-v", "--verbose", action="store_true")
    ri.set_defaults(func=cmd_rag_index)

    rq = rs.add_parser("query", help="retrieve chunks for a question (and answer it with --model)")
    rq.add_argument("index")
    rq.add_argument("question")
    rq.add_argument("--k", type=int, default=4, help="chunks to retrieve (default 4)")
    rq.add_argument("--model", help="model folder: generate an answer from the retrieved chunks")
    rq.add_argument("--adapter")
    rq.add_argument("--merge", action="store_true")
    rq.add_argument("--dtype", default=None)
    rq.add_argument("--device", default="cpu")
    rq.add_argument("--threads", type=int, default=None)
    rq.add_argument("--embedder", default=None, help="query embedder (default: the index's own)")
    rq.add_argument("--json", action="store_true", help="print JSON")
    _add_sampling_args(rq, temperature=0.0)
    rq.set_defaults(func=cmd_rag_query, max_tokens=64)

    rd = rs.add_parser("delete", help="remove documents (by source, as `rag info --sources` lists them)")
    rd.add_argument("index")
    rd.add_argument("sources", nargs="+")
    rd.set_defaults(func=cmd_rag_delete)

    rf = rs.add_parser("info", help="what an index holds")
    rf.add_argument("index")
    rf.add_argument("--sources", action="store_true", help="list the indexed documents")
    rf.set_defaults(func=cmd_rag_info)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lmforge")
    add_parser(p.add_subparsers(dest="command", metavar="COMMAND", required=True))
    a = p.parse_args(argv)
    try:
        return int(a.func(a) or 0)
    except LMForgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
