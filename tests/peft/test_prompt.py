"""Prompt tuning: only the soft prompt trains; PEFT loads the saved adapter onto the exported HF
model and gives the same logits; packed rows keep examples apart."""

from __future__ import annotations

import pytest
import torch

from lmforge.chat import Example
from lmforge.errors import CheckpointError
from lmforge.model.attention import DocumentMask
from lmforge.model.config import ModelConfig
from lmforge.model.generate import SamplingParams, generate
from lmforge.model.hf import export_hf, load_pretrained, save_pretrained
from lmforge.model.transformer import Transformer
from lmforge.peft.prompt import PromptSettings, PromptTuned
from lmforge.sft.rows import collate, example_row, pack

CFG = ModelConfig(vocab_size=101, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=64)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


def test_prompt_tuning_trains_prompt_only_and_matches_peft(tmp_path):
    torch.manual_seed(0)
    base = Transformer(CFG).eval()
    save_pretrained(base, tmp_path / "base")
    pt = PromptTuned(base, 5, init_ids=[7, 8, 9])
    assert torch.equal(pt.prompt_embeddings[3], base.model.embed_tokens.weight[7])
    assert [n for n, p in pt.named_parameters() if p.requires_grad] == ["prompt_embeddings"]
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([pt.prompt_embeddings], lr=0.05)
    w0 = base.model.layers[0].mlp.up_proj.weight.clone()
    for _ in range(3):
        pt.loss(ids[:, :-1], ids[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(base.model.layers[0].mlp.up_proj.weight, w0)
    with torch.no_grad():
        ours = pt(ids)
    assert ours.shape == (2, 12, 101)
    pt.save_adapter(tmp_path / "pt", settings=PromptSettings(num_virtual_tokens=5, init="random"))
    again = PromptTuned.load_adapter(load_pretrained(tmp_path / "base"), tmp_path / "pt")
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours)
    with pytest.raises(CheckpointError, match="different base model"):
        PromptTuned.load_adapter(Transformer(CFG.model_copy(update={"d_model": 128})), tmp_path / "pt")

    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    export_hf(tmp_path / "base", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits[:, 5:], ours, atol=1e-5, rtol=1e-5)


def test_prompt_tuned_generation_through_the_engine():
    """The serving engine (the virtual tokens' K/V in its cache, behind placeholder ids) gives the
    reference decoder's tokens (the whole sequence re-run each step), and the virtual tokens
    matter (a peaked random model, so greedy tokens follow the prefix)."""
    from lmforge.serve.batch import generate_batch
    from lmforge.serve.request import GenParams
    from tests.factories import tiny_model

    pt = PromptTuned(tiny_model(101, max_seq_len=64), 5, seed=2)
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [4]]
    ref = generate(pt, prompts, SamplingParams(max_new_tokens=6, temperature=0), use_cache=False)
    greedy = GenParams(max_tokens=6, temperature=0)
    got = generate_batch(pt, prompts, greedy, stop_token_ids=[])  # the engine adds the placeholders
    assert [c.token_ids for c in got] == ref and all(len(r) == 6 for r in ref)
    plain = generate_batch(pt.model, prompts, greedy, stop_token_ids=[])
    assert [c.token_ids for c in plain] != ref


def test_prompt_tuning_packed_rows_do_not_leak():
    torch.manual_seed(0)
    pt = PromptTuned(Transformer(CFG).eval(), 4)
    exs = [Example(list(range(3, 3 + n)), [True] * n) for n in (5, 7, 3)]
    rows = pack(exs, 32)
    assert len(rows) == 1
    b = collate(rows, 0, packed=True)
    with torch.no_grad():
        packed = pt(b["input_ids"], position_ids=b["position_ids"], attn_mask=DocumentMask(b["doc_ids"]))[0]
        r = rows[0]
        for s in set(r.seg):
            idx = [i for i, x in enumerate(r.seg) if x == s]
            alone = pt(torch.tensor([[r.ids[i] for i in idx]]))[0]
            torch.testing.assert_close(packed[idx], alone, atol=1e-5, rtol=1e-5)
    assert example_row(exs[0]).labels[-1] == -100


def test_prompt_tuning_with_activation_checkpointing_gives_the_same_grads():
    from lmforge.train.distributed import apply_activation_checkpointing

    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        pt = PromptTuned(Transformer(CFG), 4)
        if ckpt:
            apply_activation_checkpointing(pt)
        x = torch.randint(3, CFG.vocab_size, (2, 10))
        pt.loss(x, torch.roll(x, -1, 1)).backward()
        grads.append(pt.prompt_embeddings.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
