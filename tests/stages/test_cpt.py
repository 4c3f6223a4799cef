"""Continued pretraining: new-domain loss falls, the original corpus is scored too, replay rows
are mixed into every batch, the annealing phase decays the LR to zero."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.data.instruct import builtin_instructions
from lmforge.data.shards import load_shard, write_token_shards
from lmforge.errors import ConfigError
from lmforge.pipeline import load_config, run_stage
from lmforge.stages.cpt import CPTConfig, _mix
from lmforge.tokenizer import train_tokenizer
from tests.conftest import save_base_model

DOMAIN = [
    "The quokka hops across Rottnest Island at dawn, looking for leaves and shade.",
    "A quokka can climb small trees; quokkas live on Rottnest Island near Perth.",
    "Rottnest Island rangers count every quokka each spring and log the numbers.",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpt")
    orig = [" ".join(m["content"] for m in r["messages"]) for r in builtin_instructions(max_examples=300)]
    tok, _ = save_base_model(root / "base", orig + DOMAIN * 5, 400, d_model=48, n_kv_heads=None)
    tok.save(root / "replay")
    write_token_shards(orig[:250], tok, root / "replay", "train")
    write_token_shards(orig[250:], tok, root / "replay", "val")
    (root / "domain.txt").write_text("\n\n".join(DOMAIN * 40))
    return root


def _cfg(root, *extra):
    return load_config(
        None,
        [
            f"run.root={root / 'runs'}",
            f"cpt.model={root / 'base'}",
            f"cpt.domain={root / 'domain.txt'}",
            f"cpt.replay={root / 'replay'}",
            "cpt.seq_len=32",
            "cpt.batch_size=4",
            "cpt.max_steps=10",
            "cpt.lr=1e-2",
            "cpt.warmup_steps=2",
            "cpt.eval_every=0",
            "cpt.log_every=50",
            "cpt.eval_tokens=2000",
            "run.device=cpu",
            *extra,
        ],
    )


def test_cpt_with_replay_and_anneal(setup):
    o = run_stage(_cfg(setup, "cpt.replay_fraction=0.5", "cpt.anneal_steps=4"), "cpt", force=True)
    m = o.metrics
    assert m["domain_loss_after"] < m["domain_loss_before"] - 0.5
    assert m["orig_loss_before"] is not None and m["orig_loss_after"] is not None
    assert m["anneal_steps"] == 4 and m["domain_loss_after_anneal"] is not None
    lrs = [
        r["lr"]
        for r in map(json.loads, (o.dir / "anneal" / "metrics.jsonl").read_text().splitlines())
        if "lr" in r
    ]
    assert lrs and lrs[-1] < 0.3 * 1e-2  # decaying to zero on the last steps
    assert (o.dir / "model" / "model.safetensors").exists()


def test_replay_rows_in_every_batch_and_resume(setup, tmp_path):
    from lmforge.tokenizer import LMTokenizer

    write_token_shards(DOMAIN * 20, LMTokenizer.load(setup / "base"), tmp_path, "dom")
    dom = load_shard(tmp_path, "dom")
    orig = load_shard(setup / "replay", "train")
    cfg = CPTConfig(batch_size=4, seq_len=16)
    mix = _mix(cfg, dom, orig, 0.25, seed=3)
    assert [ld.batch_size for ld in mix.loaders] == [3, 1]
    x, y = next(mix)
    assert x.shape == (4, 16)
    state = mix.state_dict()
    a = [next(mix)[0] for _ in range(3)]
    mix2 = _mix(cfg, dom, orig, 0.25, seed=3)
    mix2.load_state_dict(state)
    assert all(torch.equal(t, next(mix2)[0]) for t in a)


def test_cpt_skips_without_domain_and_checks_tokenizer(setup, tmp_path):
    cfg = load_config(None, [f"run.root={tmp_path}", "run.device=cpu"])
    assert run_stage(cfg, "cpt", force=True).metrics == {"skipped": True}
    other = train_tokenizer(DOMAIN * 10, vocab_size=300)
    other.save(tmp_path / "r")
    write_token_shards(DOMAIN * 10, other, tmp_path / "r", "train")
    write_token_shards(DOMAIN, other, tmp_path / "r", "val")
    with pytest.raises(ConfigError, match="different tokenizer"):
        run_stage(_cfg(setup, f"cpt.replay={tmp_path / 'r'}"), "cpt", force=True)
