"""DataConfig: every knob of the data stage, one sub-model per step.

Each step's thresholds default to the *published* values (Gopher, C4, FineWeb, the FineWeb
MinHash setting of 5-grams and 14 bands x 8 rows, 13-gram decontamination) so that a user who
enables a step gets the rule as the paper describes it. The default *pipeline*, though, runs on
the built-in corpus (Python docstrings: hard-wrapped English prose with code in doctests), and
the line-based web rules (C4 lines, FineWeb's extras) would delete most of it: C4 keeps 25% of
its bytes, FineWeb's duplicate-line rule drops 40% of its documents. Those two therefore default
to ``mode: "flag"`` -- they run, record in the funnel what they *would* drop and tag the
documents, but keep them. Set ``mode: drop`` for web crawls (see docs/data.md for a WARC config).

Every sub-model forbids unknown keys, so a typo in a pipeline file is an error naming the key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Mode = Literal["drop", "flag"]


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True


class ExtractConfig(_Step):
    """HTML -> main text with trafilatura (documents that are already text pass through)."""

    favor: Literal["precision", "balanced", "recall"] = Field(
        "precision", description="trafilatura trade-off; FineWeb uses precision"
    )
    include_tables: bool = True
    include_comments: bool = False
    timeout_s: float = Field(10.0, gt=0, description="per page; a page that takes longer is dropped")
    max_html_bytes: int = Field(5_000_000, ge=1, description="larger pages are dropped unparsed")


class SanityConfig(_Step):
    """Bad input that no published rule covers: empty, garbled/binary, gigantic docs or lines."""

    min_chars: int = Field(1, ge=0)
    max_chars: int = Field(1_000_000, ge=1, description="length outliers above this are dropped")
    max_line_chars: int = Field(100_000, ge=1, description="a single line longer than this drops the doc")
    max_garbled_ratio: float = Field(
        0.01, ge=0, le=1, description="share of U+FFFD / control characters tolerated"
    )


class UrlFilterConfig(_Step):
    """Block by URL: user domains/files plus datatrove's (FineWeb's) banned URL word lists."""

    blocked_domains: list[str] = Field(default_factory=list, description="a domain blocks its subdomains too")
    blocklist_files: list[str] = Field(
        default_factory=list, description="text files, one domain per line (UT1 format); '#' comments"
    )
    banned_url_words: bool = Field(
        True, description="datatrove's banned words / subwords / soft words on URLs"
    )
    soft_word_threshold: int = Field(2, ge=1)
    datatrove_domain_list: bool = Field(
        False, description="also load datatrove's 4M-domain UT1 list (slow, ~1 GB RAM)"
    )


class LanguageConfig(_Step):
    """Offline language id (langid.py's bundled model); keep listed languages above a threshold."""

    languages: list[str] = Field(default_factory=lambda: ["en"], description="ISO 639-1; empty = keep all")
    min_score: float = Field(0.65, ge=0, le=1, description="FineWeb's 0.65 (for its fastText model)")
    thresholds: dict[str, float] = Field(
        default_factory=dict, description="per-language override of min_score"
    )
    max_chars: int = Field(3000, ge=100, description="characters of each doc the identifier reads")
    mode: Mode = "drop"


WordSplit = Literal["whitespace", "datatrove"]


class GopherQualityConfig(_Step):
    """Gopher quality rules (Rae et al. 2021, Table A1); datatrove's implementation."""

    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: float | None = 3
    max_avg_word_length: float | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2
    words: WordSplit = Field(
        "whitespace",
        description="whitespace: Gopher's words, fast; datatrove: punctuation split off as by "
        "datatrove's default NLTK tokenizer (keeps far fewer documents, see docs/data.md)",
    )
    mode: Mode = "drop"


class GopherRepetitionConfig(_Step):
    """Gopher repetition rules (duplicate lines/paragraphs, top and duplicated n-grams)."""

    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: list[tuple[int, float]] = Field(default_factory=lambda: [(2, 0.2), (3, 0.18), (4, 0.16)])
    dup_n_grams: list[tuple[int, float]] = Field(
        default_factory=lambda: [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]
    )
    words: WordSplit = Field("whitespace", description="as gopher_quality.words")
    mode: Mode = "drop"


class C4Config(_Step):
    """C4 line rules (Raffel et al. 2020): drop lines without terminal punctuation etc."""

    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True
    mode: Mode = Field(
        "flag",
        description="published rules, but flag-only by default: they delete "
        "75% of the bytes of hard-wrapped text such as the built-in corpus",
    )


class FineWebConfig(_Step):
    """FineWeb's extra rules (Penedo et al. 2024)."""

    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3
    mode: Mode = Field("flag", description="flag-only by default: drops 40% of the built-in corpus")


class ContentFilterConfig(_Step):
    """A configurable word / regex list (case-insensitive); matches beyond max_matches drop the doc."""

    words: list[str] = Field(default_factory=list, description="whole words or phrases")
    regexes: list[str] = Field(default_factory=list, description="Python regular expressions")
    word_files: list[str] = Field(default_factory=list, description="files with one word/phrase per line")
    max_matches: int = Field(0, ge=0, description="tolerated matches per document")
    mode: Mode = "drop"

    @field_validator("regexes")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        import re

        for r in v:
            try:
                re.compile(r)
            except re.error as e:
                raise ValueError(f"regex {r!r} does not compile: {e}") from e
        return v


class PIIConfig(_Step):
    """Replace (never drop) e-mail addresses, phone numbers and IP addresses."""

    emails: bool = True
    phones: bool = True
    ips: bool = True
    only_public_ips: bool = Field(True, description="keep 127.0.0.1, 10.x, 192.168.x ... (not personal)")
    email_replacement: str = "email@example.com"
    phone_replacement: str = "555-0100"
    ip_replacement: str = "192.0.2.1"
    phone_region: str = Field(
        "US", description="ISO 3166 region for numbers written without a +country code (phonenumbers)"
    )


# Fields holding an eval item's question/context text in the common public shapes (MMLU, ARC,
# HellaSwag, GSM8K, SQuAD, BoolQ, PIQA, WinoGrande, lm-eval-harness task dumps).
EVAL_KEY_FIELDS = (
    "question",
    "query",
    "prompt",
    "problem",
    "context",
    "ctx",
    "passage",
    "goal",
    "sentence",
    "premise",
    "hypothesis",
    "instruction",
    "input",
    "text",
)


class DecontamConfig(_Step):
    """Drop or flag documents sharing an n-gram with an evaluation set."""

    eval_sets: list[str] = Field(
        default_factory=list, description="files/folders/globs: .jsonl .json .csv .txt .parquet"
    )
    eval_fields: list[str] = Field(
        default_factory=lambda: list(EVAL_KEY_FIELDS),
        description="fields whose n-grams are keys (the item's own text, not its answer choices); "
        "['*'] or [] = every string field; a record with none of them is read whole",
    )
    ngram: int = Field(13, ge=3)
    min_item_words: int = Field(
        8, ge=1, description="items shorter than ngram but at least this long count whole"
    )
    mode: Mode = "drop"


class DedupConfig(_Step):
    """Exact (normalised-text hash) then near-duplicate (MinHash + LSH) deduplication."""

    exact: bool = True
    near: bool = True
    ngram: int = Field(5, ge=1, description="word shingles")
    bands: int = Field(14, ge=1)
    rows: int = Field(8, ge=1)
    verify_threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="if set, a candidate pair counts only when its signature "
        "Jaccard estimate reaches this (fewer false positives)",
    )
    cluster_examples: int = Field(200, ge=0, description="clusters written in full to dedup_clusters.jsonl")


class DomainRule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    domain: str
    url_regex: str | None = None
    source_regex: str | None = None
    text_regex: str | None = Field(None, description="matched per line (multiline)")
    min_line_ratio: float = Field(0.0, ge=0, le=1, description="share of lines text_regex must match")


def _default_domain_rules() -> list[DomainRule]:
    code_line = (
        r"^\s*(>>>|\.\.\.\s|def |class |import |from \S+ import |return\b|if .*:$|for .*:$|"
        r"[{}]\s*$|.*;\s*$|#include|\$ |[A-Za-z_][\w.]*\(.*\)\s*$)"
    )
    return [
        DomainRule(
            domain="encyclopedia", url_regex=r"(^|\.)(wikipedia|wiktionary|wikibooks|britannica)\.(org|com)"
        ),
        DomainRule(
            domain="code",
            url_regex=r"(^|\.)(github|gitlab|stackoverflow|stackexchange|readthedocs)\.|/docs?/",
        ),
        DomainRule(
            domain="academic", url_regex=r"(^|\.)(arxiv\.org|doi\.org|ncbi\.nlm\.nih\.gov|[\w-]+\.edu)"
        ),
        DomainRule(domain="forum", url_regex=r"(^|\.)(reddit|quora)\.com|forum|/board/|/thread"),
        DomainRule(
            domain="news",
            url_regex=r"news|(^|\.)(bbc|cnn|reuters|nytimes|theguardian|spiegel|"
            r"zeit|lemonde|elpais)\.|/20\d\d/\d\d/",
        ),
        DomainRule(domain="code", text_regex=code_line, min_line_ratio=0.2),
        DomainRule(domain="reference", source_regex=r"^(stdlib|pydoc):"),
    ]


class DomainConfig(_Step):
    """Label each document with a domain (first matching rule), report the mix, optionally resample."""

    rules: list[DomainRule] = Field(default_factory=_default_domain_rules)
    web_domain: str = Field("web", description="label for documents with a URL that no rule matched")
    default_domain: str = Field("prose", description="label for the rest")
    weights: dict[str, float] = Field(
        default_factory=dict, description="target share per domain; empty = keep the natural mix"
    )
    mix_by: Literal["tokens", "docs"] = "tokens"
    max_repeat: int = Field(1, ge=1, description="upsampling cap (1 = only downsample)")


class QualityClassifierConfig(_Step):
    """A fast linear classifier (scikit-learn, hashed word 1-2 grams): reference vs random web text."""

    reference: list[str] = Field(
        default_factory=list,
        description="positive class (e.g. Wikipedia, books); empty = documents "
        "that passed every heuristic filter",
    )
    negatives: list[str] = Field(
        default_factory=list,
        description="negative class; empty = documents the heuristic filters dropped "
        "(with a reference set: a random sample of this run's input)",
    )
    text_field: str = "text"
    mode: Literal["score", "weight", "filter"] = Field(
        "score", description="score: annotate; weight: also write meta.weight; filter: drop below threshold"
    )
    threshold: float = Field(0.5, ge=0, le=1)
    max_train_docs: int = Field(2000, ge=10, description="per class")
    min_class_docs: int = Field(20, ge=2, description="fewer examples of a class: skip training, say so")
    n_features: int = Field(2**18, ge=1024)


class DataConfig(BaseModel):
    """The `data:` section of a pipeline file."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[str] = Field(
        default_factory=lambda: ["builtin"], description="files, folders, globs, 'builtin' or 'hf:NAME'"
    )
    text_field: str = "text"
    val_fraction: float = Field(0.05, gt=0, lt=1)
    output_format: Literal["jsonl", "parquet"] = "jsonl"
    shard_docs: int = Field(10_000, ge=1, description="documents per output shard")
    workers: int = Field(1, ge=1, description="processes (local) or concurrent tasks (ray)")
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = Field(None, description="ray cluster address; None = start/attach locally")
    task_bytes: int = Field(64 << 20, ge=1 << 10, description="input bytes per task (files are grouped)")
    max_docs: int | None = Field(
        None,
        ge=1,
        description="keep at most this many output documents (the first "
        "in input order); each task reads at most ~2x that",
    )
    examples_per_reason: int = Field(3, ge=0, description="dropped-text examples kept per step and reason")
    keep_work: bool = Field(False, description="keep the per-task intermediate files after success")

    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    sanity: SanityConfig = Field(default_factory=SanityConfig)
    url_filter: UrlFilterConfig = Field(default_factory=UrlFilterConfig)
    language: LanguageConfig = Field(default_factory=LanguageConfig)
    gopher_quality: GopherQualityConfig = Field(default_factory=GopherQualityConfig)
    gopher_repetition: GopherRepetitionConfig = Field(default_factory=GopherRepetitionConfig)
    c4: C4Config = Field(default_factory=C4Config)
    fineweb: FineWebConfig = Field(default_factory=FineWebConfig)
    content_filter: ContentFilterConfig = Field(default_factory=ContentFilterConfig)
    pii: PIIConfig = Field(default_factory=PIIConfig)
    decontam: DecontamConfig = Field(default_factory=DecontamConfig)
    domain: DomainConfig = Field(default_factory=DomainConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    quality_classifier: QualityClassifierConfig = Field(default_factory=QualityClassifierConfig)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if not self.inputs:
            raise ValueError("data.inputs is empty; give at least one path, glob or 'builtin'")
        return self
