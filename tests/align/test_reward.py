"""Reward model: the saved folder is a Hugging Face LlamaForSequenceClassification with the same
scores, the scoring API renders conversations as training did, and `lmforge reward` learns an easy
preference (held-out accuracy above chance, with its interval)."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.align.preference import encode_pairs
from lmforge.align.reward import (
    RewardModel,
    RewardScorer,
    load_reward_model,
    pair_batch,
    pair_scores,
    save_reward_model,
)
from lmforge.chat import ChatFormat
from lmforge.errors import CheckpointError
from lmforge.pipeline import load_config, run_stage
from lmforge.train.objectives.reward import RewardObjective
from tests.conftest import save_pairs_and_base, synthetic_pairs

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir, data, tok, lm = save_pairs_and_base(tmp_path_factory.mktemp("reward"))
    return model_dir, data, lm, tok


def test_saved_reward_model_matches_transformers(tmp_path, setup):
    model_dir, data, lm, tok = setup
    rm = RewardModel.from_causal_lm(lm, seed=3).eval()
    out = save_reward_model(
        rm, tmp_path / "rm", tokenizer_dir=model_dir, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    from safetensors.torch import load_file

    keys = set(load_file(str(out / "model.safetensors")))
    assert "score.weight" in keys and "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys

    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    fmt = ChatFormat.from_dir(out)
    pairs, _ = encode_pairs([(str(i), r) for i, r in enumerate(synthetic_pairs()[:5])], fmt, 64)
    b = pair_batch(pairs, tok.pad_id)  # right-padded rows of different lengths
    assert len(set(b["lengths"].tolist())) > 1
    with torch.no_grad():
        ours = rm(b["input_ids"], b["lengths"])
        theirs = hf(input_ids=b["input_ids"]).logits.squeeze(-1)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours, theirs)
    # round trip through our loader, and the scoring API renders conversations like training
    back = load_reward_model(out)
    scorer = RewardScorer(back, fmt)
    convs = [
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]
        for r in synthetic_pairs()[:5]
    ]
    c, _ = pair_scores(back, pairs, tok.pad_id, "cpu")
    assert torch.allclose(scorer.score(convs), c, atol=1e-5) and torch.allclose(c, ours[:5], atol=1e-5)
    with pytest.raises(CheckpointError, match="not a sequence-classification"):
        load_reward_model(model_dir)


def test_bradley_terry_objective_counts_pairs(setup):
    model_dir, data, lm, tok = setup
    rm = RewardModel.from_causal_lm(lm)
    fmt = ChatFormat.from_dir(model_dir)
    pairs, _ = encode_pairs(
        [(str(i), {**r, "margin": 1.0}) for i, r in enumerate(synthetic_pairs()[:4])], fmt, 64
    )
    b = pair_batch(pairs, tok.pad_id)
    loss, n, m = RewardObjective()(rm, b)
    loss0, _, _ = RewardObjective(use_margin=False)(rm, b)
    assert n == 4 and {"accuracy", "margin"} <= set(m)
    assert loss.item() > loss0.item()  # a required margin makes the same scores cost more
    loss.backward()
    assert rm.score.weight.grad is not None and rm.model.layers[0].mlp.up_proj.weight.grad is not None


def _run(tmp_path, setup, *overrides):
    model_dir, data, _, _ = setup
    cfg = load_config(
        None,
        [
            f"run.root={tmp_path}",
            "run.device=cpu",
            f"reward.model={model_dir}",
            f"reward.data={data}",
            "reward.val_fraction=0.3",
            "reward.max_steps=25",
            "reward.batch_size=4",
            "reward.lr=3e-3",
            "reward.warmup_steps=2",
            "reward.checkpoint_every=0",
            "reward.seq_len=64",
            "reward.max_examples=null",
            *overrides,
        ],
    )
    return run_stage(cfg, "reward", force=True)


@pytest.mark.parametrize("peft", ["full", "lora"])
def test_reward_stage_learns_heldout_preferences(tmp_path, setup, peft):
    o = _run(tmp_path, setup, f"reward.peft={peft}", *(["reward.lr=2e-2"] if peft == "lora" else []))
    m = o.metrics
    assert m["val_pairs"] >= 8 and m["steps"] == 25
    assert m["val_accuracy_after"] > 0.9 and m["val_accuracy_ci_low"] > 0.5, m
    assert m["val_accuracy_ci_low"] <= m["val_accuracy_after"] <= m["val_accuracy_ci_high"]
    # the length-only baseline is always reported next to the accuracy
    assert 0.5 <= m["val_length_baseline"] <= 1 and m["val_length_baseline_rule"] in ("shorter", "longer")
    assert m["val_length_baseline_ci_low"] <= m["val_length_baseline"] <= m["val_length_baseline_ci_high"]
    rm = load_reward_model(o.dir / "model")
    scorer = RewardScorer.from_dir(o.dir / "model")
    r = synthetic_pairs()[0]
    s = scorer.score(
        [
            [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
            [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}],
        ]
    )
    assert s[0] > s[1] and rm.cfg.d_model == 32
    best, scores = scorer.best_of([{"role": "user", "content": r["prompt"]}], [r["rejected"], r["chosen"]])
    assert best == 1 and torch.allclose(scores, s.flip(0))


def test_length_baseline_counts_the_shorter_answer_and_ties_half():
    from lmforge.align.preference import Pair
    from lmforge.align.reward import length_baseline

    pairs = [
        Pair([1], [5], [5, 6]),
        Pair([1], [5, 6, 7], [5]),
        Pair([1], [5], [6]),
        Pair([1], [5], [6, 7, 8]),
    ]
    lb = length_baseline(pairs)  # chosen shorter, longer, tie, shorter: (1 + 0 + 0.5 + 1) / 4
    assert (
        lb["shorter"] == 0.625 and lb["longer"] == 0.375 and lb["best"] == 0.625 and lb["rule"] == "shorter"
    )
    assert lb["ci_low"] < 0.625 < lb["ci_high"]
    flipped = length_baseline([Pair(p.prompt, p.rejected, p.chosen) for p in pairs])
    assert flipped["rule"] == "longer" and flipped["best"] == 0.625 and length_baseline([]) == {}


@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gpt2", "phi3", "qwen3", "mixtral"])
def test_family_reward_model_is_the_family_class_in_transformers(tmp_path, kind):
    """A reward model over an imported family saves as that family's own sequence classifier
    (GPT-2's Conv1D names, Phi-3's fused projections) and transformers scores it like lmforge:
    at each row's last non-pad token."""
    transformers = pytest.importorskip("transformers")
    from lmforge.model.hf import load_pretrained
    from tests.model.test_families import _hf_model, _ids

    _hf_model(kind).save_pretrained(tmp_path / "hf")
    rm = RewardModel.from_causal_lm(load_pretrained(tmp_path / "hf"), seed=3)
    save_reward_model(rm, tmp_path / "rm", pad_id=0)
    hf_rm = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "rm", dtype=torch.float32
    )
    names = {"gemma": "Gemma", "gemma2": "Gemma2", "gpt2": "GPT2", "phi3": "Phi3", "qwen3": "Qwen3"}
    want = names.get(kind, "Mixtral")
    assert type(hf_rm).__name__ == f"{want}ForSequenceClassification"
    x = _ids(3, 9, seed=5).clamp(min=1)  # 0 is the pad id
    lengths = torch.tensor([9, 6, 4])
    for b, n in enumerate(lengths.tolist()):
        x[b, n:] = 0
    back = load_reward_model(tmp_path / "rm")
    with torch.no_grad():
        ours = rm.eval()(x, lengths)
        torch.testing.assert_close(hf_rm.eval()(x).logits.squeeze(-1), ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(back(x, lengths), ours, atol=1e-6, rtol=1e-6)


def test_generic_path_reward_model_is_the_transformers_classifier(tmp_path):
    """A reward model over a model with no native family (OLMo 2): the transformers
    Olmo2ForSequenceClassification, trained a step, saved, and scored alike by lmforge and
    transformers."""
    transformers = pytest.importorskip("transformers")
    from lmforge.model.hf import load_pretrained
    from tests.model.test_generic import hf_model

    hf_model("olmo2").save_pretrained(tmp_path / "hf")
    rm = RewardModel.from_causal_lm(load_pretrained(tmp_path / "hf"), seed=3)
    x = torch.randint(1, 97, (4, 8), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([8, 5, 7, 3])
    for b, n in enumerate(lengths.tolist()):
        x[b, n:] = 0
    rm.train()
    opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-2)
    r = rm(x, lengths)
    torch.nn.functional.logsigmoid(r[:2] - r[2:]).neg().mean().backward()
    opt.step()
    rm.eval()
    save_reward_model(rm, tmp_path / "rm", pad_id=0)
    hf_rm = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "rm", dtype=torch.float32
    )
    assert type(hf_rm).__name__ == "Olmo2ForSequenceClassification"
    with torch.no_grad():
        ours = rm(x, lengths)
        torch.testing.assert_close(hf_rm.eval()(x).logits.squeeze(-1), ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_reward_model(tmp_path / "rm")(x, lengths), ours, atol=1e-6, rtol=1e-6)
