"""`lmforge tasks | perplexity | contamination | judge` through their argparse wiring."""

import argparse
import json

import pytest

from lmforge.errors import LMForgeError
from lmforge.eval import cli
from lmforge.model.hf import save_pretrained
from tests.factories import random_sentences, single_thread, tiny_model, tiny_tokenizer


def run(argv):
    p = argparse.ArgumentParser(prog="lmforge")
    cli.add_parser(p.add_subparsers(dest="command"))
    a = p.parse_args(argv)
    with single_thread():
        return a.func(a)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    tok = tiny_tokenizer()
    save_pretrained(tiny_model(tok.vocab_size), d, bos_id=tok.bos_id, eos_id=tok.eos_id)
    tok.save(d)
    return d


def test_tasks_and_perplexity(model_dir, tmp_path, capsys):
    items = tmp_path / "items.jsonl"
    items.write_text(
        "".join(
            json.dumps({"query": f"Q{i}:", "choices": ["apple", "river stone"], "answer": i % 2}) + "\n"
            for i in range(6)
        )
    )
    out = tmp_path / "res.json"
    assert run(["tasks", "--model", str(model_dir), "--task", str(items), "--out", str(out)]) == 0
    res = json.loads(out.read_text())["items"]
    assert res["n"] == 6 and res["chance"] == 0.5
    assert "acc" in capsys.readouterr().out
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": s}) + "\n" for s in random_sentences(5, seed=0)))
    assert run(["perplexity", "--model", str(model_dir), str(docs), "--out", str(tmp_path / "p.json")]) == 0
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["docs"] == 5 and p["word_ppl"] > p["ppl"] > 1


def test_contamination_and_judge_commands(model_dir, tmp_path, capsys):
    sents = random_sentences(8, seed=4, words_per=(14, 16))
    items = tmp_path / "items.jsonl"
    items.write_text(
        "".join(json.dumps({"query": s, "choices": ["yes", "no"], "answer": 0}) + "\n" for s in sents)
    )
    corpus = tmp_path / "train.jsonl"
    corpus.write_text(json.dumps({"text": "intro " + sents[2] + " outro"}) + "\n")
    assert (
        run(
            [
                "contamination",
                "ngram",
                "--train",
                str(corpus),
                "--task",
                str(items),
                "-n",
                "8",
                "--out",
                str(tmp_path / "ng.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "ng.json").read_text())["contaminated"] == 1
    assert (
        run(
            [
                "contamination",
                "permutation",
                "--model",
                str(model_dir),
                "--task",
                str(items),
                "--shard-size",
                "2",
                "--permutations",
                "3",
            ]
        )
        == 0
    )
    assert "p = " in capsys.readouterr().out

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"Say something about {w}."}) + "\n" for w in ("apple", "river"))
    )
    answers = tmp_path / "a.jsonl"
    answers.write_text('{"answer": "apples are red"}\n{"answer": "rivers flow"}\n')
    assert (
        run(
            [
                "judge",
                "compare",
                "--prompts",
                str(prompts),
                "--a",
                str(answers),
                "--b",
                str(model_dir),
                "--judge-model",
                str(model_dir),
                "--max-new-tokens",
                "4",
                "--out",
                str(tmp_path / "j.json"),
            ]
        )
        == 0
    )
    j = json.loads((tmp_path / "j.json").read_text())
    assert j["n"] == 2 and "first_position_bias" in j
    sheet = tmp_path / "sheet.csv"
    assert (
        run(
            [
                "judge",
                "export",
                "--prompts",
                str(prompts),
                "--a",
                str(answers),
                "--b",
                str(answers),
                "--out",
                str(sheet),
            ]
        )
        == 0
    )
    assert run(["judge", "import", str(sheet)]) == 0  # nothing rated yet
    assert "2 unrated" in capsys.readouterr().out
    with pytest.raises(LMForgeError, match="one of --judge-model"):
        run(["judge", "compare", "--prompts", str(prompts), "--a", str(answers), "--b", str(answers)])
    short = tmp_path / "short.jsonl"
    short.write_text('{"answer": "x"}\n')
    with pytest.raises(LMForgeError, match="1 answers for 2 prompts"):
        run(
            [
                "judge",
                "export",
                "--prompts",
                str(prompts),
                "--a",
                str(short),
                "--b",
                str(answers),
                "--out",
                str(sheet),
            ]
        )


def test_two_tasks_of_one_type_keep_separate_keys_and_predictions(model_dir, tmp_path, capsys):
    for name, n in (("A", 4), ("B", 6)):
        arc = {"choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "A"}
        lines = [json.dumps({"question": f"{name}{i}?", **arc}) + "\n" for i in range(n)]
        (tmp_path / f"{name}.jsonl").write_text("".join(lines))
    out = tmp_path / "res.json"
    argv = ["tasks", "--model", str(model_dir), "--task", f"arc:{tmp_path / 'A.jsonl'}"]
    argv += ["--task", f"arc:{tmp_path / 'B.jsonl'}", "--out", str(out)]
    assert run(argv) == 0
    res = json.loads(out.read_text())
    assert {k: v["n"] for k, v in res.items()} == {"arc-A": 4, "arc-B": 6}
    preds = tmp_path / "res.predictions"
    rows = [json.loads(x) for x in (preds / "arc-B.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and rows[0]["gold"] == 0 and len(rows[0]["loglikelihoods"]) == 2
    assert (preds / "arc-A.jsonl").exists() and "per-item predictions" in capsys.readouterr().out
    # --predictions DIR without --out
    assert (
        run(
            [
                "tasks",
                "--model",
                str(model_dir),
                "--task",
                f"arc:{tmp_path / 'A.jsonl'}",
                "--predictions",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    assert len((tmp_path / "p" / "arc.jsonl").read_text().splitlines()) == 4
