"""The rollout backend: the serving engine on the policy itself. Greedy tokens equal the former
static-batch sampler's and `transformers` `generate`'s; samples are reproducible by seed; the
policy's current weights (LoRA, MoE) are used and its train/eval mode is kept."""

import copy

import pytest
import torch

from lmforge.align.backends import LmforgeBackend
from lmforge.model.config import ModelConfig
from lmforge.model.generate import SamplingParams, generate
from lmforge.model.transformer import Transformer
from lmforge.serve.request import GenParams
from tests.factories import tiny_model

PROMPTS = [[5, 9, 13, 2], [7], [3, 4, 5, 6, 7, 8, 9, 10, 11], [21, 22]]


def greedy(n: int, stops=()) -> GenParams:
    return GenParams(max_tokens=n, temperature=0, stop_token_ids=list(stops))


def old_path(model, prompts, n: int, stops=()) -> list[list[int]]:
    """The former backend's semantics: the static-batch sampler, the stop token kept."""
    outs = []
    for p in prompts:
        got = generate(model, [p], SamplingParams(max_new_tokens=n, temperature=0))[0]
        cut = next((k for k, t in enumerate(got) if t in stops), None)
        outs.append(got if cut is None else got[: cut + 1])
    return outs


def test_greedy_equals_the_old_sampler_and_transformers(tmp_path):
    model = tiny_model(128, max_seq_len=64)
    got = LmforgeBackend(model, batch_size=3).generate(PROMPTS, 1, greedy(12))
    assert got == old_path(model, PROMPTS, 12)
    assert got == generate(model, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0))  # left-padded
    # a stop token ends a completion and is kept (the policy learns to stop)
    stop = got[0][3]
    cut = LmforgeBackend(model, batch_size=2).generate(PROMPTS, 1, greedy(12, [stop]))
    assert cut == old_path(model, PROMPTS, 12, [stop]) and cut[0][-1] == stop and len(cut[0]) == 4
    transformers = pytest.importorskip("transformers")
    from lmforge.model.hf import save_pretrained

    save_pretrained(model, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    for p, g in zip(PROMPTS, got):
        ref = hf.generate(
            torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0
        )[0, len(p) :].tolist()
        assert g == ref


def test_samples_are_reproducible_by_seed_and_groups_differ():
    model = tiny_model(128, max_seq_len=64)
    be = LmforgeBackend(model, batch_size=4)
    p = GenParams(max_tokens=10, temperature=1.0, top_k=50, seed=11)
    a = be.generate(PROMPTS[:2], 4, p)
    assert len(a) == 8 and a == be.generate(PROMPTS[:2], 4, p)
    assert a == LmforgeBackend(model, batch_size=3).generate(PROMPTS[:2], 4, p)  # batching aside
    assert len({tuple(x) for x in a[:4]}) > 1  # a group's samples are distinct draws
    assert a != be.generate(PROMPTS[:2], 4, GenParams(max_tokens=10, temperature=1.0, top_k=50, seed=12))


def test_policy_mode_and_current_weights_are_used():
    model = tiny_model(128, max_seq_len=64).train()
    be = LmforgeBackend(model)
    before = be.generate(PROMPTS, 1, greedy(8))
    assert model.training  # the training step that follows sees its train mode
    assert all(p.requires_grad for p in model.parameters())  # weights were not fused in place
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))  # an update step
    after = be.generate(PROMPTS, 1, greedy(8))
    assert after != before and after == old_path(model.eval(), PROMPTS, 8)


def test_lora_policy_generates_like_its_merged_weights():
    from lmforge.peft.lora import LoraSettings, apply_lora, merge_lora

    model = tiny_model(128, max_seq_len=64)
    base = LmforgeBackend(copy.deepcopy(model)).generate(PROMPTS, 1, greedy(8))
    with pytest.warns(UserWarning):
        apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    got = LmforgeBackend(model).generate(PROMPTS, 1, greedy(8))
    merged = merge_lora(copy.deepcopy(model))
    assert got == LmforgeBackend(merged).generate(PROMPTS, 1, greedy(8)) != base


def test_moe_policy_generates_like_the_old_sampler():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=96,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_experts=4,
        experts_top_k=2,
        d_ff=24,
        max_seq_len=48,
    )
    model = Transformer(cfg).eval()
    got = LmforgeBackend(model, batch_size=2).generate(PROMPTS, 1, greedy(10))
    assert got == old_path(model, PROMPTS, 10)
