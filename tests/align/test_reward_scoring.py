"""One reward-model scoring function outside training: (prompt, answer) scored as the chat turns
the reward stage trains on (equal to the training-time scores of the same pairs), the judge and
`lmforge judge compare --reward-model` going through it, and foreign HF reward models run by
transformers (chat template when they have one, else the text pair)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.align.preference import encode_pairs
from lmforge.align.reward import RewardModel, pair_scores, save_reward_model
from lmforge.align.reward_scoring import RewardScorer, conversation
from lmforge.chat import ChatFormat
from lmforge.errors import DataError
from lmforge.eval.judge import RewardModelJudge
from tests.conftest import save_pairs_and_base, synthetic_pairs

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("rs")
    model_dir, _, tok, lm = save_pairs_and_base(d)
    rm = RewardModel.from_causal_lm(lm, seed=3).eval()
    return save_reward_model(
        rm, d / "rm", tokenizer_dir=model_dir, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id
    )


def test_scores_equal_the_reward_stage_training_scores(rm_dir):
    from lmforge.align.reward import load_reward_model

    recs = synthetic_pairs()[:6]
    fmt = ChatFormat.from_dir(rm_dir)
    pairs, _ = encode_pairs([(str(i), r) for i, r in enumerate(recs)], fmt, 64)  # the training path
    chosen, rejected = pair_scores(load_reward_model(rm_dir), pairs, fmt.tok.pad_id, "cpu")
    scorer = RewardScorer.from_dir(rm_dir)
    assert scorer.mode == "chat_template (as trained)"
    got = scorer.score_answers([r["prompt"] for r in recs], [r["chosen"] for r in recs])
    assert torch.allclose(torch.tensor(got), chosen, atol=1e-5)
    got = scorer.score([conversation(r["prompt"], r["rejected"]) for r in recs])
    assert torch.allclose(torch.tensor(got), rejected, atol=1e-5)


def test_judge_uses_the_scorer(rm_dir):
    recs = synthetic_pairs()[:4]
    judge = RewardModelJudge.from_pretrained(rm_dir)
    assert judge.mode == "chat_template (as trained)"
    p = judge.prefer_many([(r["prompt"], r["chosen"], r["rejected"]) for r in recs])
    scorer = RewardScorer.from_dir(rm_dir)
    c = scorer.score_answers([r["prompt"] for r in recs], [r["chosen"] for r in recs])
    j = scorer.score_answers([r["prompt"] for r in recs], [r["rejected"] for r in recs])
    assert p == pytest.approx([1 / (1 + math.exp(-(x - y))) for x, y in zip(c, j)], abs=1e-6)


def test_judge_compare_command_stores_answers_and_scoring(rm_dir, tmp_path, capsys):
    from lmforge.cli import main

    recs = synthetic_pairs()[:3]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in recs))
    (tmp_path / "a.txt").write_text("".join(r["chosen"] + "\n" for r in recs))
    (tmp_path / "b.txt").write_text("".join(r["rejected"] + "\n" for r in recs))
    argv = ["judge", "compare", "--prompts", str(tmp_path / "p.jsonl"), "--a", str(tmp_path / "a.txt")]
    argv += ["--b", str(tmp_path / "b.txt"), "--reward-model", str(rm_dir), "--out", str(tmp_path / "o.json")]
    assert main(argv) == 0
    res = json.loads((tmp_path / "o.json").read_text())
    assert res["reward_scoring"] == "chat_template (as trained)"
    assert [(x["answer_a"], x["answer_b"]) for x in res["items"]] == [
        (r["chosen"], r["rejected"]) for r in recs
    ]


def test_foreign_models_run_through_transformers(rm_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    conv = conversation("Tell me about the apple.", "The apple is nice.")
    tok = AutoTokenizer.from_pretrained(rm_dir)
    hf = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    scorer = RewardScorer.from_dir(rm_dir, backend="transformers")
    assert scorer.mode == "chat_template"
    ids = torch.tensor([tok.apply_chat_template(conv, tokenize=True, return_dict=False)])
    with torch.no_grad():
        assert scorer.score([conv])[0] == pytest.approx(float(hf(input_ids=ids).logits[0, 0]), abs=1e-5)
    # without a chat template: the (prompt, answer) text pair, the convention of such models
    cfg = json.loads((rm_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in rm_dir.iterdir():
        (bare / f.name).write_bytes(f.read_bytes())
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in bare.glob("chat_template.*"):
        f.unlink()
    scorer = RewardScorer.from_dir(bare, backend="transformers")
    assert scorer.mode == "text_pair"
    enc = AutoTokenizer.from_pretrained(bare)(conv[0]["content"], conv[1]["content"], return_tensors="pt")
    with torch.no_grad():
        pair = scorer.score([conv])[0]
        assert pair == pytest.approx(float(hf(**enc).logits[0, 0]), abs=1e-5)
    # which is not what the model was trained on: the judge's old reading gave other numbers
    assert abs(pair - RewardScorer.from_dir(rm_dir).score([conv])[0]) > 1e-3


def test_bad_inputs_are_clear_errors(rm_dir, tmp_path):
    with pytest.raises(DataError, match="no config.json"):
        RewardScorer.from_dir(tmp_path)
    with pytest.raises(DataError, match="must end with the assistant turn"):
        RewardScorer.from_dir(rm_dir).score([[{"role": "user", "content": "hi"}]])
    with pytest.raises(DataError, match="not a sequence-classification"):
        RewardScorer.from_dir(rm_dir.parent / "base")
