"""`lmforge chat`: talk to a checkpoint in the terminal, the answer streamed as it is generated.

The conversation is kept (and re-sent whole each turn, rendered with the model's chat
template); when it no longer fits the context, the oldest turns are dropped and the user is told.
Commands: `/reset` (forget the conversation), `/system TEXT` (set the system prompt and reset),
`/history`, `/help`, `/exit` (or `/quit`, Ctrl-D, or Ctrl-C at the prompt; Ctrl-C during an
answer stops that answer only). Reads stdin line by line, so it can be driven
by a pipe or a test as well as by a person. With a RAG index (`--rag-index`), each question is
answered with the top-k retrieved chunks in the prompt and the sources are printed after it.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import TextIO

from ..errors import LMForgeError
from .engine import Engine, GenParams
from .rag.query import augment_messages, fit_sources

HELP = (
    "commands: /reset  forget the conversation | /system TEXT  set the system prompt | "
    "/history  show the conversation | /exit  quit"
)


class ChatSession:
    """History + system prompt + trimming to the context; `ask` streams one answer."""

    def __init__(
        self, engine: Engine, params: GenParams, system: str | None = None, retriever=None, rag_k: int = 4
    ):
        if engine.chat_format is None:
            raise LMForgeError(
                f"model {engine.name!r} has no chat template (no chat_template in its "
                f"tokenizer_config.json): chat needs one; use `lmforge serve` /v1/completions"
            )
        self.engine, self.params, self.system = engine, params, system
        self.retriever, self.rag_k = retriever, rag_k
        self.history: list[dict] = []
        self.turn = 0

    def reset(self) -> None:
        self.history = []

    def messages(self, extra: list[dict] | None = None) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.history + (extra or [])

    def _fit(self, messages_fn) -> tuple[list[int], int]:
        """Prompt ids, dropping the oldest exchanges until prompt + a minimum answer fits."""
        need = min(self.params.max_tokens or 64, self.engine.context // 4)
        dropped = 0
        while True:
            ids = self.engine.encode_chat(messages_fn())
            if len(ids) + need <= self.engine.context or not self.history:
                return ids, dropped
            self.history = self.history[2:] if len(self.history) >= 2 else []
            dropped += 1

    def ask(self, text: str, out: TextIO) -> str:
        """Stream the answer to `text` onto `out`; return it (and keep both in the history)."""
        user = {"role": "user", "content": text}
        hits = []
        if self.retriever is not None:
            hits = self.retriever.search(text, self.rag_k)
            ids, dropped = self._fit(lambda: augment_messages(self.messages([user]), hits))
            # the history is gone and the sources still do not fit: the server's rule, fewest first
            need = min(self.params.max_tokens or 64, self.engine.context // 4)
            ids, hits = fit_sources(
                lambda h: self.engine.encode_chat(augment_messages(self.messages([user]), h)),
                hits,
                self.engine.context,
                need,
            )
        else:
            ids, dropped = self._fit(lambda: self.messages([user]))
        if dropped:
            out.write(f"[context full: dropped the {dropped} oldest exchange(s)]\n")
        room = self.engine.context - len(ids)
        if room < 1:
            raise LMForgeError(
                f"this message alone is {len(ids)} tokens, more than the model's context "
                f"({self.engine.context}); send a shorter one"
            )
        params = replace(self.params, max_tokens=min(self.params.max_tokens or room, room))
        if params.seed is not None:
            params = replace(params, seed=params.seed + self.turn)
        self.turn += 1
        req = self.engine.submit(ids, params)
        parts = []
        try:
            for chunk in req:
                if chunk.text:
                    out.write(chunk.text)
                    out.flush()
                    parts.append(chunk.text)
                if chunk.error:
                    raise LMForgeError(f"generation failed: {chunk.error}")
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            req.cancel()
            out.write(" [interrupted]")
        answer = "".join(parts)
        out.write("\n")
        if hits:
            for n, h in enumerate(hits, 1):
                out.write(
                    f"  [{n}] {h.source}" + (f" (chunk {h.chunk})" if h.chunk is not None else "") + "\n"
                )
        self.history += [user, {"role": "assistant", "content": answer}]
        return answer


def _read_line(stdin: TextIO, stdout: TextIO, interactive: bool) -> str | None:
    """The next line typed (without its newline), or None at end of input."""
    if interactive:
        try:
            return input("you> ")
        except EOFError:
            return None
    stdout.write("you> ")
    stdout.flush()
    line = stdin.readline()
    return line.rstrip("\n") if line else None


def run_chat(
    engine: Engine,
    params: GenParams,
    *,
    system: str | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    retriever=None,
    rag_k: int = 4,
) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    session = ChatSession(engine, params, system, retriever, rag_k)
    interactive = stdin.isatty() and stdout.isatty()
    stdout.write(f"lmforge chat with {engine.name} (context {engine.context} tokens). {HELP}\n")
    while True:
        try:
            line = _read_line(stdin, stdout, interactive)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: leave quietly, there is nothing to resume
            stdout.write("\n")
            return 0
        if line is None:
            stdout.write("\n")
            return 0
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            session.reset()
            stdout.write("[conversation cleared]\n")
            continue
        if cmd == "/help":
            stdout.write(HELP + "\n")
            continue
        if cmd == "/history":
            for m in session.messages():
                stdout.write(f"{m['role']}: {m['content']}\n")
            continue
        if cmd.startswith("/system"):
            session.system = cmd[len("/system") :].strip() or None
            session.reset()
            stdout.write(f"[system prompt {'set' if session.system else 'cleared'}; conversation cleared]\n")
            continue
        if cmd.startswith("/") and " " not in cmd:
            stdout.write(f"unknown command {cmd}; {HELP}\n")
            continue
        stdout.write("assistant> ")
        stdout.flush()
        try:
            session.ask(line, stdout)
        except LMForgeError as e:
            stdout.write(f"\nerror: {e}\n")
