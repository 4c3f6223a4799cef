"""JSON mode (`response_format: {"type": "json_object"}`) by constrained decoding.

Why constrain instead of asking nicely: a prompt that asks for JSON gives JSON most of the time;
a client that parses the answer needs it every time. Here each generated token must keep the
text a prefix of a JSON object (RFC 8259), and generation stops when the object closes, so a
finished answer (`finish_reason: "stop"`) always parses; only a `length` finish can leave it
incomplete (as with OpenAI's JSON mode).

`JsonPrefix` is a character-level pushdown recogniser: a stack of open containers and a small
state (what may come next; inside a string, an escape, a number or a literal). Testing a token
= feeding its text to a copy. `choose` picks the token: the one sampled (or the argmax) when it
keeps the JSON valid; otherwise the most likely valid token among the 64 best (greedy), or a
draw among those by their probabilities (sampling); past those, the first valid token by
logit. Runs of whitespace are capped (a model may otherwise pad forever), empty pieces (special
tokens) are never valid, and a token that would close the object stops the answer there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MAX_WHITESPACE = 24  # consecutive whitespace characters allowed between tokens of JSON
TOP_CANDIDATES = 64

_NUMBER = {
    ("-", "0"): "0",
    ("-", "d"): "int",
    ("0", "."): ".",
    ("0", "e"): "e",
    ("int", "0"): "int",
    ("int", "d"): "int",
    ("int", "."): ".",
    ("int", "e"): "e",
    (".", "0"): "frac",
    (".", "d"): "frac",
    ("frac", "0"): "frac",
    ("frac", "d"): "frac",
    ("frac", "e"): "e",
    ("e", "s"): "esign",
    ("e", "0"): "exp",
    ("e", "d"): "exp",
    ("esign", "0"): "exp",
    ("esign", "d"): "exp",
    ("exp", "0"): "exp",
    ("exp", "d"): "exp",
}
_NUMBER_ENDS = {"0", "int", "frac", "exp"}
_HEX = set("0123456789abcdefABCDEF")


def _kind(c: str) -> str:
    if c == "0":
        return "0"
    if "1" <= c <= "9":
        return "d"
    if c in "eE":
        return "e"
    if c in "+-":
        return "s"
    return c


class JsonPrefix:
    """Whether a text is a prefix of one JSON object; `done` once the object has closed."""

    __slots__ = ("stack", "mode", "aux", "is_key", "ws")

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.mode = "start"
        self.aux = ""
        self.is_key = False
        self.ws = 0

    @property
    def done(self) -> bool:
        return self.mode == "done"

    def copy(self) -> JsonPrefix:
        c = JsonPrefix.__new__(JsonPrefix)
        c.stack, c.mode, c.aux, c.is_key, c.ws = list(self.stack), self.mode, self.aux, self.is_key, self.ws
        return c

    def accepts(self, text: str) -> bool:
        """Would `text` (non-empty) keep this a valid prefix? (This state is unchanged.)"""
        return bool(text) and self.copy().feed(text)

    def feed(self, text: str) -> bool:
        """Advance by `text`; False (and a spoiled state) if it leaves JSON."""
        return all(self._char(c) for c in text)

    # -- the recogniser
    def _char(self, c: str) -> bool:
        m = self.mode
        if m == "str":
            if c == '"':
                self.mode = "colon" if self.is_key else "after"
            elif c == "\\":
                self.mode = "esc"
            return c >= " "
        if m == "esc":
            if c == "u":
                self.mode, self.aux = "u", "4"
                return True
            self.mode = "str"
            return c in '"\\/bfnrt'
        if m == "u":
            if c not in _HEX:
                return False
            left = int(self.aux) - 1
            self.mode, self.aux = ("str", "") if left == 0 else ("u", str(left))
            return True
        if m == "lit":
            if c != self.aux[0]:
                return False
            self.aux = self.aux[1:]
            if not self.aux:
                self.mode = "after"
            return True
        if m == "num":
            nxt = _NUMBER.get((self.aux, _kind(c)))
            if nxt is not None:
                self.aux = nxt
                return True
            if self.aux not in _NUMBER_ENDS:
                return False
            self.mode = "after"  # the number ended; `c` belongs to what follows
            return self._char(c)
        if c in " \t\n\r":
            self.ws += 1
            return m not in ("start", "done") and self.ws <= MAX_WHITESPACE  # the answer opens with {
        self.ws = 0
        return self._structural(m, c)

    def _structural(self, m: str, c: str) -> bool:
        if m == "start":
            return c == "{" and self._open(c)
        if m in ("first_key", "key"):
            if c == '"':
                self.mode, self.is_key = "str", True
                return True
            return m == "first_key" and c == "}" and self._close()
        if m == "colon":
            self.mode = "value"
            return c == ":"
        if m in ("value", "first_value"):
            if m == "first_value" and c == "]":
                return self._close()
            return self._value(c)
        if m == "after":
            top = self.stack[-1]
            if c == ",":
                self.mode = "key" if top == "{" else "value"
                return True
            return c == ("}" if top == "{" else "]") and self._close()
        return False  # done: nothing may follow

    def _value(self, c: str) -> bool:
        if c == '"':
            self.mode, self.is_key = "str", False
        elif c in "{[":
            return self._open(c)
        elif c == "-" or c.isdigit() and c.isascii():
            self.mode, self.aux = "num", {"-": "-", "0": "0"}.get(c, "int")
        elif c in "tfn":
            self.mode, self.aux = "lit", {"t": "rue", "f": "alse", "n": "ull"}[c]
        else:
            return False
        return True

    def _open(self, c: str) -> bool:
        self.stack.append(c)
        self.mode = "first_key" if c == "{" else "first_value"
        return True

    def _close(self) -> bool:
        self.stack.pop()
        self.mode = "after" if self.stack else "done"
        return True


def choose(
    state: JsonPrefix,
    logits: torch.Tensor,
    first: int,
    piece: Callable[[int], str],
    temperature: float,
    generator: torch.Generator | None,
    greedy_below: float,
) -> int | None:
    """The token to emit for one row (`logits` [V], already biased/penalised; `first` = what
    unconstrained sampling picked), or None when no token continues the JSON."""
    if state.accepts(piece(first)):
        return first
    k = min(TOP_CANDIDATES, logits.shape[-1])
    vals, ids = logits.float().topk(k)
    ids_l = ids.tolist()
    valid = [j for j, t in enumerate(ids_l) if state.accepts(piece(t))]
    if valid:
        if temperature < greedy_below:
            return ids_l[valid[0]]
        w = (vals[valid] / temperature).softmax(-1).cpu()
        return ids_l[valid[int(torch.multinomial(w, 1, generator=generator))]]
    for t in logits.argsort(descending=True)[k:].tolist():
        if state.accepts(piece(t)):
            return t
    return None


def constrain(
    states: list[JsonPrefix | None],
    logits: torch.Tensor,
    toks: list[int],
    temperatures: list[float],
    generators: list[torch.Generator | None],
    piece: Callable[[int], str],
    greedy_below: float,
) -> list[str | None]:
    """For each row with a JSON state: replace `toks[n]` (in place) by a token that keeps the
    JSON valid and advance the state by it. Returns an error per row (None = fine)."""
    errors: list[str | None] = [None] * len(toks)
    for n, st in enumerate(states):
        if st is None:
            continue
        t = choose(st, logits[n], toks[n], piece, temperatures[n], generators[n], greedy_below)
        if t is None:
            errors[n] = "json mode: no token continues the JSON object"
            continue
        toks[n] = t
        st.feed(piece(t))
    return errors
