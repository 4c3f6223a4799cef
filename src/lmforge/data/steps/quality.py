"""Heuristic quality filters: datatrove's Gopher / C4 / FineWeb rules plus a sanity step.

The Gopher quality and repetition rules, C4's line rules and FineWeb's extra rules are run by
datatrove's own filter classes (same thresholds, same code as FineWeb), wrapped so that their
drop reasons land in our `StepStats` and ``mode: flag`` works. One thing is swapped: datatrove
splits words and sentences with NLTK's punkt model, which is a download; we give its filters a
`WordTokenizer` that splits sentences on terminal punctuation and words either on whitespace
(``words: whitespace``, the default: the Gopher paper's notion of a word, and fast) or, with
``words: datatrove``, with NLTK's Treebank word tokenizer per sentence -- what datatrove's
default tokenizer runs after punkt, so punctuation becomes tokens of its own. That choice moves
the "80% of words contain a letter" rule a lot: ``setup()`` is one word with a letter for
whitespace splitting, but ``setup`` ``(`` ``)`` (one in three) for datatrove. docs/data.md gives
the size of the difference.

`Sanity` is ours: no published rule names empty documents, binary garbage decoded as text,
gigantic documents or single lines (minified JS, base64 blobs), and all of them must be counted
drops rather than crashes or silent losses.
"""

from __future__ import annotations

import re
from typing import Any

from lmforge.data.readers import Document
from lmforge.data.steps.base import Step

_SENT_SPAN = re.compile(r"\S.*?(?:[.!?\u3002\uff01\uff1f]+(?=\s|$)|$)", re.S)


def _word_tokenizer(words: str = "whitespace"):
    from datatrove.utils.word_tokenizers import WordTokenizer

    class SentenceSplitTokenizer(WordTokenizer):
        """Offline stand-in for NLTK punkt: punctuation-terminated sentences; words by `words`."""

        def __init__(self, words: str):
            super().__init__("en")
            self.words = words
            self._treebank: Any = None

        def word_tokenize(self, text: str) -> list[str]:
            if self.words == "whitespace":
                return text.split()
            if self._treebank is None:
                from nltk.tokenize import NLTKWordTokenizer

                self._treebank = NLTKWordTokenizer()
            treebank = self._treebank
            out: list[str] = []
            for a, b in self.span_tokenize(text):  # punctuation split off, as datatrove's default
                out += [t.strip() for t in treebank.tokenize(text[a:b]) if t.strip()]
            return out

        def sent_tokenize(self, text: str) -> list[str]:
            return [text[a:b] for a, b in self.span_tokenize(text)]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(m.start(), m.end()) for m in _SENT_SPAN.finditer(text)]

        def __reduce__(self):  # picklable for process pools
            return (_word_tokenizer, (self.words,))

    return SentenceSplitTokenizer(words)


class Sanity(Step):
    """Empty, garbled (U+FFFD / control characters), too short, too long, gigantic lines."""

    name = "sanity"
    _GARBLED = re.compile(r"[\ufffd\x00-\x08\x0b\x0e-\x1f\x7f]")

    def __init__(
        self,
        min_chars: int = 1,
        max_chars: int = 1_000_000,
        max_line_chars: int = 100_000,
        max_garbled_ratio: float = 0.01,
        max_examples: int = 3,
    ):
        super().__init__("drop", max_examples)
        self.min_chars, self.max_chars = min_chars, max_chars
        self.max_line_chars, self.max_garbled_ratio = max_line_chars, max_garbled_ratio

    @classmethod
    def from_config(cls, section, max_examples: int, **context) -> Sanity:
        s = section
        return cls(s.min_chars, s.max_chars, s.max_line_chars, s.max_garbled_ratio, max_examples)

    def apply(self, doc: Document) -> str | None:
        text = doc.text
        n = len(text)
        if not text.strip():
            return "empty"
        if n > self.max_chars:
            return "too_long"
        if n < self.min_chars:
            return "too_short"
        if n > self.max_line_chars and max(map(len, text.splitlines()), default=0) > self.max_line_chars:
            return "gigantic_line"
        bad = len(self._GARBLED.findall(text))
        if bad > self.max_garbled_ratio * n:
            return "garbled"
        return None


class DatatroveFilter(Step):
    """Run a datatrove `BaseFilter` as a step; its text edits (C4 drops lines) are kept in drop mode."""

    def __init__(
        self, name: str, dt_filter, mode: str = "drop", max_examples: int = 3, reason_prefix: str = ""
    ):
        self.name = name
        super().__init__(mode, max_examples)
        self.filter = dt_filter
        self.reason_prefix = reason_prefix

    def apply(self, doc: Document) -> str | None:
        from datatrove.data import Document as DTDocument

        dt = DTDocument(text=doc.text, id=str(doc.meta.get("id", "")), metadata=doc.meta)
        try:
            result = self.filter.filter(dt)
        except ZeroDivisionError:  # datatrove divides by word/line counts; no words = nothing to keep
            return "no_words"
        keep, reason = result if isinstance(result, tuple) else (result, None)
        if keep:
            if self.mode == "drop" and dt.text != doc.text:
                if not dt.text.strip():
                    return "all_lines_removed"
                self.stats.count("docs_modified")
                self.stats.count("bytes_removed", len(doc.text.encode()) - len(dt.text.encode()))
                doc.text = dt.text
            elif dt.text != doc.text:  # flag mode: say what the line rules would have cut
                self.stats.count("docs_would_modify")
                self.stats.count("bytes_would_remove", len(doc.text.encode()) - len(dt.text.encode()))
            return None
        return self.reason_prefix + (reason or "rejected")


def gopher_quality(cfg, max_examples: int = 3, **context) -> DatatroveFilter:
    from datatrove.pipeline.filters import GopherQualityFilter

    f = GopherQualityFilter(
        min_doc_words=cfg.min_doc_words,
        max_doc_words=cfg.max_doc_words,
        min_avg_word_length=cfg.min_avg_word_length,
        max_avg_word_length=cfg.max_avg_word_length,
        max_symbol_word_ratio=cfg.max_symbol_word_ratio,
        max_bullet_lines_ratio=cfg.max_bullet_lines_ratio,
        max_ellipsis_lines_ratio=cfg.max_ellipsis_lines_ratio,
        max_non_alpha_words_ratio=cfg.min_alpha_words_ratio,  # datatrove's name for the same rule
        min_stop_words=cfg.min_stop_words,
        language=_word_tokenizer(cfg.words),
    )
    return _Renamed(
        "gopher_quality", f, cfg.mode, max_examples, {"gopher_enough_stop_words": "too_few_stop_words"}
    )


def gopher_repetition(cfg, max_examples: int = 3, **context) -> DatatroveFilter:
    from datatrove.pipeline.filters import GopherRepetitionFilter

    f = GopherRepetitionFilter(
        dup_line_frac=cfg.dup_line_frac,
        dup_para_frac=cfg.dup_para_frac,
        dup_line_char_frac=cfg.dup_line_char_frac,
        dup_para_char_frac=cfg.dup_para_char_frac,
        top_n_grams=tuple(tuple(x) for x in cfg.top_n_grams),
        dup_n_grams=tuple(tuple(x) for x in cfg.dup_n_grams),
        language=_word_tokenizer(cfg.words),
    )
    return DatatroveFilter("gopher_repetition", f, cfg.mode, max_examples)


def c4(cfg, max_examples: int = 3, **context) -> DatatroveFilter:
    from datatrove.pipeline.filters import C4QualityFilter

    f = C4QualityFilter(
        split_paragraph=True,
        remove_citations=cfg.remove_citations,
        filter_no_terminal_punct=cfg.filter_no_terminal_punct,
        min_num_sentences=cfg.min_num_sentences,
        min_words_per_line=cfg.min_words_per_line,
        max_word_length=cfg.max_word_length,
        filter_lorem_ipsum=cfg.filter_lorem_ipsum,
        filter_javascript=cfg.filter_javascript,
        filter_curly_bracket=cfg.filter_curly_bracket,
        filter_policy=cfg.filter_policy,
        language=_word_tokenizer(),
    )
    return DatatroveFilter("c4", f, cfg.mode, max_examples)


def fineweb(cfg, max_examples: int = 3, **context) -> DatatroveFilter:
    from datatrove.pipeline.filters import FineWebQualityFilter

    f = FineWebQualityFilter(
        line_punct_thr=cfg.line_punct_thr,
        line_punct_exclude_zero=cfg.line_punct_exclude_zero,
        short_line_thr=cfg.short_line_thr,
        short_line_length=cfg.short_line_length,
        char_duplicates_ratio=cfg.char_duplicates_ratio,
        new_line_ratio=cfg.new_line_ratio,
        language=_word_tokenizer(),
    )
    return DatatroveFilter("fineweb", f, cfg.mode, max_examples)


class _Renamed(DatatroveFilter):
    """Some datatrove reasons read backwards ("gopher_enough_stop_words" means too few)."""

    def __init__(self, name, dt_filter, mode, max_examples, renames: dict[str, str]):
        super().__init__(name, dt_filter, mode, max_examples)
        self.renames = renames

    def apply(self, doc: Document) -> str | None:
        reason = super().apply(doc)
        if reason is None:
            return None
        reason = self.renames.get(reason, reason)
        return reason[len("gopher_") :] if reason.startswith("gopher_") else reason
