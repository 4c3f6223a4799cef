"""Instruction data derived offline from the built-in corpus (the Python standard library).

The default pipeline needs chat data with no network. The stdlib documents itself: every public
module, class and function with a docstring gives a question ("What does `json.dumps` do?")
and a one-sentence answer (the docstring's summary line, which is what the author meant as
the answer). Questions are phrased from a few templates, some conversations carry a system
prompt and some are two turns long (a follow-up about another name from the same module), so
the SFT stage exercises the whole chat path: system turns, multi-turn masks, end-of-turn tokens.

Parsing uses `ast` (never imports), in sorted path order; each record's phrasing is chosen by
hashing its name, and the held-out split hashes the question text, so the data set is identical
on every run of a given Python version.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
import sysconfig
import warnings
from pathlib import Path

from lmforge.data.builtin import _stdlib_files

SYSTEM = "You are a concise assistant who knows the Python standard library."
FUNC_Q = (
    "What does `{name}` do?",
    "Explain `{name}` in one sentence.",
    "What is `{name}` for?",
    "Briefly, what does the function `{name}` do?",
)
CLASS_Q = ("What is `{name}`?", "Describe the class `{name}` in one sentence.")
MODULE_Q = ("What is the `{name}` module for?", "What does the Python module `{name}` provide?")
FOLLOW_UP = ("And `{name}`?", "What about `{name}`?")
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]`'\"])\.(\s|$)")


def summary_sentence(doc: str, min_chars: int = 20, max_chars: int = 200) -> str | None:
    """The first sentence of a docstring's summary paragraph, or None if it is not prose."""
    para = doc.strip().split("\n\n", 1)[0]
    text = " ".join(para.split())
    m = _SENTENCE_END.search(text)
    if m:
        text = text[: m.start() + 1]
    elif not text.endswith("."):
        text += "."
    if not (min_chars <= len(text) <= max_chars) or not text[0].isalpha():
        return None
    if any(bad in text for bad in (">>>", "XXX", "TODO", "::", "Deprecated", "deprecated", "(c)")):
        return None
    if re.match(r"^\w+\(.*\)", text):  # a signature line ("dumps(obj) -> str"), not prose
        return None
    return text[0].upper() + text[1:]


def _pick(options, key: str) -> str:
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big")
    return options[h % len(options)]


@functools.lru_cache(maxsize=2)
def _items(root: str) -> tuple[tuple[str, str, str, str], ...]:
    """(module, qualified name, kind, summary) for documented public stdlib names."""
    out = []
    base = Path(root)
    for path in _stdlib_files(base):
        rel = path.relative_to(base).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if (
            not parts
            or any(p.startswith("_") for p in parts)
            or parts[0] in ("encodings", "ensurepip", "turtledemo")
        ):
            continue
        module = ".".join(parts)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        doc = ast.get_docstring(tree)
        if doc and (s := summary_sentence(doc)):
            out.append((module, module, "module", s))
        for node in tree.body:
            if not isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
            ) or node.name.startswith("_"):
                continue
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            doc = ast.get_docstring(node)
            if doc and (s := summary_sentence(doc)):
                out.append((module, f"{module}.{node.name}", kind, s))
            if kind == "class":
                for sub in node.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and not sub.name.startswith(
                        "_"
                    ):
                        d = ast.get_docstring(sub)
                        if d and (s := summary_sentence(d)):
                            out.append((module, f"{module}.{node.name}.{sub.name}", "function", s))
    seen, unique = set(), []
    for it in out:  # one answer per name (first definition wins, e.g. platform-specific copies)
        if it[1] not in seen:
            seen.add(it[1])
            unique.append(it)
    return tuple(unique)


def _question(name: str, kind: str) -> str:
    return _pick({"module": MODULE_Q, "class": CLASS_Q, "function": FUNC_Q}[kind], name).format(name=name)


def builtin_instructions(stdlib_dir: str | None = None, max_examples: int | None = None) -> list[dict]:
    """`messages` records from the stdlib: single-turn Q&A, some with a system prompt, some with
    a second turn about another name from the same module."""
    root = stdlib_dir or sysconfig.get_paths()["stdlib"]
    items = list(_items(str(root)))
    records = []
    for i, (module, name, kind, answer) in enumerate(items):
        msgs = [{"role": "user", "content": _question(name, kind)}, {"role": "assistant", "content": answer}]
        h = int.from_bytes(hashlib.sha1(name.encode()).digest()[4:8], "big")
        if h % 4 == 0:
            msgs.insert(0, {"role": "system", "content": SYSTEM})
        nxt = items[i + 1] if i + 1 < len(items) else None
        if h % 5 == 0 and nxt and nxt[0] == module:
            msgs += [
                {"role": "user", "content": _pick(FOLLOW_UP, nxt[1]).format(name=nxt[1])},
                {"role": "assistant", "content": nxt[3]},
            ]
        records.append({"messages": msgs, "source": f"stdlib:{name}"})
    if max_examples is not None and len(records) > max_examples:
        # an even spread over the alphabet of modules, not the first N
        step = len(records) / max_examples
        records = [records[int(k * step)] for k in range(max_examples)]
    return records
