"""Memory estimates: closed forms checked against real tensors; absurd configs refused up front."""

import json

import pytest

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.model.config import ModelConfig
from lmforge.model.hf import load_pretrained
from lmforge.model.resources import (
    MemoryEstimate,
    TimeEstimate,
    check_fits,
    check_time,
    estimate_training_time,
    human_bytes,
    inference_memory,
    kv_cache_bytes,
    matmul_flops_per_s,
    rope_bytes,
    training_flops_per_step,
    training_memory,
)
from lmforge.model.transformer import Transformer
from lmforge.scaling.flops import flops_per_token
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


# ----------------------------------------------------------------------------- time
def test_training_flops_per_step_is_the_closed_form():
    # CFG: d 32, 2 layers, 4 heads and 2 KV heads of 8, SwiGLU width 128, vocab 300, rows of 64
    per_layer = 32 * 32 * 2 + 2 * 32 * 16 + 3 * 32 * 128  # q + o, k + v, gate/up/down
    matmul = 2 * per_layer + 300 * 32  # + the output head
    forward = 2 * matmul + 4 * 2 * 64 * 32  # + QK^T and AV over 64 positions
    assert training_flops_per_step(CFG, tokens_per_step=4 * 64, seq_len=64) == 3 * forward * 256
    assert 3 * forward == 291_072
    # the same accounting as the scaling tools
    assert training_flops_per_step(CFG, 256, 64) == flops_per_token(CFG, 64).training * 256


def test_time_estimate_line_and_refusal_name_the_keys():
    est = TimeEstimate(steps=1000, flops_per_step=4.1e9, flops_per_s=6e9)
    assert est.seconds == pytest.approx(1000 * 4.1e9 / 6e9)
    line = est.describe()
    assert (
        line.startswith("~11 min for 1,000 steps")
        and "(~0.68 s/step, 4.1 GFLOP per step at ~6.0 GFLOP/s measured)" in line
    )
    assert est.to_dict()["seconds"] == pytest.approx(est.seconds, rel=1e-6)
    check_time(est, None, "pretrain", "pretrain.max_steps")  # no limit set
    check_time(est, 1.0, "pretrain", "pretrain.max_steps")  # 11 minutes < 1 hour
    with pytest.raises(
        ConfigError,
        match=r"pretrain: estimated time ~11 min .* exceeds run.max_hours=0.1; lower pretrain.max_steps",
    ):
        check_time(est, 0.1, "pretrain", "pretrain.max_steps")
    huge = TimeEstimate(steps=10**9, flops_per_step=1e20, flops_per_s=1e10)
    assert "years" in huge.describe()
    # a million layers: counted in closed form, nothing built, refused at once
    deep = ModelConfig(vocab_size=512, d_model=4096, n_layers=10**6, n_heads=32, max_seq_len=4096)
    est = estimate_training_time(deep, steps=1000, tokens_per_step=8 * 4096, seq_len=4096, device="cpu")
    with pytest.raises(ConfigError, match="years .* exceeds run.max_hours=24"):
        check_time(est, 24, "pretrain", "pretrain.model.n_layers")


def test_matmul_probe_is_positive_and_measured_once_per_process():
    rate = matmul_flops_per_s("cpu")
    assert rate > 0 and matmul_flops_per_s("cpu") == rate


def test_long_run_refused_under_max_hours_and_estimate_recorded(clone_run, capsys):
    root = clone_run("h")
    args = [*tiny_args(root, "h"), "run.threads=1"]
    assert main(["pretrain", *args, "pretrain.max_steps=1000000000", "run.max_hours=1"]) == 2
    err = capsys.readouterr().err
    assert "pretrain: estimated time" in err and "exceeds run.max_hours=1" in err
    assert "pretrain.max_steps" in err and "seq_len" in err and "pretrain.model" in err
    assert not (root / "h" / "pretrain" / "checkpoints").exists()
    # under the limit: the estimate is logged and kept in the manifest beside the measured time
    assert main(["pretrain", *args, "run.max_hours=100"]) == 0
    assert "estimated time: ~" in capsys.readouterr().out
    est = json.loads((root / "h" / "pretrain" / "manifest.json").read_text())["time_estimate"]
    assert est["steps"] == 20 and est["seconds"] > 0 and est["measured_seconds"] > 0
    assert est["flops_per_step"] == training_flops_per_step(
        ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32),
        tokens_per_step=4 * 32,
        seq_len=32,
    )
