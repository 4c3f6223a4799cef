"""Task readers (shared data formats, task specs), malformed items, few-shot prompts, and the
multiple-choice metrics against a brute-force computation."""

import json

import numpy as np
import pytest
import torch

from lmforge.errors import DataError
from lmforge.eval.loglik import Scorer
from lmforge.eval.readers import builtin_cloze_task, load_task
from lmforge.eval.tasks import Doc, Task, evaluate_multiple_choice
from tests.conftest import SHARED_DATA
from tests.factories import PARAGRAPH, tiny_model, tiny_tokenizer

SHARED = SHARED_DATA
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared/data not present")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@needs_shared
def test_shared_data_readers():
    mmlu = load_task(f"mmlu:{SHARED / 'mmlu' / 'dev'}")
    assert len(mmlu.docs) == 285 and mmlu.docs[0].choices == ["A", "B", "C", "D"] and not mmlu.skipped
    # MMLU few-shot examples come from the same subject, never the item itself
    shots = mmlu.fewshot(0, 4)
    assert len(shots) == 4 and all(s.group == mmlu.docs[0].group and s is not mmlu.docs[0] for s in shots)
    assert mmlu.prompt(0, 2).startswith(
        "The following are multiple choice questions (with answers) about abstract algebra."
    )
    assert mmlu.prompt(0, 2) == mmlu.prompt(0, 2)  # fixed seed: the same prompt every time
    arc = load_task(f"arc:{SHARED / 'arc' / 'arc_easy_validation.jsonl'}")
    assert len(arc.docs) == 570 and {len(d.choices) for d in arc.docs} >= {4}
    digit_keyed = [d for d in arc.docs if d.id and d.gold is not None]
    assert len(digit_keyed) == 570
    hs = load_task(f"hellaswag:{SHARED / 'hellaswag' / 'hellaswag_val_first500.jsonl'}")
    assert len(hs.docs) == 500 and hs.docs[0].query.startswith(
        "Roof shingle removal: A man is sitting on a roof."
    )
    assert hs.docs[0].gold == 3
    gsm = load_task(f"gsm8k:{SHARED / 'gsm8k'}")
    assert gsm.kind == "generate" and len(gsm.docs) == 300 and gsm.docs[0].answer == "18"
    assert len(gsm.fewshot_docs) == 7473


def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return p


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}}, "missing_answer"),
        (
            {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"},
            "answer_not_in_labels",
        ),
        ({"question": "q", "choices": {"text": [], "label": []}, "answerKey": "A"}, "no_choices"),
        (
            {"question": "q", "choices": {"text": ["a", " "], "label": ["A", "B"]}, "answerKey": "A"},
            "empty_choice",
        ),
        ('{"question": "q", "choices": ', "invalid_json"),
    ],
)
def test_malformed_arc_items_error_or_skip(tmp_path, bad, reason):
    good = {"question": "Which?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"}
    p = _write(tmp_path, "arc.jsonl", [good, bad, good])
    with pytest.raises(DataError, match=rf"arc.jsonl:2: .*\[{reason}\]"):
        load_task(f"arc:{p}")
    t = load_task(f"arc:{p}", on_error="skip")
    assert len(t.docs) == 2 and t.skipped == {reason: 1}


def test_malformed_mmlu_and_hellaswag(tmp_path):
    p = tmp_path / "x_dev.csv"
    p.write_text("question,choice0,choice1,choice2,choice3,answer\nq1,a,b,c,d,2\nq2,a,b,c,d,7\nq3,a,b,c,d,\n")
    with pytest.raises(DataError, match=r"x_dev.csv:3: answer index 7 is out of range for 4 choices"):
        load_task(f"mmlu:{p}")
    t = load_task(f"mmlu:{p}", on_error="skip")
    assert len(t.docs) == 1 and t.skipped == {"answer_out_of_range": 1, "missing_answer": 1}
    hs = _write(tmp_path, "hs.jsonl", [{"ctx": "c", "endings": ["a", "b"], "label": 5}])
    with pytest.raises(DataError, match="out of range"):
        load_task(f"hellaswag:{hs}")
    with pytest.raises(DataError, match="no usable items"):
        load_task(f"hellaswag:{hs}", on_error="skip")


def test_task_spec_yaml(tmp_path):
    _write(
        tmp_path,
        "capitals.jsonl",
        [
            {"country": "France", "options": ["Paris", "Rome", "Oslo"], "label": "A"},
            {"country": "Italy", "options": ["Paris", "Rome", "Oslo"], "label": "Rome"},
            {"country": "Norway", "options": ["Paris", "Rome", "Oslo"], "label": 2},
        ],
    )
    spec = tmp_path / "capitals.yaml"
    spec.write_text(
        'name: capitals\ndata: capitals.jsonl\nprompt: "Q: What is the capital of {country}?\\nA:"\n'
        "choices: options\nanswer: label\nnum_fewshot: 1\nseed: 7\n"
    )
    t = load_task(str(spec))
    assert t.name == "capitals" and [d.gold for d in t.docs] == [0, 1, 2] and t.num_fewshot == 1
    p = t.prompt(0)
    assert p.endswith("Q: What is the capital of France?\nA:") and p.count("Q:") == 2
    # bad specs name the problem
    (tmp_path / "bad.yaml").write_text("name: x\ndata: capitals.jsonl\nanswr: label\n")
    with pytest.raises(DataError, match="unknown key"):
        load_task(str(tmp_path / "bad.yaml"))
    (tmp_path / "bad2.yaml").write_text(
        'data: capitals.jsonl\nprompt: "{capital}"\nchoices: options\nanswer: label\n'
    )
    with pytest.raises(DataError, match="needs field 'capital'"):
        load_task(str(tmp_path / "bad2.yaml"))
    # generative spec with inline examples
    (tmp_path / "gen.yaml").write_text(
        'type: generate\nexamples:\n  - {q: "2+2", a: "4"}\n'
        'prompt: "{q}="\nanswer: a\nextract: number\nuntil: ["\\n"]\n'
    )
    g = load_task(str(tmp_path / "gen.yaml"))
    assert g.kind == "generate" and g.docs[0].answer == "4" and g.until == ["\n"]


def test_multiple_choice_metrics_match_brute_force():
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size, max_seq_len=24)
    docs = [
        Doc("The quick brown", ["fox", "lazy dog", "apple river stone"], 0, id="a"),
        Doc("A list is a", ["mutable sequence", "fox", "zebra"], 1, id="b"),
        Doc(
            "apple river stone cloud music garden silver window forest candle paper bridge ocean",
            ["tiger", "lazy dog"],
            1,
            id="c",
        ),  # prompt longer than the context: cut from the left
        Doc("Question: what is two plus two? Answer:", ["four", "two"], 0, id="d"),
    ]
    task = Task("t", "multiple_choice", docs, num_fewshot=1, seed=3)
    sc = Scorer(model, tok)
    res = evaluate_multiple_choice(sc, task, keep_predictions=True)
    acc, accn = [], []
    for i, d in enumerate(docs):
        prompt = task.prompt(i)
        lls = []
        for c in d.choices:
            ctx, cont = sc.encode_pair(prompt, " " + c)
            full = (ctx + cont)[-25:]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([full[:-1]]))[0], -1)
            lls.append(sum(float(logp[len(full) - 1 - len(cont) + j, t]) for j, t in enumerate(cont)))
        lls = np.array(lls)
        acc.append(np.argmax(lls) == d.gold)
        accn.append(np.argmax(lls / np.array([len(c) for c in d.choices])) == d.gold)
        assert np.allclose(res["predictions"][i]["loglikelihoods"], lls, atol=1e-4)
    assert res["acc"]["value"] == np.mean(acc) and res["acc_norm"]["value"] == np.mean(accn)
    assert res["truncated"] >= 1 and res["n"] == 4
    assert res["chance"] == pytest.approx(np.mean([1 / 3, 1 / 3, 1 / 2, 1 / 2]))
    lo, hi = res["acc"]["ci95"]
    assert 0 <= lo <= res["acc"]["value"] <= hi <= 1
    # a choice longer than the whole context is a counted skip
    long = Task("t2", "multiple_choice", [Doc("x", ["apple " * 40, "b"], 0), Doc("y", ["a", "b"], 1)])
    r2 = evaluate_multiple_choice(Scorer(model, tok), long)
    assert r2["n"] == 1 and r2["skipped"] == {"continuation_too_long": 1}


def test_builtin_cloze_task_is_deterministic():
    texts = [
        PARAGRAPH + " Every module has a docstring that explains what the module provides to its users. "
        "The interpreter reads the source file and compiles it into byte code before running it. "
        "A dictionary maps hashable keys to arbitrary values and keeps insertion order. "
        "The socket module gives access to the operating system networking interface for programs. "
        "Threads share memory with each other while processes each have their own memory space."
    ] * 2
    a = builtin_cloze_task(texts, n=10, seed=5)
    b = builtin_cloze_task(texts, n=10, seed=5)
    assert [(d.query, d.choices, d.gold) for d in a.docs] == [(d.query, d.choices, d.gold) for d in b.docs]
    assert all(len(d.choices) == 4 and len(set(d.choices)) == 4 for d in a.docs)
    with pytest.raises(DataError, match="builtin"):
        load_task("builtin")
    with pytest.raises(DataError, match="not understood"):
        load_task("nonsense")


def test_numeric_choices_resolve_the_answer_as_an_index(tmp_path):
    # MMLU abstract algebra: choices [8, 2, 24, 120], answer "2" is index 2 (24), not the choice "2"
    _write(
        tmp_path,
        "aa.jsonl",
        [
            {"question": "Order of S_4?", "choices": [8, 2, 24, 120], "answer": "2"},
            {"question": "Order of Z_2?", "choices": [8, 2, 24, 120], "answer": 1},
            {"question": "By text", "choices": ["x", "y", "120"], "answer": "120"},  # not an index: the text
        ],
    )
    t = load_task(str(tmp_path / "aa.jsonl"))
    assert [d.gold for d in t.docs] == [2, 1, 2]


def _mmlu_csv(path, subject, split, n):
    path.mkdir(parents=True, exist_ok=True)
    rows = [f"{split} question {i} of {subject},a{i},b{i},c{i},d{i},{'ABCD'[i % 4]}" for i in range(n)]
    (path / f"{subject}_{split}.csv").write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize("layout", ["folders", "flat"])
def test_mmlu_standard_layout_evaluates_test_with_the_first_five_dev_shots(tmp_path, layout):
    for subject in ("anatomy", "virology"):
        for split, n in (("dev", 6), ("val", 2), ("test", 3)):
            _mmlu_csv(tmp_path / (split if layout == "folders" else ""), subject, split, n)
    t = load_task(f"mmlu:{tmp_path}")
    assert len(t.docs) == 6 and all(d.query.startswith("test question") for d in t.docs)  # dev not merged
    # the harness's MMLU prompt: description, the subject's first five dev items in order, the item
    desc = "The following are multiple choice questions (with answers) about virology.\n\n"
    shots = "".join(
        f"dev question {i} of virology\nA. a{i}\nB. b{i}\nC. c{i}\nD. d{i}\nAnswer: {'ABCD'[i % 4]}\n\n"
        for i in range(5)
    )
    item = "test question 1 of virology\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer:"
    i = next(k for k, d in enumerate(t.docs) if d.query == item)
    assert t.prompt(i, 5) == desc + shots + item
    assert (
        t.prompt(i, 2) == desc + shots.split("\n\n", 2)[0] + "\n\n" + shots.split("\n\n")[1] + "\n\n" + item
    )
    # pointing at the test split alone still takes its shots from dev
    one = load_task(f"mmlu:{tmp_path / 'test' if layout == 'folders' else tmp_path / 'virology_test.csv'}")
    assert len(one.docs) == (6 if layout == "folders" else 3)
    j = next(k for k, d in enumerate(one.docs) if d.query == item)
    assert one.prompt(j, 5) == desc + shots + item


@needs_shared
def test_arc_common_shapes_read_the_same_items(tmp_path):
    recs = [
        json.loads(x) for x in (SHARED / "arc" / "arc_easy_validation.jsonl").read_text().splitlines()[:40]
    ]
    ai2 = [
        {
            "id": r["id"],
            "question": {
                "stem": r["question"],
                "choices": [
                    {"label": l, "text": t} for l, t in zip(r["choices"]["label"], r["choices"]["text"])
                ],
            },
            "answerKey": r["answerKey"],
        }
        for r in recs
    ]
    options = [
        {
            "id": r["id"],
            "question": r["question"],
            "options": [{"label": l, "text": t} for l, t in zip(r["choices"]["label"], r["choices"]["text"])],
            "answer": r["answerKey"],
        }
        for r in recs
    ]
    want = load_task(f"arc:{_write(tmp_path, 'hf.jsonl', recs)}").docs
    for shape, data in (("ai2", ai2), ("options", options)):
        got = load_task(f"arc:{_write(tmp_path, shape + '.jsonl', data)}").docs
        assert [(d.query, d.choices, d.gold, d.id) for d in got] == [
            (d.query, d.choices, d.gold, d.id) for d in want
        ]
    plain = _write(tmp_path, "plain.jsonl", [{"question": "q", "options": ["x", "y"], "answer": 1}])
    assert load_task(f"arc:{plain}").docs[0].gold == 1


def test_a_missing_field_names_the_shapes_a_reader_accepts(tmp_path):
    arc = _write(tmp_path, "a.jsonl", [{"question": "q", "answers": ["x", "y"], "answerKey": "A"}])
    with pytest.raises(
        DataError, match=r"a.jsonl:1: field 'choices' \(or 'options'\) is missing\. ARC items look like"
    ):
        load_task(f"arc:{arc}")
    hs = _write(tmp_path, "h.jsonl", [{"context": "c", "endings": ["a", "b"], "label": 0}])
    with pytest.raises(DataError, match=r"field 'ctx' is missing\. HellaSwag items look like"):
        load_task(f"hellaswag:{hs}")
    gsm = _write(tmp_path, "g.jsonl", [{"problem": "1+1?", "answer": "2"}])
    with pytest.raises(DataError, match=r"field 'question' is missing\. GSM8K items look like"):
        load_task(f"gsm8k:{gsm}")
    bare = _write(tmp_path, "g2.jsonl", [{"question": "1+1?", "answer": "2"}])
    assert load_task(f"gsm8k:{bare}").docs[0].answer == "2"


def test_unique_keys():
    from lmforge.eval.evaluate import unique_keys

    def t(name, source):
        return Task(name, "multiple_choice", [], source=source)

    tasks = [t("arc", "/d/A.jsonl"), t("arc", "/e/B.jsonl"), t("mmlu", "/m"), t("arc", "/x/A.jsonl")]
    assert unique_keys(tasks) == ["arc-A", "arc-B", "mmlu", "arc-A-2"]
    assert unique_keys([t("gsm8k", "/g/test.jsonl")]) == ["gsm8k"]
