"""The model chain's chat side: every model answers the same held-out chat prompts greedily through
the serving engine, the run's reward model scores those answers, and the per-stage deltas and the
kept answers reach the report card's tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.align.reward import RewardModel, save_reward_model
from lmforge.align.reward_scoring import RewardScorer
from lmforge.chat import ChatFormat
from lmforge.data.shards import Shard
from lmforge.eval.chain import chain_answers, chain_table, chat_answers, score_chain
from lmforge.eval.perplexity import token_byte_lengths
from lmforge.model.generate import SamplingParams, generate
from lmforge.model.hf import load_pretrained, save_pretrained
from tests.conftest import save_pairs_and_base, synthetic_pairs

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A base model ("pretrain"), a perturbed copy ("sft"), a reward model on the base trunk, the
    chat prompts and a validation shard of the pairs' text."""
    d = tmp_path_factory.mktemp("chain")
    base_dir, _, tok, lm = save_pairs_and_base(d)
    rm = RewardModel.from_causal_lm(lm, seed=3).eval()
    rm_dir = save_reward_model(
        rm, d / "rm", tokenizer_dir=base_dir, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id
    )
    other = load_pretrained(base_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5 * torch.randn_like(p))
    save_pretrained(other, d / "sft", tokenizer_dir=base_dir, bos_id=tok.bos_id, eos_id=tok.eos_id)
    recs = synthetic_pairs()
    ids = np.array(tok.encode(" ".join(r["prompt"] + " " + r["chosen"] for r in recs)), dtype=np.int64)
    shard = Shard(ids, np.array([0]), {"n_tokens": len(ids), "vocab_size": tok.vocab_size}, d)
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in recs[:6]]
    return {"models": [("pretrain", base_dir), ("sft", d / "sft")], "rm": rm_dir, "tok": tok}, shard, prompts


def _chain(run, shard, prompts, keep=6):
    r, fmt = run, ChatFormat.from_dir(run["models"][0][1])
    scorer = RewardScorer.from_dir(r["rm"])
    return (
        score_chain(
            r["models"],
            shard,
            token_byte_lengths(r["tok"]),
            vocab_size=r["tok"].vocab_size,
            seq_len=32,
            batch_size=4,
            device=torch.device("cpu"),
            max_tokens=200,
            extra=lambda m: chat_answers(m, fmt, prompts, max_tokens=8, scorer=scorer, keep=keep),
        ),
        fmt,
        scorer,
    )


def test_every_model_answers_and_the_reward_model_scores_the_answers(run):
    r, shard, prompts = run
    rows, fmt, scorer = _chain(r, shard, prompts)
    assert [x["stage"] for x in rows] == ["pretrain", "sft"]
    for row, (_, folder) in zip(rows, r["models"]):
        model = load_pretrained(folder).eval()
        # the engine's greedy answers equal plain greedy decoding of the same prompt ids
        stops = sorted({fmt.tok.eos_id, fmt.tok.end_id, *fmt.stop_ids} - {None})
        params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=stops)
        for p, answer in zip(prompts, row["answers"]):
            (new,) = generate(model, [fmt.prompt_ids(p)], params)
            assert answer == fmt.tok.decode(new, skip_special=True).strip()
        assert row["chat_prompts"] == len(prompts) and len(row["answers"]) == len(prompts)
        # rm_score is the reward model's mean score of exactly these answers
        want = float(np.mean(scorer.score_answers([p[0]["content"] for p in prompts], row["answers"])))
        assert row["rm_score"] == pytest.approx(want, abs=1e-5)
    assert rows[0]["answers"] != rows[1]["answers"]
    assert rows[0]["rm_score"] != rows[1]["rm_score"]
    assert rows[0].get("delta_rm_score") is None
    assert rows[1]["delta_rm_score"] == pytest.approx(rows[1]["rm_score"] - rows[0]["rm_score"], abs=1e-12)


def test_report_tables_show_scores_deltas_and_answers(run):
    r, shard, prompts = run
    rows, _, _ = _chain(r, shard, prompts, keep=2)
    assert all(len(x["answers"]) == 2 for x in rows)
    header, table = chain_table(rows)
    i = header.index("reward-model score")
    assert header[i + 1] == "delta vs previous" and header[i + 2] == "answer tokens"
    assert table[0][i] == rows[0]["rm_score"] and table[0][i + 1] is None
    assert table[1][i + 1] == f"{rows[1]['delta_rm_score']:+.4f}"
    shown = [p[0]["content"] for p in prompts[:2]]
    header, table = chain_answers(rows, shown)
    assert header == ["prompt", "pretrain", "sft"]
    assert table == [[shown[k], rows[0]["answers"][k], rows[1]["answers"][k]] for k in range(2)]


def test_no_reward_model_no_score_column(run):
    r, shard, prompts = run
    fmt = ChatFormat.from_dir(r["models"][0][1])
    out = chat_answers(load_pretrained(r["models"][0][1]), fmt, prompts[:2], max_tokens=4)
    assert "rm_score" not in out and len(out["answers"]) == 2 and 0 < out["answer_tokens"] <= 4
    header, _ = chain_table([{"stage": "pretrain", "bpb": 1.0, "delta_bpb_vs_first": 0.0, **out}])
    assert "reward-model score" not in header


def test_a_prompt_without_room_is_not_asked(run):
    """A prompt that leaves no room for the answer in the model's context gets no answer (None in
    its place, so the kept answers stay aligned with the shown prompts) and no score."""
    r, _, prompts = run
    fmt = ChatFormat.from_dir(r["models"][0][1])
    model = load_pretrained(r["models"][0][1])
    long = [{"role": "user", "content": " ".join(["word"] * (4 * model.cfg.max_seq_len))}]
    out = chat_answers(model, fmt, [long, prompts[0]], max_tokens=4, keep=2)
    assert out["chat_prompts"] == 1 and out["answers"][0] is None and isinstance(out["answers"][1], str)
    assert chat_answers(model, fmt, [long], max_tokens=4) == {}
