"""The generic path: causal LMs lmforge has no native family for (OLMo 2, GPT-NeoX), tiny random
checkpoints made by `transformers` itself, run through `load_pretrained` with the same logits,
packed-document masks, K/V-cache generation (lmforge's generator and the serve engine) equal to
`transformers`' greedy `generate`, LoRA adapters that `peft` loads, saved folders that
`AutoModelForCausalLM` loads, and a clear refusal of what neither side knows."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import CheckpointError, ConfigError
from lmforge.model.attention import DocumentMask
from lmforge.model.generate import SamplingParams, generate
from lmforge.model.generic import GenericCausalLM, GenericPathWarning
from lmforge.model.hf import export_hf, load_pretrained, save_pretrained
from lmforge.peft.lora import LoraSettings, apply_lora, load_adapter, lora_modules, save_adapter
from lmforge.peft.merge import export_merged
from lmforge.peft.prompt import PromptTuned
from lmforge.peft.qlora import QLoraSettings, load_quantized
from tests.factories import CORPUS, train_tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::lmforge.model.generic.GenericPathWarning"),
]
KINDS = ["olmo2", "gpt_neox"]
EVEN = "tests.align.test_rl:even_tokens"  # a reward function: the share of even token ids
V = 97


def hf_config(kind: str, vocab: int = V, **ids):
    shape = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    shape.update({"num_attention_heads": 4, "max_position_embeddings": 64, **ids})
    if kind == "olmo2":  # grouped-query attention, q/k norms, norms after attention and MLP
        return transformers.Olmo2Config(**shape, num_key_value_heads=2)
    if kind == "gpt_neox":  # fused qkv, partial rotary, parallel residual, LayerNorm with biases
        return transformers.GPTNeoXConfig(**shape, rotary_pct=0.5)
    if kind == "cohere":  # logits scaled after the (tied) head, parallel attention and MLP
        return transformers.CohereConfig(**shape, num_key_value_heads=2, logit_scale=0.5)
    raise KeyError(kind)


def hf_model(kind: str, vocab: int = V, **ids):
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(hf_config(kind, vocab, **ids)).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: randomise them so they matter
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def model_folder(d, kind: str, context: int = 64):
    """A tiny random `kind` model saved by transformers, with an lmforge tokenizer beside it."""
    tok = train_tokenizer(CORPUS, vocab_size=300)
    ids = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    m = hf_model(kind, tok.vocab_size, max_position_embeddings=context, **ids)
    m.save_pretrained(d)
    tok.save(d)
    return m, tok


def ids_(b=2, t=11, seed=1):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", [*KINDS, "cohere"])
def test_generic_model_logits_names_and_round_trip(tmp_path, kind):
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    with pytest.warns(GenericPathWarning, match=f"model_type '{kind}' has no native lmforge family"):
        ours = load_pretrained(tmp_path / "hf")
    assert isinstance(ours, GenericCausalLM)
    assert set(ours.state_dict()) == set(hf.state_dict())  # the HF names, nothing added
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    assert ours.cfg.vocab_size == V and ours.cfg.n_layers == 2 and ours.cfg.d_model == 32
    ids = ids_()
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(ours(ids), ref, atol=1e-5, rtol=1e-5)
        h = ours.hidden_states(ids)
        torch.testing.assert_close(ours.lm_head(h), ref, atol=1e-5, rtol=1e-5)
        loss = ours(ids[:, :-1], targets=ids[:, 1:])
        want = torch.nn.functional.cross_entropy(
            ref[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"
        )
        torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-5)
    save_pretrained(ours, tmp_path / "out", bos_id=None, eos_id=None)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == kind and saved["eos_token_id"] == hf.config.eos_token_id
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(back) is type(hf)
    export_hf(tmp_path / "hf", tmp_path / "exported", model=ours)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again.eval()(ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_packed_documents_do_not_see_each_other(tmp_path):
    hf = hf_model("gpt_neox")
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    a, b = ids_(1, 7, seed=2), ids_(1, 5, seed=3)
    row = torch.cat([a, b], 1)
    doc = torch.tensor([[0] * 7 + [1] * 5])
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        packed = ours(row, position_ids=pos, attn_mask=DocumentMask(doc))
        torch.testing.assert_close(packed[:, :7], hf(a).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[:, 7:], hf(b).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_generation_and_serve_engine_match_transformers_generate(tmp_path, kind):
    from lmforge.serve.engine import Engine
    from lmforge.serve.request import GenParams

    hf, tok = model_folder(tmp_path, kind)
    ours = load_pretrained(tmp_path)
    prompts = [[5, 17, 40, 9], [33, 8, 21, 60, 61, 2, 90]]
    want = []
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p])  # (an explicit mask: token 2 is the pad id, and a real token here)
            out = hf.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False, min_new_tokens=12
            )
            want.append(out[0, len(p) :].tolist())
    sp = SamplingParams(max_new_tokens=12, temperature=0.0)
    assert generate(ours, prompts, sp, use_cache=True) == want  # left-padded batch, KV cache
    assert generate(ours, prompts, sp, use_cache=False) == want
    with Engine(ours, tok, max_batch=2) as engine:
        got = engine.generate(prompts, GenParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in got] == want


@pytest.mark.parametrize("kind", KINDS)
def test_lora_adapter_loads_in_peft_and_merges(tmp_path, kind):
    peft = pytest.importorskip("peft")
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    names = apply_lora(model, LoraSettings(r=4, alpha=8))
    linears = {n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(names) == linears - {n for n, m in hf.named_modules() if m is hf.get_output_embeddings()}
    ids = ids_()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(ids[:, :-1], targets=ids[:, 1:]).backward()
    opt.step()
    model.eval()
    assert all(float(m.lora_B.weight.detach().abs().sum()) > 0 for _, m in lora_modules(model))
    with torch.no_grad():
        ours = model(ids)
    save_adapter(model, tmp_path / "adapter")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    again = load_pretrained(tmp_path / "hf")
    load_adapter(again, tmp_path / "adapter")
    export_merged(tmp_path / "hf", tmp_path / "adapter", tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again(ids), ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged.eval()(ids).logits, ours, atol=1e-4, rtol=1e-4)


def test_what_the_generic_path_refuses(tmp_path):
    hf_model("olmo2").save_pretrained(tmp_path / "hf")
    with pytest.raises(ConfigError, match="sft.method=lora"):
        load_quantized(tmp_path / "hf", QLoraSettings(compute_dtype="float32"))
    with pytest.raises(ConfigError, match="sft.method=lora"):
        PromptTuned(load_pretrained(tmp_path / "hf"), 3)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    # OLMo (1) has no q/k norms: transformers would drop those weights and run; lmforge refuses
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "model_type": "olmo"}))
    with pytest.raises(CheckpointError, match=r"do not match a olmo model.*unexpected keys.*k_norm"):
        load_pretrained(tmp_path / "hf")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**cfg, "model_type": "no_such_model"}))
    with pytest.raises(
        CheckpointError, match=r"config.json: model_type 'no_such_model' is not supported.*llama"
    ):
        load_pretrained(tmp_path / "bad")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_sft_stage_runs_a_generic_model(tmp_path, method):
    from lmforge.pipeline import load_config, run_stage

    hf, _ = model_folder(tmp_path / "base", "gpt_neox")
    overrides = [f"run.root={tmp_path}", f"sft.model={tmp_path / 'base'}", "sft.max_examples=24"]
    overrides += ["sft.max_steps=2", "sft.batch_size=4", "sft.max_val_examples=4", "sft.num_samples=1"]
    overrides += ["sft.sample_max_new_tokens=4", "run.device=cpu", f"sft.method={method}", "sft.seq_len=64"]
    run_stage(load_config(None, overrides), "sft", force=True)
    log = (tmp_path / "tiny" / "log.txt").read_text()
    assert "sft: warning:" in log and "'gpt_neox' has no native lmforge family" in log  # the one line
    out = tmp_path / "tiny" / "sft" / ("model" if method == "full" else "adapter")
    ids = ids_(1, 9)
    with torch.no_grad():
        before = hf(ids).logits  # (PeftModel below puts the adapter into `hf` itself)
        if method == "full":
            tuned = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        else:
            peft = pytest.importorskip("peft")
            tuned = peft.PeftModel.from_pretrained(hf, out).eval()
        ours = load_pretrained(out) if method == "full" else load_pretrained(tmp_path / "base")
        if method == "lora":
            load_adapter(ours, out)
        assert not torch.allclose(tuned(ids).logits, before)  # the step changed the model
        torch.testing.assert_close(ours(ids), tuned(ids).logits, atol=1e-5, rtol=1e-5)
        merged = tmp_path / "tiny" / "sft" / "model"  # LoRA: the merged model is saved too
        merged_logits = transformers.AutoModelForCausalLM.from_pretrained(merged).float().eval()(ids).logits
        torch.testing.assert_close(merged_logits, tuned(ids).logits, atol=1e-4, rtol=1e-4)


def test_align_and_reward_stages_run_a_generic_model(tmp_path):
    """DPO (the align stage) and the reward stage on a GPT-NeoX: the outputs are the
    architecture's own transformers folders."""
    from lmforge.pipeline import load_config, run_stage
    from tests.conftest import synthetic_pairs

    hf, _ = model_folder(tmp_path / "base", "gpt_neox")
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs()))
    common = [f"run.root={tmp_path}", "run.device=cpu"]
    align = [
        f"align.model={tmp_path / 'base'}",
        f"align.data={data}",
        "align.max_steps=2",
        "align.batch_size=4",
    ]
    align += ["align.seq_len=64", "align.checkpoint_every=0", "align.lr=1e-2", "align.warmup_steps=0"]
    run_stage(load_config(None, [*common, *align, "align.method=dpo"]), "align", force=True)
    tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny" / "align" / "model")
    ids = ids_(1, 9)
    with torch.no_grad():
        assert not torch.allclose(tuned.float().eval()(ids).logits, hf(ids).logits)
    reward = [f"reward.model={tmp_path / 'base'}", f"reward.data={data}", "reward.max_steps=2"]
    reward += ["reward.batch_size=4", "reward.seq_len=64", "reward.checkpoint_every=0"]
    run_stage(load_config(None, [*common, *reward]), "reward", force=True)
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "tiny" / "reward" / "model"
    )
    assert type(rm).__name__ == "GPTNeoXForSequenceClassification"


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_rl_stage_runs_a_generic_model(tmp_path, method):
    """PPO (value head on the generic trunk) and GRPO through the rl stage on an OLMo 2; the
    policy it saves loads in transformers and differs from the start."""
    from lmforge.pipeline import load_config, run_stage

    hf, _ = model_folder(tmp_path / "base", "olmo2", context=256)
    args = [f"run.root={tmp_path}", f"rl.model={tmp_path / 'base'}", "run.device=cpu", "rl.lr=1e-2"]
    args += [f"rl.method={method}", "rl.data=[builtin]", "rl.batch_size=8", "rl.max_val_examples=4"]
    args += ["rl.eval_every=0", "rl.max_steps=2", "rl.grpo.max_new_tokens=6", "rl.ppo.max_new_tokens=6"]
    args += [f"rl.grpo.rewards=[{EVEN}]", f"rl.ppo.rewards=[{EVEN}]"]
    run_stage(load_config(None, args), "rl", force=True)
    tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny" / "rl" / "model")
    ids = ids_(1, 9)
    with torch.no_grad():
        assert not torch.allclose(tuned.float().eval()(ids).logits, hf(ids).logits)


def test_eval_perplexity_of_a_generic_model_is_transformers_loss(tmp_path):
    import math
    from pathlib import Path

    import numpy as np

    from lmforge.data.shards import Shard
    from lmforge.eval.perplexity import evaluate_shard

    hf = hf_model("olmo2")
    hf.save_pretrained(tmp_path / "hf")
    stream = ids_(1, 65, seed=7)[0]
    shard = Shard(stream.numpy().astype(np.uint16), np.array([0]), {"n_tokens": 65}, Path("val.bin"))
    res = evaluate_shard(
        load_pretrained(tmp_path / "hf"),
        shard,
        np.ones(V, dtype=np.int64),
        seq_len=16,
        batch_size=3,
        device=torch.device("cpu"),
    )
    x, y = stream[:64].view(4, 16), stream[1:65].view(4, 16)
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten())
    assert res["tokens"] == 64
    assert math.isclose(res["loss"], float(want), rel_tol=1e-5)
    assert math.isclose(res["ppl"], math.exp(float(want)), rel_tol=1e-4)


def test_a_sliding_window_shorter_than_the_context_caps_the_context(tmp_path):
    """The 4D masks do not apply a sliding window, so lmforge's context stops at the window:
    within it the logits equal transformers'."""
    hf_cfg = transformers.Starcoder2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=8,
    )
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    with pytest.warns(GenericPathWarning, match=r"context capped to the sliding window \(8 tokens\)"):
        ours = load_pretrained(tmp_path / "hf")
    assert ours.cfg.max_seq_len == 8
    ids = ids_(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_reward_stage_with_lora_on_a_generic_model(tmp_path):
    """LoRA on the trunk of a generic-path reward model (the score head trains whole, untouched
    by LoRA); the merged classifier loads in transformers."""
    from lmforge.pipeline import load_config, run_stage
    from tests.conftest import synthetic_pairs

    model_folder(tmp_path / "base", "olmo2")
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs()))
    args = [
        f"run.root={tmp_path}",
        "run.device=cpu",
        f"reward.model={tmp_path / 'base'}",
        f"reward.data={data}",
    ]
    args += ["reward.max_steps=2", "reward.batch_size=4", "reward.seq_len=64", "reward.checkpoint_every=0"]
    run_stage(load_config(None, [*args, "reward.peft=lora", "reward.lora.r=4"]), "reward", force=True)
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "tiny" / "reward" / "model"
    )
    assert type(rm).__name__ == "Olmo2ForSequenceClassification"


@pytest.mark.parametrize("kind", [*KINDS, "cohere"])
def test_activation_checkpointing_finds_the_blocks_and_keeps_the_gradients(tmp_path, kind):
    """GPT-NeoX keeps its blocks at `gpt_neox.layers`, not `model.layers`: the blocks are found
    through transformers' `_no_split_modules`, and recomputing them gives the same gradients."""
    from lmforge.train.distributed import apply_activation_checkpointing, decoder_blocks

    hf_model(kind).save_pretrained(tmp_path / "hf")
    with pytest.warns(GenericPathWarning):
        plain, ckpt = load_pretrained(tmp_path / "hf"), load_pretrained(tmp_path / "hf")
    blocks = decoder_blocks(ckpt)
    assert len(blocks) == ckpt.cfg.n_layers == 2
    assert all(type(b).__name__.endswith(("DecoderLayer", "Layer")) for b in blocks)
    apply_activation_checkpointing(ckpt)
    ids = ids_()
    grads = []
    for m in (plain, ckpt):
        m.train()
        m(ids[:, :-1], targets=ids[:, 1:]).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)
