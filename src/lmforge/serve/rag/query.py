"""Retrieval at question time: embed the question, take the top-k chunks, put them in the prompt
as numbered sources and return them as citations.

For chat models the sources go into a system message ("Answer using the numbered sources...
cite them as [1]"); for plain LMs (`build_prompt`) they precede a `Question: ... Answer:` cue.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from ...tokenizer import literal_text
from ..engine import GenParams
from .embed import RagError, embedder_for_name, get_embedder
from .store import Hit, VectorStore

INSTRUCTION = (
    "Answer the question using the numbered sources below. Cite the sources you use "
    "as [1], [2]. If they do not contain the answer, say so."
)


class Retriever:
    """Opens an index and the embedder it was built with (or checks the one given matches)."""

    def __init__(self, folder: str | Path, embedder=None, embedder_spec: str | None = None):
        self.store = VectorStore(folder)
        if embedder is None:
            embedder = (
                get_embedder(embedder_spec) if embedder_spec else embedder_for_name(self.store.embedder_name)
            )
        if embedder.name != self.store.embedder_name:
            raise RagError(
                f"{folder}: the index was built with embedder {self.store.embedder_name!r} but the "
                f"query embedder is {embedder.name!r}; their vectors are not comparable. Query "
                f"with the index's embedder, or re-index with this one into a new folder"
            )
        self.embedder = embedder
        self._lock = threading.Lock()

    def search(self, query: str, k: int = 4) -> list[Hit]:
        with self._lock:
            v = self.embedder.embed([query])[0]
            return self.store.search(v, k)

    def close(self) -> None:
        self.store.close()


def format_sources(hits: list[Hit], max_chars: int | None = None) -> str:
    parts = []
    for n, h in enumerate(hits, 1):
        text = h.text if max_chars is None else h.text[:max_chars]
        parts.append(f"[{n}] ({Path(h.source).name}) {text}")
    return "\n".join(parts)


def augment_messages(messages: list[dict], hits: list[Hit]) -> list[dict]:
    """Messages with the sources added to the system prompt (a new one if there is none)."""
    if not hits:
        return list(messages)
    block = f"{INSTRUCTION}\n\n{format_sources(hits)}"
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{block}"
    else:
        out.insert(0, {"role": "system", "content": block})
    return out


def build_prompt(question: str, hits: list[Hit]) -> str:
    """A completion-style prompt for plain LMs."""
    if not hits:
        return f"Question: {question}\nAnswer:"
    return f"{format_sources(hits)}\n\nQuestion: {question}\nAnswer:"


def fit_sources(
    render: Callable[[list[Hit]], list[int]], hits: list[Hit], context: int, need: int
) -> tuple[list[int], list[Hit]]:
    """The prompt ids `render(hits)` and the hits kept, dropping the lowest-ranked sources until
    the prompt leaves `need` tokens of the context for the answer. With no source left the bare
    prompt is returned as it is (the caller decides what a prompt too long on its own means).
    The one trimming rule for the server, `lmforge rag query` and `lmforge chat --rag-index`."""
    hits = list(hits)
    while True:
        ids = render(hits)
        if len(ids) + need <= context or not hits:
            return ids, hits
        hits = hits[:-1]


def retrieve_and_fit(
    retriever: Retriever | None,
    query: str,
    k: int,
    render: Callable[[list[Hit]], list[int]],
    context: int,
    need: int,
) -> tuple[list[int], list[Hit]]:
    """Search `k` chunks for `query` (none without a retriever) and trim them to fit (`fit_sources`)."""
    hits = retriever.search(query, k) if retriever is not None else []
    return fit_sources(render, hits, context, need)


def answer(
    engine, retriever: Retriever | None, question: str, k: int = 4, params=None, chat: bool | None = None
) -> dict:
    """Retrieve (unless retriever is None), generate, and return {answer, citations, prompt_tokens}.
    Chat models get the sources in a system message; plain LMs a completion prompt. The prompt is
    trimmed (fewest sources first dropped) so that it fits the model's context."""
    params = params or GenParams(max_tokens=64, temperature=0)
    use_chat = engine.chat_format is not None if chat is None else chat
    need = params.max_tokens or 32

    def render(hits: list[Hit]) -> list[int]:
        if use_chat:
            return engine.encode_chat(augment_messages([{"role": "user", "content": question}], hits))
        return engine.encode(literal_text(build_prompt(question, hits)))  # documents are text

    ids, hits = retrieve_and_fit(retriever, question, k, render, engine.context, need)
    if len(ids) + need > engine.context:  # the question alone is too long: keep its end
        ids = ids[-(engine.context - need) :]
    res = engine.submit(ids, params).result()
    return {
        "answer": res.text.strip(),
        "citations": [h.citation() for h in hits],
        "prompt_tokens": len(ids),
        "finish_reason": res.finish_reason,
    }
