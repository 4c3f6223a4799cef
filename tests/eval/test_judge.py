"""Pairwise judging: position swap cancels a biased judge, win rate and interval, reward-model and
LM judges, and the round trip through a human rating sheet."""

import csv
import io
import json

import pytest

from lmforge.errors import DataError
from lmforge.eval.judge import LMJudge, RewardModelJudge, compare, export_sheet, import_verdicts, summarize
from tests.factories import single_thread, tiny_model, tiny_tokenizer

PROMPTS = [f"prompt {i}" for i in range(20)]
GOOD = [f"a long careful answer number {i}" for i in range(20)]
BAD = [f"meh {i}" for i in range(20)]


class FirstLovingJudge:
    """Prefers the better answer a little and whatever is shown first a lot."""

    def prefer_many(self, items):
        return [min(1.0, max(0.0, 0.75 + (0.1 if len(a) > len(b) else -0.1))) for _, a, b in items]


def test_swap_removes_position_bias():
    one_way = compare(PROMPTS, BAD, GOOD, FirstLovingJudge(), swap=False)
    assert one_way["win_rate"] == 1.0  # biased: the worse model "wins" by being shown first
    both = compare(PROMPTS, BAD, GOOD, FirstLovingJudge(), swap=True)
    assert both["win_rate"] == 0.0 and both["losses"] == 20
    assert both["first_position_bias"] == pytest.approx(0.25)
    lo, hi = both["ci95"]
    assert lo == 0.0 and 0 < hi < 0.2


def test_reward_judge_and_ties():
    judge = RewardModelJudge(lambda p, a: float(len(a)))
    res = compare(PROMPTS, GOOD, BAD, judge)
    assert res["wins"] == 20 and res["first_position_bias"] == pytest.approx(0.0)
    same = compare(PROMPTS, GOOD, GOOD, judge)
    assert same["ties"] == 20 and same["win_rate"] == 0.5
    s = summarize(["a"] * 6 + ["b"] * 2 + ["tie"] * 2)
    assert s["win_rate"] == pytest.approx(0.7) and s["ci95"][0] < 0.7 < s["ci95"][1]
    with pytest.raises(DataError, match="one answer per prompt"):
        compare(PROMPTS, GOOD[:3], BAD, judge)


def test_lm_judge_is_a_probability():
    with single_thread():
        tok = tiny_tokenizer()
        judge = LMJudge(tiny_model(tok.vocab_size, max_seq_len=128), tok)
        p = judge.prefer_many([("2+2?", "four", "five"), ("2+2?", "five", "four")])
        assert all(0 < x < 1 for x in p)
        res = compare(["2+2?"], ["four"], ["five"], judge)
        assert res["n"] == 1 and res["items"][0]["verdict"] in ("a", "b", "tie")


@pytest.mark.parametrize("fmt", ["csv", "html"])
def test_rating_sheet_round_trip(tmp_path, fmt):
    out = tmp_path / f"sheet.{fmt}"
    export_sheet(PROMPTS[:6], GOOD[:6], BAD[:6], out, names=("good", "bad"), seed=1)
    assert out.exists() and (tmp_path / f"sheet.{fmt}.key.json").exists()
    text = out.read_text()
    if fmt == "html":
        assert "<script>" in text and "http" not in text and text.count("class='item'") == 6
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
        assert [r["prompt"] for r in rows] == PROMPTS[:6]
        assert "good" not in text and "bad" not in text  # raters are blind to the models
    # a rater who always picks the longer answer, leaves one blank and calls one a tie
    key = json.loads((tmp_path / f"sheet.{fmt}.key.json").read_text())["order"]
    filled = tmp_path / "verdicts.csv"
    lines = ["id,verdict,comment"]
    for i in range(6):
        rid = f"q{i:04d}"
        v = "1" if key[rid] == "a_first" else "2"
        lines.append(f"{rid},{'' if i == 4 else 'tie' if i == 5 else v},")
    filled.write_text("\n".join(lines) + "\n")
    res = import_verdicts(filled, tmp_path / f"sheet.{fmt}.key.json")
    assert (res["model_a"], res["wins"], res["losses"], res["ties"], res["unrated"]) == ("good", 4, 0, 1, 1)
    assert res["win_rate"] == pytest.approx(0.9)
    filled.write_text("id,verdict\nq0000,maybe\n")
    with pytest.raises(DataError, match="verdicts.csv:2: verdict 'maybe' not understood"):
        import_verdicts(filled, tmp_path / f"sheet.{fmt}.key.json")
    filled.write_text("id,verdict\nq9999,1\n")
    with pytest.raises(DataError, match="not in the key"):
        import_verdicts(filled, tmp_path / f"sheet.{fmt}.key.json")
