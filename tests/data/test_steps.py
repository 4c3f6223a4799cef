"""Unit tests of the data-stage steps: each rule on a document made to trip it (or not)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from lmforge.data.config import (
    C4Config,
    DataConfig,
    DomainRule,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
)
from lmforge.data.readers import Document
from lmforge.data.steps import build_doc_steps, quality, run_steps
from lmforge.data.steps.base import Step, StepStats
from lmforge.data.steps.content import ContentFilter, PIIScrub, UrlFilter
from lmforge.data.steps.decontam import Decontaminate, build_eval_ngrams
from lmforge.data.steps.dedup import MinHasher, exact_hash, jaccard_estimate, lsh_clusters
from lmforge.data.steps.domain import DomainLabel, mix_plan
from lmforge.data.steps.language import LanguageFilter
from lmforge.data.steps.quality import Sanity, c4, fineweb, gopher_quality, gopher_repetition

PROSE = (
    "The history of the village goes back to the twelfth century, when a small group of farmers settled "
    "on the bank of the river. They built a mill and a church, and over the years the settlement grew into "
    "a market town with a weekly fair. Today the old mill is a museum that tells the story of the people "
    "who lived and worked there, and visitors come from all over the region to see it. "
)


PROSE2 = (
    "In the spring the fields around the town turn green, and the farmers plant wheat, barley and beans. "
    "The harvest festival in September brings music, dancing and long tables of food to the main square, "
    "where children play games until late in the evening while their parents talk about the weather."
)


def doc(text, **meta):
    return Document(text, "test", dict(meta))


def run(step, docs):
    return list(step(docs))


# ----------------------------------------------------------------------------- interface
def test_step_counts_and_flag_mode():
    class DropShort(Step):
        name = "short"

        def apply(self, d):
            return "too_short" if len(d.text) < 5 else None

    docs = [doc("hi"), doc("hello world")]
    s = DropShort()
    out = run(s, [Document(d.text, d.source, {}) for d in docs])
    assert [d.text for d in out] == ["hello world"]
    assert s.stats.docs_in == 2 and s.stats.docs_out == 1
    assert s.stats.dropped == {"too_short": {"docs": 1, "bytes": 2}}
    assert s.stats.examples["too_short"][0]["text"] == "hi"

    f = DropShort(mode="flag")
    out = run(f, [Document(d.text, d.source, {}) for d in docs])
    assert len(out) == 2 and out[0].meta["flags"] == ["short:too_short"]
    assert f.stats.flagged["too_short"]["docs"] == 1 and not f.stats.dropped


def test_a_failing_document_is_a_counted_drop():
    class Fragile(Step):
        name = "fragile"

        def apply(self, d):
            return 1 / 0 if d.text == "boom" else None

    for mode in ("drop", "flag"):
        s = Fragile(mode=mode)
        assert [d.text for d in run(s, [doc("ok"), doc("boom"), doc("fine")])] == ["ok", "fine"]
        assert s.stats.dropped["step_error"]["docs"] == 1
        assert s.stats.counters["error_ZeroDivisionError"] == 1


def test_stats_merge_is_addition():
    a, b = StepStats("x", max_examples=2), StepStats("x", max_examples=2)
    for st, t in ((a, "one"), (b, "two"), (b, "three")):
        st.add_in(doc(t))
        st.drop("r", doc(t))
        st.observe("lang_score", 0.97)
    m = StepStats.from_dict(a.to_dict()).merge(b)
    assert m.docs_in == 3 and m.dropped["r"]["docs"] == 3
    assert [e["text"] for e in m.examples["r"]] == ["one", "two"]  # capped, first task first
    assert m.hist["lang_score"][19] == 3


# ----------------------------------------------------------------------------- sanity / quality
def test_sanity_reasons():
    s = Sanity(max_chars=10_000, max_line_chars=1000)
    docs = [
        doc("   \n "),
        doc("x" * 2000),
        doc("ok " * 100 + "\n" + "y" * 1500),
        doc("\ufffd" * 50 + "a" * 50),
        doc(PROSE),
    ]
    out = run(s, docs)
    assert [d.text for d in out] == [PROSE]
    assert set(s.stats.dropped) == {"empty", "gigantic_line", "garbled"}


def test_gopher_quality_published_rules():
    step = gopher_quality(GopherQualityConfig())
    out = run(step, [doc(PROSE * 2), doc("word " * 10), doc("# " * 200 + PROSE)])
    assert len(out) == 1
    assert set(step.stats.dropped) == {"short_doc", "too_many_hashes"}


def test_gopher_repetition_drops_repeated_lines():
    step = gopher_repetition(GopherRepetitionConfig())
    repeated = "\n".join(["Buy cheap watches online today"] * 30)
    out = run(step, [doc(PROSE * 1), doc(repeated)])
    assert len(out) == 1 and step.stats.docs_dropped == 1


def test_c4_drop_mode_removes_lines_and_flag_mode_keeps_them():
    text = "\n".join(
        [PROSE.strip()] * 1
        + ["Click here", "Home | About", "We use cookies on this site."]
        + [f"This is sentence number {i} of a decent paragraph." for i in range(6)]
    )
    drop = c4(C4Config(mode="drop"))
    out = run(drop, [doc(text)])
    assert len(out) == 1 and "Click here" not in out[0].text and "cookies" not in out[0].text
    flag = c4(C4Config())  # default: flag
    out = run(flag, [doc(text), doc("{ code } only here.")])
    assert "Click here" in out[0].text and len(out) == 2
    assert flag.stats.counters["bytes_would_remove"] > 0 and flag.stats.flagged


def test_fineweb_rules():
    step = fineweb(FineWebConfig(mode="drop"))
    listy = "\n".join(f"item {i}" for i in range(40))
    out = run(step, [doc(PROSE.strip()), doc(listy)])
    assert len(out) == 1 and step.stats.docs_dropped == 1


def test_language_filter_and_per_language_threshold():
    de = (
        "Die Geschichte des Dorfes reicht bis ins zwölfte Jahrhundert zurück, als sich eine kleine Gruppe "
        "von Bauern am Ufer des Flusses niederließ und eine Mühle baute."
    )
    step = LanguageFilter(["en"])
    out = run(step, [doc(PROSE), doc(de)])
    assert [d.meta["lang"] for d in out] == ["en"] and out[0].meta["lang_score"] > 0.9
    assert step.stats.dropped["other_language"]["docs"] == 1
    strict = LanguageFilter(["en", "de"], thresholds={"de": 1.01})
    out = run(strict, [doc(PROSE), doc(de)])
    assert len(out) == 1 and strict.stats.dropped["low_score"]["docs"] == 1


# ----------------------------------------------------------------------------- undesirable content
def test_url_filter(tmp_path):
    bl = tmp_path / "domains.txt"
    bl.write_text("# comment\nbad.example\n")
    step = UrlFilter(blocked_domains=["spam.test"], blocklist_files=[str(bl)])
    docs = [
        doc("a", url="https://www.spam.test/x"),
        doc("b", url="http://sub.bad.example/page"),
        doc("c", url="https://good.org/a"),
        doc("d"),
        doc("e", url="https://good.org/porn-videos"),
    ]
    out = run(step, docs)
    assert [d.text for d in out] == ["c", "d"]
    assert step.stats.dropped["blocked_domain"]["docs"] == 2
    assert step.stats.counters["no_url"] == 1


def test_content_filter_words_and_regex():
    step = ContentFilter(words=["forbidden phrase"], regexes=[r"\bcasino\d+\b"])
    out = run(
        step,
        [
            doc("This has a Forbidden Phrase inside."),
            doc("visit casino777 now"),
            doc(PROSE),
            doc("unforbidden phrases are fine"),
        ],
    )
    assert len(out) == 2
    assert set(step.stats.dropped) == {"word_list", "regex"}


def test_pii_replaced_not_dropped():
    step = PIIScrub()
    text = (
        "Mail jane.doe@corp.com or call +1 (555) 123-4567 / 030 1234 5678. Server 8.8.4.4, "
        "local 192.168.0.1, version 3.11.2, date 2023-10-02, values 100 200 300."
    )
    out = run(step, [doc(text)])
    t = out[0].text
    assert "jane.doe" not in t and "123-4567" not in t and "1234 5678" not in t and "8.8.4.4" not in t
    assert "email@example.com" in t and "555-0100" in t and "192.0.2.1" in t
    assert "192.168.0.1" in t and "3.11.2" in t and "2023-10-02" in t and "100 200 300" in t
    c = step.stats.counters
    assert c["email_replaced"] == 1 and c["phone_replaced"] == 2 and c["ip_replaced"] == 1
    assert all("jane.doe" not in e["text"] for ex in step.stats.examples.values() for e in ex)


# ----------------------------------------------------------------------------- decontamination
def test_decontamination(tmp_path):
    ev = tmp_path / "eval.jsonl"
    q = "What is the capital city of the country that hosted the first modern olympic games in eighteen ninety six"
    ev.write_text(
        f'{{"question": "{q}", "answer": "Athens"}}\n{{"question": "Name two primary colours of light please"}}\n'
    )
    hashes, items, short = build_eval_ngrams([str(ev)], None, 13, 6)
    assert items == 2 and short == [7]
    step = Decontaminate(hashes, 13, short)
    leaked = doc("Quiz time! " + q.upper() + "? Answer below.")
    short_leak = doc(PROSE + " name two primary colours of light please " + PROSE)
    out = run(step, [leaked, short_leak, doc(PROSE)])
    assert [d.text for d in out] == [PROSE]
    assert step.stats.dropped["eval_ngram_overlap"]["docs"] == 1
    assert step.stats.dropped["eval_item_contained"]["docs"] == 1


# ----------------------------------------------------------------------------- dedup
def _edit(words, rate, rng):
    w = list(words)
    for _ in range(max(1, int(rate * len(w)))):
        i = rng.randrange(len(w))
        w[i] = rng.choice(["alpha", "beta", "gamma", "delta"])
    return w


def test_exact_hash_normalises():
    assert exact_hash("Hello,  World!\n") == exact_hash("hello world")
    assert exact_hash("hello world") != exact_hash("hello there world")


def test_minhash_lsh_finds_planted_near_duplicates():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    bases = [[rng.choice(vocab) for _ in range(300)] for _ in range(40)]
    docs = [" ".join(b) for b in bases]
    planted = [(i, len(docs) + k) for k, i in enumerate(range(0, 40, 4))]
    docs += [" ".join(_edit(bases[i], 0.01, rng)) for i, _ in planted]  # Jaccard ~0.9: P(found) > 0.999
    h = MinHasher()
    sigs = np.stack([h.signature(t) for t in docs])
    bands = np.stack([h.band_keys(s) for s in sigs])
    roots = lsh_clusters(bands)
    for i, j in planted:
        assert roots[j] == roots[i] == i
        assert jaccard_estimate(sigs[i], sigs[j]) > 0.7
    assert len(set(roots.tolist())) == 40  # no false merges among unrelated documents
    roots_v = lsh_clusters(bands, sigs, verify_threshold=0.99)
    assert len(set(roots_v.tolist())) > 40  # a strict verification undoes the merges


# ----------------------------------------------------------------------------- domains and mixing
def test_domain_rules():
    step = DomainLabel(DataConfig().domain.rules)
    docs = [
        doc(PROSE, url="https://en.wikipedia.org/wiki/Bread"),
        doc(PROSE, url="https://example.com/x"),
        doc("def f(x):\n    return x\nimport os\nclass A:\n    pass\n"),
        doc(PROSE),
    ]
    assert [step.label(d) for d in docs] == ["encyclopedia", "web", "code", "prose"]
    custom = DomainLabel([DomainRule(domain="legal", text_regex=r"\bpursuant\b")])
    assert custom.label(doc("pursuant to section 3")) == "legal"


def test_mix_plan_downsamples_to_weights():
    domains = np.array(["a"] * 80 + ["b"] * 20, dtype=object)
    sizes = np.ones(100)
    keys = np.arange(100, dtype=np.uint64)[::-1].copy()
    copies, summary = mix_plan(domains, sizes, keys, {"a": 0.5, "b": 0.5})
    assert copies[domains == "b"].sum() == 20 and copies[domains == "a"].sum() == 20
    assert copies.max() == 1
    up, _ = mix_plan(domains, sizes, keys, {"a": 0.5, "b": 0.5}, max_repeat=2)
    assert up[domains == "b"].sum() == 40 and up[domains == "a"].sum() == 40
    natural, _ = mix_plan(domains, sizes, keys, {})
    assert natural.sum() == 100
    typo, summary = mix_plan(domains, sizes, keys, {"a": 1.0, "b": 1.0, "c": 5.0})
    assert (typo == copies).all() and summary["missing"] == ["c"]
    only_a, _ = mix_plan(domains, sizes, keys, {"a": 1.0})
    assert only_a[domains == "b"].sum() == 0 and only_a[domains == "a"].sum() == 80


# ----------------------------------------------------------------------------- classifier
def test_quality_classifier_roundtrip(tmp_path):
    from lmforge.data.steps.classifier import QualityScorer

    rng = random.Random(1)
    good = [PROSE + f" Chapter {i} continues the story of the mill." for i in range(30)]
    bad = [
        " ".join(rng.choice(["buy", "cheap", "click", "now", "free", "win", "$$$"]) for _ in range(60))
        for _ in range(30)
    ]
    s = QualityScorer.train(good, bad, n_features=2**14, seed=0)
    scores = s.score(good[:5] + bad[:5])
    assert (scores[:5] > 0.5).all() and (scores[5:] < 0.5).all()
    s.save(tmp_path / "q.npz")
    s2 = QualityScorer.load(tmp_path / "q.npz")
    np.testing.assert_allclose(s2.score(good[:3]), s.score(good[:3]), rtol=1e-6)


def test_build_doc_steps_follows_config():
    names = [s.name for s in build_doc_steps(DataConfig())]
    assert names == [
        "extract",
        "sanity",
        "url_filter",
        "language",
        "gopher_quality",
        "gopher_repetition",
        "c4",
        "fineweb",
        "content_filter",
        "pii",
        "domain",
    ]
    cfg = DataConfig(c4={"enabled": False}, language={"enabled": False})
    steps = build_doc_steps(cfg)
    assert "c4" not in [s.name for s in steps] and "language" not in [s.name for s in steps]
    out = list(run_steps([doc(PROSE + PROSE2)], steps))
    assert len(out) == 1 and out[0].meta["domain"] == "prose"


@pytest.mark.parametrize(
    "bad",
    [
        {"nope": 1},
        {"c4": {"nope": 1}},
        {"output_format": "csv"},
        {"inputs": []},
        {"content_filter": {"regexes": ["("]}},
    ],
)
def test_config_rejects_bad_keys(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        DataConfig.model_validate(bad)


def test_config_defaults():
    cfg = DataConfig()
    assert cfg.inputs == ["builtin"] and cfg.text_field == "text" and cfg.val_fraction == 0.05
    assert cfg.output_format == "jsonl" and cfg.workers == 1 and cfg.executor == "local"
    assert (cfg.dedup.ngram, cfg.dedup.bands, cfg.dedup.rows) == (5, 14, 8) and cfg.decontam.ngram == 13
    assert all(getattr(cfg, k).enabled for k in ("extract", "language", "gopher_quality", "dedup", "pii"))
    assert cfg.c4.mode == "flag" and cfg.fineweb.mode == "flag" and cfg.gopher_quality.mode == "drop"


def test_pii_phones_ipv6_and_version_strings():
    step = PIIScrub()
    text = (
        "Call 1-800-555-0199 or 4155552671, Berlin +49 30 12345678, Paris +33 1 42 68 53 00. "
        "DNS 2001:4860:4860::8888 and loopback ::1; we run version 1.2.3.4 of the tool, v 2.0.1.7 too, "
        "at 12:30:45 on std::vector."
    )
    t = run(step, [doc(text)])[0].text
    for pii in ("1-800-555-0199", "4155552671", "12345678", "42 68 53 00", "2001:4860:4860::8888"):
        assert pii not in t, pii
    assert "version 1.2.3.4" in t and "v 2.0.1.7" in t and "::1" in t and "12:30:45" in t
    c = step.stats.counters
    assert c["phone_replaced"] == 4 and c["ip_replaced"] == 1


def test_decontamination_keys_from_question_fields_and_names_the_item(tmp_path):
    from lmforge.data.config import DecontamConfig
    from lmforge.data.steps.decontam import build_eval_index

    ev = tmp_path / "arc.jsonl"
    q = "Which property of a wave changes when the source of the sound moves quickly toward a listener"
    choice = "It depends on the motion of the source"
    ev.write_text(
        json.dumps({"question": "Name two primary colours of light"})
        + "\n"
        + json.dumps({"question": q, "choices": [choice, "Its amplitude"], "answer": "A"})
        + "\n"
    )
    fields = DecontamConfig().eval_fields
    ix = build_eval_index([str(ev)], fields, 13, 8)
    step = Decontaminate(ix.hashes, 13, ix.short, owners=ix.owner_labels())
    innocent = doc(PROSE + " Whether you hear it depends on the motion of the source, he said. " + PROSE)
    leaked = doc("Homework: " + q + "? Think about it.")
    out = run(step, [innocent, leaked])
    assert [d.text for d in out] == [innocent.text]
    assert leaked.meta["contaminated_by"] == "arc.jsonl:2"
    assert step.stats.examples["eval_ngram_overlap"][0]["matched"] == "arc.jsonl:2"
    assert step.stats.counters == {"matched:arc.jsonl:2": 1}
    # every string field (the old behaviour, now opt-in) keys the answer choice too
    ix_all = build_eval_index([str(ev)], ["*"], 13, 8)
    step_all = Decontaminate(ix_all.hashes, 13, ix_all.short, owners=ix_all.owner_labels())
    assert run(step_all, [doc(innocent.text)]) == []


def test_extracted_text_is_nfc():
    from lmforge.data.steps.extract import HtmlExtract

    para = "Cafe\u0301 au lait, nai\u0308ve questions and a long enough paragraph of ordinary prose. " * 4
    page = f"<html><head><title>t</title></head><body><article><p>{para}</p></article></body></html>"
    out = run(HtmlExtract(), [doc(page, format="html")])
    assert "Caf\u00e9 au lait, na\u00efve" in out[0].text and "e\u0301" not in out[0].text


def test_steps_built_from_their_own_config_in_registry_order():
    from lmforge.data.steps import DOC_STEP_ORDER, DOC_STEPS, build_doc_steps

    cfg = DataConfig()
    for name in DOC_STEP_ORDER:
        getattr(cfg, name).enabled = True
    built = [s.name for s in build_doc_steps(cfg)]
    assert built == [n for n in DOC_STEP_ORDER if n != "decontam"]  # no eval index: nothing to do
    hashes = np.array([1, 2], dtype=np.uint64)
    with_index = build_doc_steps(cfg, (hashes, [], ["a:1", "b:2"]))
    assert [s.name for s in with_index] == list(DOC_STEP_ORDER)
    assert len(DOC_STEPS) == len(DOC_STEP_ORDER)
    cfg.pii.phone_region = "DE"
    pii = next(s for s in build_doc_steps(cfg) if s.name == "pii")
    out = run(pii, [doc("Ruf an: 030 12345678 bitte")])
    assert "12345678" not in out[0].text


def test_gopher_datatrove_word_splitting_mode():
    code_heavy = " ".join(
        ["the setup() of f(x) and g(y) is run(z) with h(w) to (a) check (b) that k(v);"] * 20
    )
    prose = PROSE
    ws = quality.gopher_quality(GopherQualityConfig(), 3)
    dt = quality.gopher_quality(GopherQualityConfig(words="datatrove"), 3)
    assert run(ws, [doc(code_heavy)]) and run(ws, [doc(prose)])
    assert run(dt, [doc(prose)])  # ordinary prose passes either way
    assert run(dt, [doc(code_heavy)]) == []  # punctuation tokens: short, non-alphabetic words
    assert dt.stats.dropped == {"below_avg_threshold": {"docs": 1, "bytes": len(code_heavy)}}
    words = quality._word_tokenizer("datatrove").word_tokenize("Hello, world. It's setup().")
    assert words == ["Hello", ",", "world", ".", "It", "'s", "setup", "(", ")", "."]
