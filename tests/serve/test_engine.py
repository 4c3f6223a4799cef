"""The batched generation engine: exactness against model.generate, sampling controls, stops,
limits, cancellation, failure isolation, HF-imported models and adapters."""

import threading
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lmforge.errors import CheckpointError
from lmforge.model.generate import SamplingParams, generate
from lmforge.serve.engine import Engine, EngineFull, GenParams
from lmforge.serve.request import _held_back
from tests.factories import make_tiny_model
from tests.fuzz_support import fuzz

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


# ----------------------------------------------------------------------------- fixed-shape decode
def test_buckets_cover_every_size():
    from lmforge.serve.static_decode import buckets

    assert buckets(8) == [1, 2, 4, 8] and buckets(6) == [1, 2, 4, 6] and buckets(1) == [1]
    assert buckets(256, 64) == [64, 128, 256] and buckets(48, 64) == [48]


def test_static_bucketed_decode_is_token_for_token_the_eager_path(engine, model_dir):
    """The step that CUDA graphs replay (fixed batch and key buckets, padding rows, position
    masks, no host read-back) runs eagerly on CPU: greedy tokens equal the eager engine's and
    model.generate's, with requests of different lengths joining and leaving mid-flight."""
    from lmforge.serve.static_decode import StaticDecode

    static = Engine.from_pretrained(model_dir, max_batch=3, decode="static")
    assert isinstance(static.static, StaticDecode) and engine.static is None  # CPU default: eager
    ids = [engine.encode(p) for p in PROMPTS] + [[5] * 70]  # the last crosses the 64-key bucket
    p = GenParams(max_tokens=24, temperature=0, ignore_eos=True)
    with static:
        got = [o.token_ids for o in static.generate(ids, p)]
    assert got == [o.token_ids for o in engine.generate(ids, p)]
    assert got[0] == generate(engine.model, [ids[0]], SamplingParams(max_new_tokens=24, temperature=0))[0]
    assert static.static.bucket(3, 71) == (3, 128) and static.static.bucket(2, 10) == (2, 64)


def test_static_decode_needs_the_fast_path(model_dir):
    with pytest.raises(ValueError, match="fast path"):
        Engine.from_pretrained(model_dir, fast_path=False, decode="static")
    with pytest.raises(ValueError, match="decode="):
        Engine.from_pretrained(model_dir, decode="turbo")
    with pytest.raises(ValueError, match="CUDA"):
        Engine.from_pretrained(model_dir, decode="graph")  # no GPU here: refused, not faked


# ----------------------------------------------------------------------------- logprobs, logit_bias
def test_logprobs_are_the_models_log_softmax(engine):
    ids = engine.encode(PROMPTS[0])
    res = engine.complete(ids, GenParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3))
    assert [lp.token_id for lp in res.logprobs] == res.token_ids
    full = torch.tensor([ids + res.token_ids])
    with torch.no_grad():
        ref = engine.model(full)[0].float().log_softmax(-1)
    for t, lp in enumerate(res.logprobs):
        row = ref[len(ids) - 1 + t]
        assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
        assert [i for i, _ in lp.top] == row.topk(3).indices.tolist()
        assert lp.top[0][0] == lp.token_id  # greedy: the chosen token is the most likely
    off = engine.complete(ids, GenParams(max_tokens=2, temperature=0))
    assert off.logprobs is None


def test_logit_bias_forces_and_bans_tokens(engine):
    ids = engine.encode(PROMPTS[1])
    base = engine.complete(ids, GenParams(max_tokens=5, temperature=0, ignore_eos=True)).token_ids
    forced = engine.complete(
        ids, GenParams(max_tokens=5, temperature=0, ignore_eos=True, logit_bias={"77": 100})
    ).token_ids
    assert forced == [77] * 5
    banned = engine.complete(
        ids, GenParams(max_tokens=5, temperature=0.8, seed=3, ignore_eos=True, logit_bias={base[0]: -100})
    ).token_ids
    assert base[0] not in banned[:1]
    with pytest.raises(ValueError, match="logit_bias"):
        engine.submit(ids, GenParams(max_tokens=2, logit_bias={10**6: 1}))
    for bad in ({"x": 1}, {"5": 101}, {"5": float("nan")}, {-1: 0}):
        with pytest.raises(ValueError, match="logit_bias"):
            GenParams(logit_bias=bad).validate()
    with pytest.raises(ValueError, match="logprobs"):
        GenParams(logprobs=21).validate()


# ----------------------------------------------------------------------------- sampling safety
def test_values_float32_cannot_hold_are_refused_or_harmless(engine):
    with pytest.raises(ValueError, match="repetition_penalty"):
        GenParams(repetition_penalty=5e-324).validate()
    greedy = engine.complete(PROMPTS[2], GenParams(max_tokens=8, temperature=0, ignore_eos=True)).token_ids
    tiny_p = engine.complete(PROMPTS[2], GenParams(max_tokens=8, top_p=1e-50, ignore_eos=True))
    assert tiny_p.finish_reason == "length" and tiny_p.token_ids == greedy


class Poison(torch.nn.Module):
    """NaN logits for every row whose input token is `bad` (used with fast_path=False)."""

    def __init__(self, model, bad):
        super().__init__()
        self.inner, self.bad = model, bad

    def forward(self, ids, **k):
        out = self.inner(ids, **k).clone()
        out[ids[:, -1] == self.bad] = float("nan")
        return out


def test_a_non_finite_row_fails_only_its_request(model_dir):
    """The sampler flags a row whose logits are NaN instead of raising: the engine ends that
    request with an error and the rest of the batch decodes on."""
    from lmforge.serve.sampling import sample_rows

    eng = Engine.from_pretrained(model_dir, max_batch=3, fast_path=False)
    ref = eng.complete([5, 6, 7], GenParams(max_tokens=12, temperature=0, ignore_eos=True)).token_ids
    eng.model = Poison(eng.model, 77)
    with eng:
        a = eng.submit([5, 6, 7], GenParams(max_tokens=12, temperature=0, ignore_eos=True))
        # its first token is forced to 77, so its next decode row is NaN, in the same batch as `a`
        b = eng.submit([5, 8], GenParams(max_tokens=12, temperature=0.7, logit_bias={77: 100}))
        c = eng.submit([9, 77], GenParams(max_tokens=12))  # NaN at prefill
        ra, rb, rc = a.result(), b.result(), c.result()
    assert ra.finish_reason == "length" and ra.token_ids == ref
    assert rb.finish_reason == rc.finish_reason == "error" and "not finite" in rb.error
    assert rb.token_ids == [77] and rc.token_ids == []

    x = torch.randn(3, 10)
    x[1, 4] = float("nan")
    ps = [GenParams(temperature=0), GenParams(temperature=0.7), GenParams(temperature=1.0, top_p=0.5)]
    tokens, health = sample_rows(x, ps, [None, None, torch.Generator().manual_seed(0)])
    assert torch.isfinite(health).tolist() == [True, False, True] and tokens[0] == x[0].argmax()


_weird = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([5e-324, 1e-50, 1e-45, 1.1e-38, 1e-5, 9.9e-6, 1e-4, 0.0, 100.0, 1e30]),
    st.integers(-3, 3),
)
_hostile = st.fixed_dictionaries(
    {},
    optional={
        "temperature": _weird,
        "top_p": _weird,
        "top_k": st.one_of(st.none(), st.integers(-2, 10**6)),
        "repetition_penalty": _weird,
        "presence_penalty": _weird,
        "frequency_penalty": _weird,
        "logit_bias": st.dictionaries(
            st.one_of(st.integers(-1, 400), st.text(max_size=3)), _weird, max_size=3
        ),
        "logprobs": st.one_of(st.none(), st.integers(-1, 25)),
        "seed": st.one_of(st.none(), st.integers(0, 2**32)),
    },
)


@fuzz(25)
@given(a=_hostile, b=_hostile)
def test_fuzzed_sampling_parameters_never_break_the_batch(engine, a, b):
    """Any sampling parameters: refused with a ValueError naming the field, or a normal finish;
    a greedy request decoding beside them gets exactly its tokens."""
    ids = engine.encode(PROMPTS[4])
    want = GenParams(max_tokens=6, temperature=0, ignore_eos=True)
    witness = engine.submit(ids, want)
    others = []
    for kw in (a, b):
        try:
            others.append(engine.submit(ids, GenParams(max_tokens=6, **kw)))
        except ValueError as e:
            assert any(name in str(e) for name in kw), str(e)
    assert witness.result().token_ids == _greedy_ref(engine, tuple(ids))
    for r in others:
        res = r.result()
        assert res.finish_reason in ("stop", "length"), res.error


_REF: dict = {}


def _greedy_ref(engine, ids: tuple) -> list[int]:
    if ids not in _REF:
        _REF[ids] = generate(engine.model, [list(ids)], SamplingParams(max_new_tokens=6, temperature=0))[0]
    return _REF[ids]


def test_identical_prompts_share_their_prefill(engine, model_dir):
    """n samples of one prompt (a GRPO group): the first is prefilled, the others copy its K/V;
    tokens equal those of an engine that prefills each one, seeded or greedy."""
    ids = engine.encode(PROMPTS[2])
    sampled = [GenParams(max_tokens=10, temperature=1.0, seed=s, ignore_eos=True) for s in range(4)]
    greedy = GenParams(max_tokens=10, temperature=0, ignore_eos=True)
    outs = {}
    for share in (True, False):
        with Engine.from_pretrained(model_dir, max_batch=5, share_prefill=share) as eng:
            outs[share] = [o.token_ids for o in eng.generate([ids] * 5, [*sampled, greedy])]
            assert eng.stats()["prefill_shared"] == (4 if share else 0)
    assert outs[True] == outs[False]
    assert outs[True][4] == _greedy_ref(engine, tuple(ids)) + outs[True][4][6:]
    assert len({tuple(o) for o in outs[True][:4]}) > 1  # different seeds, different samples


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_decode_equals_eager_on_the_gpu(model_dir):
    """On a GPU: the captured-and-replayed step gives the eager step's greedy tokens, requests
    joining and leaving, across batch and key buckets; seeded sampling runs and repeats."""
    ids = [Engine.from_pretrained(model_dir).encode(p) for p in PROMPTS] + [[5] * 70]
    greedy = GenParams(max_tokens=24, temperature=0, ignore_eos=True)
    seeded = GenParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    outs = {}
    for mode in ("eager", "graph"):
        with Engine.from_pretrained(model_dir, device="cuda", max_batch=3, decode=mode) as eng:
            outs[mode] = [o.token_ids for o in eng.generate(ids, greedy)]
            s1 = eng.generate(ids[:3], seeded)
            assert [o.token_ids for o in s1] == [o.token_ids for o in eng.generate(ids[:3], seeded)]
            assert all(o.finish_reason == "length" for o in s1)
            if mode == "graph":
                got = eng.static.captured()
                assert (3, 64) in got and any(kb == 128 for _, kb in got), got
    assert outs["graph"] == outs["eager"]


def test_batched_prefill_equals_one_prompt_at_a_time(engine):
    """Right-padded prompts in one forward (or in chunks under a token budget) give each prompt
    the logits and the cached K/V of its own forward."""
    from lmforge.serve.kvcache import SlotCache
    from lmforge.serve.prefill import prefill

    jobs = list(zip([2, 0, 3, 1], [engine.encode(p) for p in PROMPTS[:4]]))
    runs = []
    for budget in (10_000, 20, 1):  # one forward; chunks of <= 20 padded tokens; one prompt each
        cache = SlotCache(engine.model.cfg, 4, 64, "cpu", torch.float32)
        runs.append((prefill(engine.fast, engine.model, cache, jobs, "cpu", budget), cache))
    for j, (slot, ids) in enumerate(jobs):
        with torch.no_grad():
            ref = engine.model(torch.tensor([ids]))[0, -1].float()
        for logits, cache in runs:
            assert torch.allclose(logits[j], ref, atol=1e-5)
            n = len(ids)
            assert torch.allclose(cache.k[1][slot, :, :n], runs[-1][1].k[1][slot, :, :n], atol=1e-6)


@fuzz(60)
@given(st.lists(st.integers(0, 383), max_size=40))
def test_incremental_text_equals_decoding_all_tokens(engine, ids):
    """Any token sequence, partial UTF-8 bytes and special tokens included: the text built one
    token at a time is the decode of all tokens, at every step."""
    from lmforge.serve.request import Request

    req = Request([1], GenParams(), set(), 100, None)
    decode = engine._text_of
    for t in ids:
        req.out_ids.append(t)
        req.update_text(decode)
        assert req.text == decode(req.out_ids)


def test_static_step_has_the_same_sampling_semantics(engine, model_dir):
    """Seeded sampling, penalties, logit_bias, logprobs and shared prefill through the bucketed
    step give what the eager step gives (the logits agree to float rounding, the draws are the
    same)."""
    ids = [engine.encode(p) for p in PROMPTS[:3]]
    ps = [
        GenParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True, logprobs=2),
        GenParams(max_tokens=12, temperature=1.0, top_k=20, repetition_penalty=1.3, seed=4, ignore_eos=True),
        GenParams(max_tokens=12, temperature=0, logit_bias={7: 5.0}, frequency_penalty=0.5, ignore_eos=True),
    ]
    outs = {}
    for mode in ("eager", "static"):
        with Engine.from_pretrained(model_dir, max_batch=4, decode=mode) as eng:
            outs[mode] = eng.generate([*ids, ids[0]], [*ps, ps[0]])
    for a, b in zip(outs["eager"], outs["static"]):
        assert a.token_ids == b.token_ids
    lp_a, lp_b = outs["eager"][0].logprobs, outs["static"][0].logprobs
    assert [x.logprob for x in lp_a] == pytest.approx([x.logprob for x in lp_b], abs=1e-4)
    assert outs["static"][3].token_ids == outs["static"][0].token_ids  # same prompt, seed: shared prefill


def test_batch_requests_decode_once_and_match_streamed_ones(engine):
    """`generate` (no text per token) and `complete` (streamed text) give the same answers, with
    and without stop strings; the batch request's text arrives whole in its last chunk."""
    for p in (
        GenParams(max_tokens=16, temperature=0, ignore_eos=True),
        GenParams(max_tokens=16, temperature=0, stop=["e"]),
    ):
        batch = engine.generate(PROMPTS[:3], p)
        streamed = [engine.complete(x, p) for x in PROMPTS[:3]]
        assert [(o.text, o.token_ids, o.finish_reason) for o in batch] == [
            (o.text, o.token_ids, o.finish_reason) for o in streamed
        ]
    req = engine.submit(
        engine.encode(PROMPTS[0]), GenParams(max_tokens=5, ignore_eos=True), stream_text=False
    )
    chunks = list(req)
    assert all(c.text == "" for c in chunks[:-1]) and chunks[-1].text == req.text != ""


def test_a_kv_cache_that_cannot_fit_is_refused_before_allocation(model_dir):
    """max_batch full contexts of keys and values: a size no machine holds is a config error
    naming the setting, raised at once instead of an allocation failure deep in torch."""
    from lmforge.errors import ConfigError
    from lmforge.model.hf import load_pretrained
    from lmforge.tokenizer import LMTokenizer

    with pytest.raises(ConfigError, match=r"serve engine: needs about .*KV cache.*--max-batch"):
        Engine(load_pretrained(model_dir), LMTokenizer.load(model_dir), max_batch=10**12)


# ----------------------------------------------------------------------------- chunked prefill
def _windowed_model():
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    torch.manual_seed(1)
    cfg = ModelConfig(
        vocab_size=384, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96,
        init_std=0.2, sliding_window=8, layer_types=["sliding", "full"],
    )  # fmt: skip
    return Transformer(cfg).eval()


@pytest.mark.parametrize("kind", ["fast", "static", "plain", "windowed"])
def test_chunked_prefill_equals_one_shot_prefill(model_dir, kind):
    """A prompt longer than `prefill_chunk` is prefilled chunk by chunk: the same first-token
    log-probabilities and greedy tokens as one forward over it, for the fused fast path, the
    model's own forward, and a model with a sliding window shorter than the chunks."""
    from lmforge.model.hf import load_pretrained
    from lmforge.tokenizer import LMTokenizer

    tok = LMTokenizer.load(model_dir)
    model = _windowed_model() if kind == "windowed" else load_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (9, 12, 41, 5, 30)]
    p = GenParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3)
    runs = {}
    for chunk in (None, 7, 16):
        fused = kind in ("fast", "static")
        decode = "static" if kind == "static" else "eager"
        # 4 slots: three short prompts decode (batch bucket 4) while the long one is prefilled
        eng = Engine(model, tok, max_batch=4, fast_path=fused, decode=decode, prefill_chunk=chunk)
        assert (eng.fast is not None) == fused
        with eng:
            runs[chunk] = eng.generate(prompts, p)
    for chunk in (7, 16):
        for a, b in zip(runs[None], runs[chunk]):
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason == "length"
            assert a.logprobs is not None and b.logprobs is not None
            for x, y in zip(a.logprobs, b.logprobs):
                assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_long_prompt_prefill_interleaves_with_decoding(model_dir):
    """While a long prompt is prefilled chunk by chunk, the running requests keep decoding
    between its chunks; identical long prompts share one chunked prefill."""
    eng = Engine.from_pretrained(model_dir, max_batch=4, prefill_chunk=8)
    events: list[str] = []
    chunk_step, decode_step = eng._prefill_next_chunk, eng._decode_step

    def chunk():
        events.append("chunk")
        chunk_step()

    def decode():
        events.append("decode")
        decode_step()

    eng._prefill_next_chunk, eng._decode_step = chunk, decode
    long_ids = [5 + (i * 7) % 200 for i in range(60)]  # 8 chunks
    p = GenParams(temperature=0, ignore_eos=True)  # until the context is full: running throughout
    with eng:
        short = eng.submit(eng.encode("The function returns"), p)
        while not short.out_ids:  # the short request is decoding
            time.sleep(0.001)
        five = GenParams(max_tokens=5, temperature=0, ignore_eos=True)
        outs = eng.generate([long_ids] * 3, five)
        first = short.result()
    chunks = [i for i, e in enumerate(events) if e == "chunk"]
    assert len(chunks) == 8  # one chunked prefill for the three identical prompts
    between = events[chunks[0] : chunks[-1]]
    assert between.count("decode") >= len(chunks) - 1  # a decode step after every chunk
    assert eng.stats()["prefill_shared"] == 2
    ref = Engine.from_pretrained(model_dir, max_batch=4, prefill_chunk=None)
    with ref:
        assert [o.token_ids for o in outs] == [ref.complete(long_ids, five).token_ids] * 3
        assert first.token_ids == ref.complete(eng.encode("The function returns"), p).token_ids
