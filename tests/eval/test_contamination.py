"""Contamination: n-gram overlap with a corpus, and the Oren et al. permutation test on tiny models
trained in the test -- one on the ordered eval set (small p), one that never saw it (large p)."""

import pytest

from lmforge.errors import DataError
from lmforge.eval.contamination import ngram_overlap, permutation_test, task_texts
from lmforge.eval.loglik import Scorer
from lmforge.eval.tasks import Doc, Task
from tests.factories import random_sentences, tiny_model, tiny_tokenizer, train_on

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


def test_ngram_overlap_finds_leaked_items():
    items = random_sentences(30, seed=11, words_per=(14, 18))
    train = [
        "Unrelated text about nothing in particular, repeated. " * 5,
        "Some preamble. " + items[3] + " And then " + items[17][:-1] + " more words here.",
        " ".join(items[25].split()[:10]),
    ]  # only 10 words of item 25: no 13-gram
    res = ngram_overlap(train, items, n=13, ids=[f"i{k}" for k in range(30)])
    assert res["contaminated"] == 2 and {e["item"] for e in res["examples"]} == {"i3", "i17"}
    assert res["per_item"][3] == 1.0 and res["examples"][0]["first_train_doc"] == 1
    assert res["per_item"][25] == 0.0  # 10 shared words make no shared 13-gram
    # an item shorter than n words is matched whole (when long enough to judge) or counted as too short
    short = ngram_overlap(
        ["alpha beta gamma delta epsilon zeta eta theta iota"],
        ["beta gamma delta epsilon zeta eta theta iota", "too short"],
        n=13,
    )
    assert short["contaminated"] == 1 and short["too_short"] == 1
    # threshold: only items with at least that share of n-grams seen
    half = ngram_overlap([" ".join(items[5].split()[:14])], [items[5]], n=13, threshold=0.9)
    assert half["contaminated"] == 0 and half["per_item"][0] > 0


def test_task_texts_include_the_answer():
    t = Task("t", "multiple_choice", [Doc("Question: sky?\nAnswer:", ["blue", "red"], 0)])
    assert task_texts(t) == ["Question: sky?\nAnswer: blue"]


@pytest.fixture(scope="module")
def ordered_set():
    examples = random_sentences(48, seed=1)
    tok = tiny_tokenizer()

    def rows(exs):
        ids = [tok.bos_id] + tok.encode("\n".join(exs))
        return [ids[i : i + 65] for i in range(0, len(ids) - 64, 16)]

    seen = train_on(tiny_model(tok.vocab_size, d_model=64, init_std=0.02), rows(examples), steps=250)
    unseen = train_on(
        tiny_model(tok.vocab_size, d_model=64, init_std=0.02), rows(random_sentences(48, seed=2)), steps=250
    )
    return examples, tok, seen, unseen


def test_permutation_test_detects_ordered_training(ordered_set):
    examples, tok, seen, unseen = ordered_set
    hit = permutation_test(Scorer(seen, tok), examples, shard_size=4, n_permutations=10, seed=0)
    miss = permutation_test(Scorer(unseen, tok), examples, shard_size=4, n_permutations=10, seed=0)
    assert hit["shards"] == 12 and hit["p_value"] < 1e-3 and hit["mean_logprob_gain"] > 0
    assert miss["p_value"] > 0.05
    assert hit["canonical_rank_mean"] > 0.9


def test_permutation_test_bad_input(ordered_set):
    examples, tok, seen, _ = ordered_set
    with pytest.raises(DataError, match="at least 4"):
        permutation_test(Scorer(seen, tok), examples[:3])
    with pytest.raises(DataError, match="shard"):
        permutation_test(Scorer(seen, tok), examples[:5], shard_size=4)
