"""The sample stage generates through the serving engine: greedy completions equal the reference
sampler's, sampled ones are reproducible by seed and differ between a prompt's samples."""

from __future__ import annotations

import json

import pytest

from lmforge.model.generate import SamplingParams, generate
from lmforge.model.hf import load_pretrained
from lmforge.pipeline import load_config, run_stage
from lmforge.tokenizer import LMTokenizer
from tests.factories import PARAGRAPH, save_base_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread

PROMPTS = ["The function returns", "A list is the"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    save_base_model(d, [PARAGRAPH] * 10, 320, d_model=48, max_seq_len=64)
    return d


def _sample(tmp_path, base_dir, *overrides) -> list[dict]:
    cfg = load_config(
        None,
        [
            f"run.root={tmp_path}",
            f"sample.model={base_dir}",
            f"sample.prompts={json.dumps(PROMPTS)}",
            "sample.max_new_tokens=10",
            "run.device=cpu",
            *overrides,
        ],
    )
    out = run_stage(cfg, "sample", force=True)
    return [json.loads(line) for line in (out.dir / "samples.jsonl").read_text().splitlines()]


def test_greedy_samples_equal_the_reference_sampler(tmp_path, base_dir):
    rows = _sample(tmp_path, base_dir, "sample.temperature=0", "sample.num_samples=2")
    model, tok = load_pretrained(base_dir), LMTokenizer.load(base_dir)
    stops = [t for t in (tok.eos_id, tok.end_id) if t is not None]
    want = []
    for p in PROMPTS:
        ids = tok.encode(p, add_bos=True)
        out = generate(model, [ids], SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=stops))[
            0
        ]
        want += [{"prompt": p, "completion": tok.decode(out)}] * 2
    assert rows == want and all(r["completion"] for r in rows)


def test_sampled_completions_are_reproducible_by_seed(tmp_path, base_dir):
    a = _sample(tmp_path / "a", base_dir, "sample.num_samples=3", "sample.seed=5", "sample.temperature=1.5")
    b = _sample(tmp_path / "b", base_dir, "sample.num_samples=3", "sample.seed=5", "sample.temperature=1.5")
    c = _sample(tmp_path / "c", base_dir, "sample.num_samples=3", "sample.seed=6", "sample.temperature=1.5")
    assert a == b != c
    assert len({r["completion"] for r in a[:3]}) > 1  # a prompt's samples are distinct draws


def test_an_adapter_folder_samples_on_its_base_model(tmp_path, base_dir):
    """`sample.model` may be a prompt-tuning adapter: its base model with the virtual tokens
    before each prompt, greedy tokens equal to the reference decoder's on the wrapped model."""
    from lmforge.peft.prompt import PromptTuned

    base = tmp_path / "peaked"  # a large init: greedy tokens follow the prefix
    save_base_model(base, [PARAGRAPH] * 10, 320, d_model=48, max_seq_len=64, init_std=0.2)
    pt = PromptTuned(load_pretrained(base).eval(), 3, seed=4)
    pt.save_adapter(tmp_path / "adapter", base_model=str(base))
    rows = _sample(tmp_path, tmp_path / "adapter", "sample.temperature=0")
    tok = LMTokenizer.load(base)
    stops = [t for t in (tok.eos_id, tok.end_id) if t is not None]
    greedy = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=stops)
    for row, p in zip(rows, PROMPTS, strict=True):
        ids = tok.encode(p, add_bos=True)
        assert row["completion"] == tok.decode(generate(pt, [ids], greedy, use_cache=False)[0])
        assert row["completion"] != tok.decode(generate(pt.model, [ids], greedy)[0])
