"""The paged K/V cache: the engine's tokens equal the slot cache's token for token; shared
prefill holds the prompt's full blocks once; blocks come back when requests end; a pool too small
for one more request makes it wait, not fail."""

import threading
import time

import pytest
import torch

from lmforge.serve.engine import Engine, GenParams
from lmforge.serve.paged import PagedCache
from tests.factories import tiny_model

VOCAB = 256


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _model(kind: str):
    if kind == "windowed":
        from lmforge.model.config import ModelConfig
        from lmforge.model.transformer import Transformer

        torch.manual_seed(1)
        cfg = ModelConfig(
            vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96,
            init_std=0.2, sliding_window=8, layer_types=["sliding", "full"],
        )  # fmt: skip
        return Transformer(cfg).eval()
    model = tiny_model(VOCAB, max_seq_len=96)
    if kind == "lora":
        lora = pytest.importorskip("lmforge.peft.lora", reason="lmforge.peft not in this build")
        lora.apply_lora(model, lora.LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
        torch.manual_seed(2)
        with torch.no_grad():
            for _, m in lora.lora_modules(model):
                m.lora_B.weight.normal_(0, 0.5)
    return model


def _engine(model, kind="paged", **kw):
    kw.setdefault("max_batch", 3)
    return Engine(model, None, stop_token_ids=[], kv_cache=kind, **kw)


@pytest.mark.parametrize("kind", ["fast", "static", "plain", "lora", "windowed"])
def test_paged_tokens_equal_slot_tokens(kind):
    """Mixed prompt lengths through 4 slots (requests join and leave), chunked prefill of the long
    ones, identical prompts sharing a prefill, blocks of 4 positions: the paged cache gives the
    slot cache's greedy tokens and log-probabilities, for the fused fast path, its bucketed
    static step, the model's own forward, a LoRA-wrapped model and a sliding-window model."""
    model = _model(kind)
    a, b, *rest = _prompts((9, 30, 3, 17, 5, 41))
    prompts = [a, a, b, b, *rest]  # a short and a long prompt admitted twice in the first round
    p = GenParams(max_tokens=14, temperature=0, logprobs=2)
    fast = kind in ("fast", "static")
    decode = "static" if kind == "static" else "eager"
    outs = {}
    for cache in ("slot", "paged"):
        eng = _engine(model, cache, max_batch=4, fast_path=fast, decode=decode, prefill_chunk=8, block_size=4)
        assert (eng.fast is not None) == fast
        with eng:
            outs[cache] = eng.generate(prompts, p)
            stats = eng.stats()
        if cache == "paged":
            assert stats["kv_blocks_used"] == 0 and stats["prefill_shared"] == 2
    for a, b in zip(outs["slot"], outs["paged"]):
        assert a.token_ids == b.token_ids and b.finish_reason == "length"
        assert a.logprobs is not None and b.logprobs is not None
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def _peak_blocks(eng) -> list[int]:
    """Record the blocks in use before every decode step."""
    peak: list[int] = []
    step = eng._decode_step

    def recording():
        peak.append(eng.cache.blocks_used())
        step()

    eng._decode_step = recording
    return peak


@pytest.mark.parametrize("chunk", [None, 8])
def test_shared_prefill_holds_the_prompt_blocks_once(chunk):
    """4 samples of a 21-token prompt, 6 new tokens each, blocks of 4: shared, the first sample
    reserves ceil(27/4) = 7 blocks and each other only its own 2 (its copy of the partial prompt
    block and the answer's); unshared, 4 x 7. Same tokens either way, with or without chunks."""
    model = tiny_model(VOCAB, max_seq_len=64)
    (prompt,) = _prompts((21,))
    ps = [GenParams(max_tokens=6, temperature=1.0, seed=s) for s in range(4)]
    outs, peaks = {}, {}
    for share in (True, False):
        eng = _engine(model, max_batch=4, share_prefill=share, prefill_chunk=chunk, block_size=4)
        peak = _peak_blocks(eng)
        with eng:
            outs[share] = [o.token_ids for o in eng.generate([prompt] * 4, ps)]
            stats = eng.stats()
        assert stats["prefill_shared"] == (3 if share else 0)
        peaks[share] = max(peak)
        assert stats["kv_blocks_peak"] == peaks[share]
        assert eng.cache.blocks_used() == 0 and eng.cache.free and all(r == 0 for r in eng.cache.refs)
    assert peaks == {True: 7 + 3 * 2, False: 4 * 7}
    assert outs[True] == outs[False]
    assert len({tuple(o) for o in outs[True]}) > 1  # different seeds, different samples


def test_blocks_come_back_after_finish_cancel_and_error():
    model = tiny_model(VOCAB, max_seq_len=64)
    eng = _engine(model, max_batch=2, block_size=4)
    total = eng.cache.usable_blocks
    with eng:
        eng.generate(_prompts((5, 12, 7)), GenParams(max_tokens=5, temperature=0))
        assert eng.stats()["kv_blocks_used"] == 0
        req = eng.submit([5, 6, 7], GenParams(temperature=0))  # runs until the context is full
        while not req.out_ids:
            time.sleep(0.001)
        assert eng.cache.blocks_used() == 16  # the whole context: 64 / 4
        req.cancel()
        assert list(req)[-1].finish_reason == "cancelled"
        time.sleep(0.05)
        assert eng.cache.blocks_used() == 0
        calls = {"n": 0}
        forward = model.forward

        def failing(*a, **kw):  # the decode step's forward raises once
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("boom")
            return forward(*a, **kw)

        model.forward = failing
        res = eng.generate(_prompts((5, 9), seed=1), GenParams(max_tokens=5, temperature=0))
        assert {r.finish_reason for r in res} == {"error"} and "boom" in (res[0].error or "")
        assert eng.cache.blocks_used() == 0 and len(eng.cache.free) == total
        ok = eng.complete([5, 6, 7], GenParams(max_tokens=4, temperature=0))
        assert ok.finish_reason == "length" and eng.cache.blocks_used() == 0


def test_a_pool_too_small_for_one_more_request_makes_it_wait():
    """Blocks for one request at a time (3 slots): the others wait in the queue and complete,
    with the tokens they get alone; a request larger than the whole pool is refused at once."""
    model = tiny_model(VOCAB, max_seq_len=64)
    prompts = _prompts((10, 7, 12, 9))
    p = GenParams(max_tokens=6, temperature=0)  # <= 18 positions: 5 blocks of 4
    eng = _engine(model, max_batch=3, block_size=4, kv_blocks=1 + 5)
    peak = _peak_blocks(eng)
    with eng:
        got = [o.token_ids for o in eng.generate(prompts, p)]
        assert eng.stats()["kv_waits"] > 0 and max(peak) <= 5
        with pytest.raises(ValueError, match="needs 6 K/V blocks of 4 positions but the pool has 5"):
            eng.submit(prompts[0], GenParams(max_tokens=12))
    with _engine(model, "slot") as ref:
        assert got == [ref.complete(x, p).token_ids for x in prompts]


def test_the_block_table_is_what_moves():
    """Unit level: a copy shares the full prompt blocks and copies the partial one; writing the
    copy's next position leaves the source's alone; `swap` moves table rows, not K/V; release
    frees a shared block when its last user lets go."""
    model = tiny_model(VOCAB, max_seq_len=32)
    kv, d = model.cfg.kv_heads, model.cfg.head_dim
    c = PagedCache(model.cfg, 3, 32, "cpu", torch.float32, block_size=4, n_blocks=1 + 8)
    assert c.reserve(0, 10 + 4) and c.reserve(1, 10 + 4, shared=10)
    assert c.blocks_used() == 4 + 2 and not c.reserve(2, 10**6)  # 8 blocks (the context) > 2 free
    k = torch.randn(1, kv, 10, d)
    for li in range(model.cfg.n_layers):
        c.prefill(0, 10).update(li, k, k)
    c.move(0, 1, 10)
    assert c.rows[1][:2] == c.rows[0][:2] and c.rows[1][2] != c.rows[0][2]
    assert [c.refs[b] for b in c.rows[0]] == [2, 2, 1, 1]
    new = torch.randn(2, kv, 1, d)
    kk, vv = c.decode(slice(0, 2), torch.tensor([10, 10]), 11).update(0, new, new)
    assert kk.shape == (2, kv, 11, d) and torch.equal(kk, vv)
    assert torch.equal(kk[:, :, :10], k.expand(2, -1, -1, -1)) and torch.equal(kk[:, :, 10:], new)
    before = [b.clone() for b in c.k_blocks]
    c.swap(0, 2)
    assert all(torch.equal(a, b) for a, b in zip(before, c.k_blocks)) and c.rows[0] == []
    assert c.table[0].eq(0).all() and c.table[2, :4].tolist() == c.rows[2]
    c.release(2)
    assert c.blocks_used() == 4 and [c.refs[b] for b in c.rows[1]] == [1, 1, 1, 1]
    c.release(1)
    assert c.blocks_used() == 0 and c.table.eq(0).all()


def test_engine_settings_are_checked():
    model = tiny_model(VOCAB, max_seq_len=64)
    with pytest.raises(ValueError, match="kv_cache='ring' is invalid"):
        _engine(model, "ring")
    with pytest.raises(ValueError, match="decode='graph' .* needs kv_cache='slot'"):
        _engine(model, fast_path=True, decode="graph")
    eng = _engine(model, max_batch=4)  # the default pool: 4 full contexts and the scratch block
    assert eng.cache.n_blocks == 4 * 64 // 16 + 1 and eng.static is None


def test_concurrent_submits_never_leak_blocks():
    """Requests arriving from threads while others finish and get cancelled."""
    model = tiny_model(VOCAB, max_seq_len=64)
    eng = _engine(model, max_batch=3, block_size=4, kv_blocks=1 + 12, max_queue=32)
    prompts = _prompts((4, 9, 14, 6, 11, 3), seed=3)
    results = []

    def client(i):
        r = eng.submit(prompts[i % 6], GenParams(max_tokens=3 + i % 5, temperature=0))
        if i % 4 == 0:
            r.cancel()
        results.append(list(r)[-1].finish_reason)

    with eng:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(results) == 12 and set(results) <= {"length", "cancelled"}
        time.sleep(0.05)
        assert eng.cache.blocks_used() == 0


def test_serve_flags_choose_the_cache(tmp_path):
    """`lmforge serve --kv-cache paged --kv-blocks N` builds a paged engine of N blocks; a bad
    combination is a config error naming the flag."""
    import argparse

    from lmforge.errors import ConfigError
    from lmforge.serve.cli import add_parser, serve_engine
    from tests.factories import make_tiny_model

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    folder = str(make_tiny_model(tmp_path / "m"))
    a = parser.parse_args(["serve", folder, "--kv-cache", "paged", "--kv-blocks", "40", "--max-batch", "2"])
    eng = serve_engine(a)
    assert isinstance(eng.cache, PagedCache) and eng.cache.n_blocks == 40 and eng.fast is not None
    with eng:
        assert (
            eng.complete([5, 6, 7], GenParams(max_tokens=3, temperature=0, ignore_eos=True)).completion_tokens
            == 3
        )
    assert not isinstance(serve_engine(parser.parse_args(["serve", folder])).cache, PagedCache)
    with pytest.raises(ConfigError, match="--kv-blocks needs --kv-cache paged"):
        serve_engine(parser.parse_args(["serve", folder, "--kv-blocks", "40"]))


def test_generate_batch_on_the_paged_cache():
    """RL rollouts' entry point: groups of identical prompts, seeded; the same completions."""
    from lmforge.serve.batch import generate_batch

    model = tiny_model(VOCAB, max_seq_len=64)
    prompts = [p for p in _prompts((7, 19, 4), seed=5) for _ in range(4)]
    ps = [GenParams(max_tokens=6, temperature=1.0, seed=s) for s in range(len(prompts))]
    outs = {
        kind: [c.token_ids for c in generate_batch(model, prompts, ps, stop_token_ids=[], kv_cache=kind)]
        for kind in ("slot", "paged")
    }
    assert outs["slot"] == outs["paged"] and len({tuple(o) for o in outs["paged"]}) > 3


@pytest.mark.filterwarnings("ignore::lmforge.model.generic.GenericPathWarning")
def test_a_transformers_model_on_the_generic_path(tmp_path):
    """A family lmforge has no native module for (OLMo 2, run through `transformers`' own
    attention via the cache bridge): the same greedy tokens on both caches, chunked prefill on."""
    transformers = pytest.importorskip("transformers")
    from lmforge.model.hf import load_pretrained

    torch.manual_seed(0)
    cfg = transformers.Olmo2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3,
    )  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert getattr(model, "generic", False)
    a, *rest = _prompts((13, 4, 22, 9), seed=7)
    p = GenParams(max_tokens=10, temperature=0)
    outs = {}
    for kind in ("slot", "paged"):
        with _engine(model, kind, prefill_chunk=8, block_size=4) as eng:
            outs[kind] = [o.token_ids for o in eng.generate([a, a, *rest], p)]
            assert eng.stats()["prefill_shared"] == 1
    assert outs["slot"] == outs["paged"]
