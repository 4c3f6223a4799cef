"""The batched generation engine: exactness against model.generate, sampling controls, stops,
limits, cancellation, failure isolation, HF-imported models and adapters."""

import threading
import time

import pytest
import torch

from lmforge.errors import CheckpointError
from lmforge.model.generate import SamplingParams, generate
from lmforge.serve.engine import Engine, EngineFull, GenParams, _held_back
from tests.factories import make_tiny_model

PROMPTS = [
    "The function returns",
    "A socket",
    "This module provides regular expression matching",
    "x",
    "Paris is the capital of France. Berlin is",
    "Open the file",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = Engine.from_pretrained(model_dir, max_batch=3, max_queue=16).start()
    yield eng
    eng.close()


def wait_idle(eng, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = eng.stats()
        if st["running"] == 0 and st["waiting"] == 0:
            return st
        time.sleep(0.01)
    raise AssertionError(f"engine not idle: {eng.stats()}")


def test_greedy_matches_reference_generate_with_continuous_batching(engine):
    # 6 prompts of different lengths through 3 slots: requests join and leave mid-flight
    ids = [engine.encode(p) for p in PROMPTS]
    outs = engine.generate(ids, GenParams(max_tokens=24, temperature=0, ignore_eos=True))
    ref_batch = generate(engine.model, ids, SamplingParams(max_new_tokens=24, temperature=0))
    for i, o in enumerate(outs):
        ref = generate(engine.model, [ids[i]], SamplingParams(max_new_tokens=24, temperature=0))[0]
        assert o.token_ids == ref == ref_batch[i]
        assert o.finish_reason == "length" and o.completion_tokens == 24
        assert o.text == engine.tok.decode(ref, skip_special=True)
    wait_idle(engine)


def test_fast_path_and_plain_model_path_agree(engine, model_dir):
    from lmforge.model.hf import load_pretrained
    from lmforge.tokenizer import LMTokenizer

    assert engine.fast is not None  # from_pretrained uses the fused fast path
    plain = Engine(load_pretrained(model_dir), LMTokenizer.load(model_dir), max_batch=2)  # model(...) path
    assert plain.fast is None
    ids = [engine.encode(p) for p in PROMPTS]
    p = GenParams(max_tokens=20, temperature=0, ignore_eos=True)
    with plain:
        a = [o.token_ids for o in plain.generate(ids, p)]
    assert a == [o.token_ids for o in engine.generate(ids, p)]
    p = GenParams(
        max_tokens=20,
        temperature=0.9,
        top_k=20,
        repetition_penalty=1.3,
        frequency_penalty=0.5,
        seed=4,
        ignore_eos=True,
    )
    with Engine(load_pretrained(model_dir), LMTokenizer.load(model_dir), max_batch=2) as plain:
        a = [o.token_ids for o in plain.generate(ids, p)]
    assert a == [o.token_ids for o in engine.generate(ids, p)]


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    p = GenParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=123, ignore_eos=True)
    alone = engine.complete(PROMPTS[0], p).token_ids
    crowd = engine.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], p)
    assert crowd[0].token_ids == alone
    other = engine.complete(PROMPTS[0], GenParams(**{**p.__dict__, "seed": 124})).token_ids
    assert other != alone


def test_top_k_1_and_tiny_top_p_are_greedy(engine):
    greedy = engine.complete(PROMPTS[2], GenParams(max_tokens=16, temperature=0, ignore_eos=True)).token_ids
    k1 = engine.complete(
        PROMPTS[2], GenParams(max_tokens=16, temperature=1.5, top_k=1, seed=1, ignore_eos=True)
    )
    p0 = engine.complete(
        PROMPTS[2], GenParams(max_tokens=16, temperature=1.5, top_p=1e-6, seed=2, ignore_eos=True)
    )
    assert k1.token_ids == greedy == p0.token_ids


def test_penalties_change_greedy_choices(engine):
    base = engine.complete("x", GenParams(max_tokens=30, temperature=0, ignore_eos=True)).token_ids
    pres = engine.complete(
        "x", GenParams(max_tokens=30, temperature=0, presence_penalty=2.0, ignore_eos=True)
    ).token_ids
    assert len(set(pres)) == len(pres), "presence penalty 2 on a near-uniform model must forbid repeats"
    rep = engine.complete(
        "x", GenParams(max_tokens=30, temperature=0, repetition_penalty=10.0, ignore_eos=True)
    ).token_ids
    assert len(set(base)) < len(set(rep)) or len(set(base)) == len(base)


def test_stop_token_ids_and_stop_strings(engine):
    full = engine.complete(PROMPTS[3], GenParams(max_tokens=20, temperature=0, ignore_eos=True))
    # a stop token: output is cut before its first occurrence
    stop_tok = full.token_ids[5]
    first = full.token_ids.index(stop_tok)
    res = engine.complete(PROMPTS[3], GenParams(max_tokens=20, temperature=0, stop_token_ids=[stop_tok]))
    assert res.finish_reason == "stop" and res.token_ids == full.token_ids[:first]
    # a stop string taken from the middle of the text: never streamed, text cut before it
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    req = engine.submit(
        engine.encode(PROMPTS[3]), GenParams(max_tokens=20, temperature=0, stop=[stop], ignore_eos=True)
    )
    chunks = list(req)
    streamed = "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason == "stop"
    assert streamed == text[: text.find(stop)]
    assert stop not in streamed


def test_held_back_suffix():
    assert _held_back("hello wor", ["world"]) == 3
    assert _held_back("hello", ["xyz"]) == 0
    assert _held_back("ab", ["abc", "b"]) == 2


def test_streaming_chunks_add_up_and_report_first_token_time(engine):
    req = engine.submit(engine.encode(PROMPTS[1]), GenParams(max_tokens=10, temperature=0, ignore_eos=True))
    chunks = list(req)
    assert sum(len(c.token_ids) for c in chunks) == 10
    assert [c.finish_reason for c in chunks][-1] == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    res = req._completion("".join(c.text for c in chunks), [], chunks[-1])
    assert res.ttft_s is not None and 0 <= res.ttft_s <= res.total_s


def test_limits_are_checked(engine):
    ctx = engine.context
    with pytest.raises(ValueError, match="context"):
        engine.submit(list(range(10, 10 + ctx)), GenParams(max_tokens=1))
    with pytest.raises(ValueError, match="lower max_tokens"):
        engine.submit([5] * (ctx - 4), GenParams(max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], GenParams())
    with pytest.raises(ValueError, match="out of range"):
        engine.submit([10**6], GenParams(max_tokens=2))
    # without max_tokens a request may use the rest of the context, and stops there
    res = engine.complete([5] * (ctx - 3), GenParams(temperature=0, ignore_eos=True))
    assert res.finish_reason == "length" and res.completion_tokens == 3


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -1},
        {"temperature": float("nan")},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": -2},
        {"max_tokens": 0},
        {"max_tokens": -5},
        {"repetition_penalty": 0},
        {"presence_penalty": 3},
        {"frequency_penalty": -2.5},
        {"stop": [""]},
        {"stop": ["a"] * 9},
        {"seed": "x"},
    ],
)
def test_invalid_sampling_values(bad):
    with pytest.raises(ValueError) as e:
        GenParams(**bad).validate()
    assert next(iter(bad)) in str(e.value)


class Gate(torch.nn.Module):
    """Wraps a model so that each forward waits for an event (and optionally sleeps); used with
    fast_path=False so that the engine calls the model."""

    def __init__(self, model, delay=0.0):
        super().__init__()
        self.inner, self.delay, self.open = model, delay, threading.Event()
        self.fail = 0

    def forward(self, *a, **k):
        self.open.wait(10)
        if self.fail:
            self.fail -= 1
            raise RuntimeError("boom")
        if self.delay:
            time.sleep(self.delay)
        return self.inner(*a, **k)


def test_queue_full_cancel_and_no_leaked_slots(model_dir):
    eng = Engine.from_pretrained(model_dir, max_batch=1, max_queue=1, fast_path=False)
    gate = Gate(eng.model)
    eng.model = gate
    with eng:
        a = eng.submit([5, 6, 7], GenParams(max_tokens=50, ignore_eos=True))
        b = eng.submit([5, 6, 7], GenParams(max_tokens=50, ignore_eos=True))
        with pytest.raises(EngineFull, match="busy"):
            eng.submit([5, 6, 7], GenParams(max_tokens=5))
        assert eng.stats()["rejected"] == 1
        a.cancel()
        b.cancel()
        gate.open.set()
        assert list(a)[-1].finish_reason == "cancelled"
        assert list(b)[-1].finish_reason == "cancelled"
        st = wait_idle(eng)
        assert st["cancelled"] == 2
        # and the engine still serves
        assert eng.complete([5, 6], GenParams(max_tokens=3, ignore_eos=True)).completion_tokens == 3


def test_a_failing_forward_fails_requests_not_the_engine(model_dir):
    eng = Engine.from_pretrained(model_dir, max_batch=2, fast_path=False)
    gate = Gate(eng.model)
    gate.fail = 1
    gate.open.set()
    eng.model = gate
    with eng:
        res = eng.complete([5, 6, 7], GenParams(max_tokens=5))
        assert res.finish_reason == "error" and "boom" in res.error
        ok = eng.complete([5, 6, 7], GenParams(max_tokens=5, ignore_eos=True))
        assert ok.finish_reason == "length"
        assert eng.stats()["errors"] == 1 and eng.stats()["running"] == 0


def test_close_finishes_waiting_requests(model_dir):
    eng = Engine.from_pretrained(model_dir, max_batch=1, max_queue=4, fast_path=False)
    gate = Gate(eng.model)
    eng.model = gate
    eng.start()
    reqs = [eng.submit([5, 6], GenParams(max_tokens=100, ignore_eos=True)) for _ in range(3)]
    threading.Timer(0.2, gate.open.set).start()
    eng.close()
    assert all(list(r)[-1].finish_reason in ("cancelled", "length") for r in reqs)


def test_run_directory_resolves_to_its_model(model_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "pretrain" / "model")
    eng = Engine.from_pretrained(run)
    assert eng.name == "pretrain"
    with pytest.raises(CheckpointError, match="no such model folder"):
        Engine.from_pretrained(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="neither a model folder"):
        Engine.from_pretrained(tmp_path)


def test_lora_adapter_merged_or_not(model_dir, tmp_path):
    lora = pytest.importorskip("lmforge.peft.lora", reason="lmforge.peft not in this build")
    from lmforge.model.hf import load_pretrained

    model = load_pretrained(model_dir)
    lora.apply_lora(model, lora.LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            m.lora_B.weight.normal_(0, 0.5)
    lora.save_adapter(model, tmp_path / "adapter")
    p = GenParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompt = [5, 6, 7, 8]
    outs = {}
    for label, kw in (
        ("base", {}),
        ("lora", {"adapter": tmp_path / "adapter"}),
        ("merged", {"adapter": tmp_path / "adapter", "merge": True}),
    ):
        with Engine.from_pretrained(model_dir, **kw) as eng:
            outs[label] = eng.complete(prompt, p).token_ids
            if label == "lora":
                assert eng.name.endswith("+adapter")
                assert eng.fast is None  # LoRA layers: the model's own forward
            else:
                assert eng.fast is not None
    assert outs["lora"] == outs["merged"] != outs["base"]
    with pytest.raises(CheckpointError, match="no such adapter"):
        Engine.from_pretrained(model_dir, adapter=tmp_path / "nope")


def test_hf_llama_checkpoint_generates_like_transformers(model_dir, tmp_path):
    """A checkpoint written by transformers (LlamaForCausalLM) runs in the engine and its greedy
    tokens equal transformers' own `generate`."""
    transformers = pytest.importorskip("transformers")
    from lmforge.model.hf import copy_tokenizer_files

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    out = tmp_path / "hfllama"
    hf.save_pretrained(out, safe_serialization=True)
    copy_tokenizer_files(model_dir, out)
    eng = Engine.from_pretrained(out, max_batch=2)
    prompts = [eng.encode("The function returns"), eng.encode("x")]
    with eng:
        outs = eng.generate(prompts, GenParams(max_tokens=12, temperature=0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        ref = hf.generate(
            torch.tensor([p]), max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=2
        )[0, len(p) :].tolist()
        assert o.token_ids == ref


def test_gqa_attention_switch_is_exact_and_guarded(model_dir):
    from lmforge.model.hf import load_pretrained
    from lmforge.model.transformer import Attention
    from lmforge.serve.fastpath import use_gqa_attention

    model = load_pretrained(model_dir)
    ids = torch.randint(0, model.cfg.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
        assert use_gqa_attention(model)
        assert all("forward" in vars(m) for m in model.modules() if type(m) is Attention)
        assert torch.allclose(model(ids), ref, atol=1e-5)

    class Other(Attention):  # a subclass (e.g. a future variant) is left alone
        pass

    model2 = load_pretrained(model_dir)
    for blk in model2.model.layers:
        blk.self_attn.__class__ = Other
    assert not use_gqa_attention(model2)
