"""Generative tasks: pass@k estimator, answer extraction, stop strings, and exact match of a tiny
model that memorised its answers."""

import itertools
import math
import random

import pytest

from lmforge.errors import ConfigError
from lmforge.eval.generative import (
    answers_match,
    cut_at_stop,
    evaluate_generative,
    extract_answer,
    generate_texts,
)
from lmforge.eval.tasks import Doc, Task
from lmforge.stats import pass_at_k, wilson
from tests.factories import WORDS, tiny_model, tiny_tokenizer, train_on

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


def test_pass_at_k_is_unbiased():
    # brute force: the probability that a random k-subset of the n samples holds a correct one
    for n, c, k in [(5, 0, 1), (5, 1, 1), (5, 2, 3), (10, 3, 5), (4, 4, 2), (6, 5, 6)]:
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(i < c for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute)
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    assert pass_at_k(200, 13, 1) == pytest.approx(13 / 200)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)


def test_wilson_interval():
    lo, hi = wilson(0, 10)
    assert lo == 0 and 0.25 < hi < 0.35
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.404, abs=1e-3) and hi == pytest.approx(0.596, abs=1e-3)


def test_answer_extraction():
    sol = "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $18.\n#### 18"
    assert extract_answer(sol, "number") == "18"
    assert extract_answer("so the answer is 1,234.", "number") == "1,234"
    assert answers_match("1,234", "1234", "number") and answers_match("$18.00", "18", "number")
    assert not answers_match("17", "18", "number") and not answers_match(None, "18", "number")
    assert extract_answer("  Paris\nmore text", "text") == "Paris" and answers_match("paris.", "Paris")
    assert extract_answer("The answer is (C).", r"regex:\(([A-D])\)") == "C"
    assert cut_at_stop("abc\n\nQuestion: x", ["Question:", "\n\n"]) == "abc"


@pytest.fixture(scope="module")
def qa_model():
    rng = random.Random(0)
    pairs = [(w, rng.choice(WORDS)) for w in WORDS[:8]]
    tok = tiny_tokenizer()
    text = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in pairs)
    ids = [tok.bos_id] + tok.encode(text * 3)  # every pair in the middle of some windows
    rows = [ids[i : i + 49] for i in range(0, len(ids) - 48, 2)]
    model = train_on(tiny_model(tok.vocab_size, d_model=48, max_seq_len=48, init_std=0.02), rows, steps=150)
    return model, tok, pairs


def test_generation_stops_and_memorised_answers_match(qa_model):
    model, tok, pairs = qa_model
    docs = [Doc(f"Q: {q}\nA:", answer=a, id=q) for q, a in pairs]
    task = Task("qa", "generate", docs, until=["\n"], max_new_tokens=8, extract="text")
    res = evaluate_generative(model, tok, task, keep_predictions=True)
    assert res["n"] == 8 and res["exact_match"]["value"] >= 0.875
    assert all("\n" not in c for p in res["predictions"] for c in p["completions"])
    # pass@k from sampled answers: deterministic for a seed, and pass@k grows with k
    r1 = evaluate_generative(model, tok, task, n_samples=4, temperature=1.0, ks=(1, 4), seed=3)
    r2 = evaluate_generative(model, tok, task, n_samples=4, temperature=1.0, ks=(1, 4), seed=3)
    assert r1["pass@1"] == r2["pass@1"] and r1["pass@4"]["value"] >= r1["pass@1"]["value"]
    with pytest.raises(ConfigError, match="temperature"):
        evaluate_generative(model, tok, task, n_samples=4, temperature=0.0)
    with pytest.raises(ConfigError, match="n_samples"):
        evaluate_generative(model, tok, task, n_samples=2, temperature=1.0, ks=(5,))


def test_long_prompts_are_cut_and_counted(qa_model):
    model, tok, _ = qa_model
    outs, stats = generate_texts(model, tok, ["apple " * 100, "Q: apple\nA:"], max_new_tokens=4, until=["\n"])
    assert stats["truncated"] == 1 and len(outs) == 2
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate_texts(model, tok, ["x"], max_new_tokens=48)


def test_greedy_texts_equal_the_static_batch_sampler(qa_model):
    """generate_texts runs on the serving engine; its greedy texts equal the former path (one
    left-padded static batch through `model.generate`, cut at the first stop string)."""
    from lmforge.model.generate import SamplingParams, generate

    model, tok, pairs = qa_model
    prompts = [f"Q: {q}\nA:" for q, _ in pairs] + ["Q: x", "apple apple apple apple"]
    got, _ = generate_texts(model, tok, prompts, max_new_tokens=10, until=["\n"], batch_size=3)
    stops = {tok.eos_id, tok.end_id}
    ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
    old = generate(model, ids, SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=list(stops)))
    assert got == [cut_at_stop(tok.decode(o), ["\n"]) for o in old]
    assert any(g for g in got)  # not all empty
