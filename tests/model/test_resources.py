"""Memory estimates: closed forms checked against real tensors; absurd configs refused up front."""

import json

import pytest

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.model.config import ModelConfig
from lmforge.model.hf import load_pretrained
from lmforge.model.resources import (
    MemoryEstimate,
    check_fits,
    human_bytes,
    inference_memory,
    kv_cache_bytes,
    rope_bytes,
    training_memory,
)
from lmforge.model.transformer import Transformer
from lmforge.stages.pretrain import PretrainConfig, warn_repeats
from tests.conftest import save_base_model, tiny_args

TEXTS = [f"line {i}: pack my box with five dozen liquor jugs {i * 3}" for i in range(60)]
CFG = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)


def test_weights_and_rope_match_the_built_model():
    model = Transformer(CFG)
    real = sum(p.numel() * p.element_size() for p in model.parameters())
    est = inference_memory(CFG, dtype_bytes=4)
    assert est.parts[0].bytes == real
    rope = model.model.rotary
    stored = rope.cos.nbytes + rope.sin.nbytes
    assert stored <= rope_bytes(CFG) <= 3 * stored  # the tables plus their build temporaries


def test_training_estimate_counts_adamw_state_and_kv_cache_closed_form():
    est = {p.name: p.bytes for p in training_memory(CFG, batch_size=2, seq_len=16).parts}
    p = CFG.param_count()
    assert est["weights"] == est["gradients"] == 4 * p
    assert est["adamw state"] == 8 * p
    assert est["logits"] == 3 * 4 * 2 * 16 * 300
    assert (
        kv_cache_bytes(CFG, 10, 2) == 2 * 2 * 2 * 8 * 10 * 2
    )  # K+V x layers x kv heads x hd x tokens x bytes


def test_check_fits_names_the_largest_part_and_its_keys():
    est = MemoryEstimate().add("weights", 10e9, "a.b=1").add("activations", 90e9, "pretrain.seq_len=9")
    with pytest.raises(
        ConfigError,
        match=r"job: needs about 100\.0 GB .* activations \(90\.0 GB\), is sized by pretrain\.seq_len=9",
    ):
        check_fits(est, "cpu", "job", limit=50_000_000_000)
    check_fits(est, "cpu", "job", limit=200_000_000_000)
    assert human_bytes(1.28e12) == "1.3 TB"


@pytest.fixture
def folder(tmp_path):
    save_base_model(tmp_path, TEXTS, 300)
    return tmp_path


def _set(folder, **kv):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(kv)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_model_folder_with_absurd_context_is_refused(folder):
    load_pretrained(folder)
    _set(folder, max_position_embeddings=1e10)
    with pytest.raises(
        ConfigError,
        match=r"config\.json: needs about .* TB.*RoPE tables.*max_position_embeddings=10000000000",
    ):
        load_pretrained(folder)


def test_model_folder_with_absurd_depth_is_refused(folder):
    _set(folder, num_hidden_layers=1e6)
    with pytest.raises(
        ConfigError,
        match=r"config\.json: describes .* parameters \(.*num_hidden_layers=1000000.*weight files hold only",
    ):
        load_pretrained(folder)


def test_absurd_width_is_refused_before_allocation(clone_run, capsys):
    root = clone_run("w")
    assert (
        main(
            [
                "pretrain",
                *tiny_args(root, "w"),
                "pretrain.model.d_model=600000000",
                "pretrain.model.n_heads=4",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "pretrain: needs about" in err and "pretrain.model.d_model=600000000" in err
    assert not (root / "w" / "pretrain" / "checkpoints").exists()


def test_many_epochs_warn_with_the_key_to_change():
    cfg = PretrainConfig(max_steps=100, warn_epochs=20)
    lines = []
    warn_repeats(cfg, tokens=100 * 16 * 2560, data_tokens=100_000, log=lines.append)
    assert len(lines) == 1 and "repeat the 100,000 training tokens 41 times" in lines[0]
    assert "pretrain.warn_epochs=20" in lines[0]
    warn_repeats(cfg, tokens=1000, data_tokens=400_000, log=lines.append)
    assert len(lines) == 1
