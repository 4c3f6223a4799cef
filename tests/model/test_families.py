"""Model families beyond Llama: tiny random Qwen3 / Gemma / Gemma 2 / Phi-3 / GPT-2 / Mistral
checkpoints built by `transformers` from its own config classes (no download) must give the same
logits in lmforge, export back to a folder `AutoModelForCausalLM` loads with the same logits and
the family's own tensor names, and generate greedily like `transformers` past the sliding window."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.model.generate import SamplingParams, generate  # noqa: E402
from lmforge.model.hf import export_hf, import_hf, load_pretrained  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread

V = 97
LLAMA_SHAPE = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _config(kind: str, window: int | None = None):
    t = transformers
    if kind == "qwen3":  # head_dim set apart from hidden / heads, as in real Qwen3
        return t.Qwen3Config(**LLAMA_SHAPE, head_dim=24, rope_theta=5000.0)
    if kind == "gemma":
        return t.GemmaConfig(**LLAMA_SHAPE, head_dim=32, hidden_activation="gelu_pytorch_tanh")
    if kind == "gemma2":
        return t.Gemma2Config(
            **LLAMA_SHAPE,
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=window or 8,
            attn_logit_softcapping=2.0,  # small caps so that the tanh really bends the scores
            final_logit_softcapping=3.0,
        )
    if kind == "gemma3_text":  # two RoPE bases, linear scaling on the global layer, q/k norms
        rope = {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
        }
        return t.Gemma3TextConfig(
            **LLAMA_SHAPE,
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=window or 8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters=rope,
        )
    if kind == "phi3":
        return t.Phi3Config(**dict(LLAMA_SHAPE, vocab_size=V), pad_token_id=0, sliding_window=window)
    if kind == "mistral":
        return t.MistralConfig(**LLAMA_SHAPE, sliding_window=window or 8)
    if kind == "qwen2":  # sliding window on the layers from max_window_layers on
        return t.Qwen2Config(
            **LLAMA_SHAPE, use_sliding_window=True, sliding_window=window or 8, max_window_layers=1
        )
    if kind == "mixtral":
        return t.MixtralConfig(
            **LLAMA_SHAPE, num_local_experts=4, num_experts_per_tok=2, sliding_window=window or 8
        )
    if kind == "gpt2":
        return t.GPT2Config(vocab_size=V, n_embd=64, n_layer=3, n_head=4, n_positions=64)
    raise KeyError(kind)


def _hf_model(kind: str, window: int | None = None):
    cfg = _config(kind, window)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1 (Gemma: 0) and biases to 0: randomise them
        for _name, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def _ids(b=2, t=23, seed=1):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def _tensor_names(folder) -> set[str]:
    from safetensors import safe_open

    names = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            names |= set(fh.keys())
    return names


FAMILIES = ["qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "mistral", "qwen2", "mixtral"]


@pytest.mark.parametrize("kind", FAMILIES)
def test_import_and_export_match_transformers(tmp_path, kind):
    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        ours = load_pretrained(tmp_path / "hf")
        torch.testing.assert_close(ours(ids), ref, atol=1e-5, rtol=1e-5)
    rep = import_hf(tmp_path / "hf", tmp_path / "ours")
    assert rep["model_type"] == kind and rep["params"] == sum(p.numel() for p in hf.parameters())
    export_hf(tmp_path / "ours", tmp_path / "out")
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["model_type"] == kind
    # the family's own tensor names (fused Phi-3 / GPT-2 weights fused again)
    assert _tensor_names(tmp_path / "out") == _tensor_names(tmp_path / "hf") - {"lm_head.weight"} | (
        _tensor_names(tmp_path / "out") & {"lm_head.weight"}
    )
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mistral", "gemma2", "gemma3_text", "phi3", "qwen2", "mixtral"])
def test_sliding_window_generation_matches_transformers(tmp_path, kind):
    """Greedy decoding with the KV cache, 30 tokens past a window of 6, equals `transformers`."""
    hf = _hf_model(kind, window=6)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    assert any(layer.self_attn.window == 6 for layer in ours.model.layers)
    prompt = _ids(1, 5, seed=3)
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=0)[0, 5:].tolist()
        # the prompt logits see the window too (without a cache)
        long = _ids(1, 20, seed=4)
        torch.testing.assert_close(ours(long), hf(long).logits, atol=1e-5, rtol=1e-5)
    got = generate(ours, [prompt[0].tolist()], SamplingParams(max_new_tokens=30, temperature=0))[0]
    assert got == ref
    nocache = generate(ours, [prompt[0].tolist()], SamplingParams(max_new_tokens=30, temperature=0), False)
    assert nocache[0] == ref
    # the serving engine (every generating surface's path): a batch of prompts of different
    # lengths, prefilled in one forward and in chunks shorter than the window, equals transformers
    from lmforge.serve.batch import generate_batch
    from lmforge.serve.request import GenParams

    prompts = [prompt, long]
    with torch.no_grad():
        outs = [
            hf.generate(p, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
            for p in prompts
        ]
    refs = [o[0, p.shape[1] :] for o, p in zip(outs, prompts)]
    for chunk in (None, 4):
        comps = generate_batch(
            ours, [p[0].tolist() for p in prompts], GenParams(max_tokens=12, temperature=0), stop_token_ids=[],
            prefill_chunk=chunk,
        )  # fmt: skip
        assert [c.token_ids for c in comps] == [r.tolist() for r in refs]


def test_window_band_is_hf_semantics():
    from lmforge.model.transformer import window_band

    band = window_band(torch.arange(5), 5, 2)
    want = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])
    assert torch.equal(band, want.bool())


def test_refused_features_are_named(tmp_path):
    from lmforge.errors import CheckpointError
    from lmforge.model.hf import from_hf_config

    phi = _config("phi3").to_dict()
    phi["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4}
    with pytest.raises(CheckpointError, match="longrope"):
        from_hf_config(phi, "x/config.json")
    gpt = _config("gpt2").to_dict()
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx"):
        from_hf_config(dict(gpt, scale_attn_by_inverse_layer_idx=True), "x/config.json")
    q3 = _config("qwen3").to_dict()
    with pytest.raises(CheckpointError, match="attention_bias"):
        from_hf_config(dict(q3, attention_bias=True), "x/config.json")


@pytest.mark.parametrize("fast_path", [False, True])
def test_serve_engine_decodes_past_the_window_like_transformers(tmp_path, fast_path):
    """Two prompts of different lengths batched in the serve engine (slot cache, per-row
    positions), 25 tokens past a window of 6: each equals `transformers` greedy."""
    from lmforge.serve.engine import Engine
    from lmforge.serve.request import GenParams
    from lmforge.tokenizer import train_tokenizer

    hf = _hf_model("mistral", window=6)
    hf.save_pretrained(tmp_path / "hf")
    tok = train_tokenizer(["a tokenizer for decoding only"] * 10, vocab_size=300)
    prompts = [_ids(1, 5, seed=3)[0].tolist(), _ids(1, 9, seed=5)[0].tolist()]
    with torch.no_grad():
        want = [
            hf.generate(torch.tensor([p]), max_new_tokens=25, do_sample=False, pad_token_id=0)[
                0, len(p) :
            ].tolist()
            for p in prompts
        ]
    eng = Engine(load_pretrained(tmp_path / "hf"), tok, max_batch=2, stop_token_ids=[], fast_path=fast_path)
    with eng:
        got = eng.generate(prompts, GenParams(max_tokens=25, temperature=0))
    assert [c.token_ids for c in got] == want


@pytest.mark.parametrize("kind", FAMILIES)
def test_param_count_formula_counts_every_family_feature(kind):
    """`ModelConfig.param_count` (used by the scaling tools and reports) equals the built model's
    parameters with q/k norms, sandwich norms, LayerNorm biases and learned positions included."""
    from lmforge.model.hf import from_hf_config
    from lmforge.model.transformer import Transformer

    cfg = from_hf_config(_config(kind).to_dict())
    with torch.device("meta"):
        model = Transformer(cfg)
    assert cfg.param_count() == model.num_params() == sum(p.numel() for p in _hf_model(kind).parameters())
