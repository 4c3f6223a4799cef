"""FLOPs accounting and the cost/energy/CO2 estimator, checked against published figures."""

import argparse
import json

import pytest

from lmforge.errors import ConfigError, LMForgeError
from lmforge.model.config import ModelConfig
from lmforge.scaling import cost as C
from lmforge.scaling.cli import add_parser
from lmforge.scaling.flops import (
    flops_per_token,
    flops_per_token_from_shape,
    mfu,
    parse_quantity,
    training_flops,
    training_flops_for_config,
)


def run_cli(argv, capsys):
    ap = argparse.ArgumentParser(prog="lmforge")
    add_parser(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(["scaling", *argv])
    rc = args.func(args)
    return rc, capsys.readouterr().out


# ----------------------------------------------------------------------------- FLOPs
def test_flops_per_token_matches_model_config_and_splits_forward_backward():
    cfg = ModelConfig(vocab_size=32000, d_model=1024, n_layers=12, n_heads=16, max_seq_len=2048)
    f = flops_per_token(cfg)
    assert f.training == pytest.approx(cfg.flops_per_token(2048, training=True))
    assert f.forward == pytest.approx(cfg.flops_per_token(2048, training=False))
    assert f.backward == pytest.approx(2 * f.forward)
    # attention term: QK^T and AV, 2 matmuls x 2 FLOPs x seq x d per layer
    assert f.attention_forward == 4 * 12 * 2048 * 1024
    assert f.n_params == cfg.param_count() and f.n_non_embedding == cfg.non_embedding_params()
    assert f.approx_6n == 6 * cfg.param_count()
    # tied embeddings: 6N counts the embedding once, the exact count does the head matmul, so
    # the two agree up to the attention term and norms
    assert f.training - 3 * f.attention_forward == pytest.approx(f.approx_6n, rel=1e-3)
    longer = flops_per_token(cfg, seq_len=8192)
    assert longer.attention_fraction > f.attention_fraction


def test_flops_from_params_palm_formula():
    f = flops_per_token_from_shape(175e9)
    assert f.training == pytest.approx(6 * 175e9) and f.attention_forward == 0
    g = flops_per_token_from_shape(175e9, n_layers=96, d_model=12288, seq_len=2048)
    assert g.training == pytest.approx(6 * 175e9 + 12 * 96 * 2048 * 12288)
    with pytest.raises(ConfigError, match="together"):
        flops_per_token_from_shape(1e9, n_layers=4)
    with pytest.raises(ConfigError, match="positive"):
        flops_per_token_from_shape(-1)


def test_training_flops_for_config_exact_vs_6n():
    cfg = ModelConfig()
    exact = training_flops_for_config(cfg, 1e9)
    approx = training_flops_for_config(cfg, 1e9, exact=False)
    assert exact == pytest.approx(flops_per_token(cfg).training * 1e9)
    assert approx == pytest.approx(6 * cfg.param_count() * 1e9)


def test_mfu():
    # 1000 tok/s x 6e9 FLOPs/token = 6e12 FLOP/s = 2% of one 312 TFLOP/s A100... x 2 devices
    assert mfu(1000, 6e9, 312e12) == pytest.approx(6e12 / 312e12)
    assert mfu(1000, 6e9, 312e12, n_devices=2) == pytest.approx(3e12 / 312e12)
    with pytest.raises(ConfigError):
        mfu(1, 1, 0)


def test_parse_quantity():
    assert parse_quantity("175B") == 175e9
    assert parse_quantity("1.4T") == pytest.approx(1.4e12)
    assert parse_quantity("3e23") == 3e23
    assert parse_quantity("70m") == 70e6
    assert parse_quantity("1,000") == 1000
    with pytest.raises(ConfigError, match="cannot read"):
        parse_quantity("lots")


# ----------------------------------------------------------------------------- published checks
def test_gpt3_flops_gpu_years_and_cost():
    # Brown et al. 2020 (Table D.1): 3.14e23 FLOPs; Lambda's estimate: 28 TFLOP/s per V100
    # -> ~355 GPU-years, ~$4.6M at ~$1.5/GPU-hour.
    flops = training_flops(175e9, 300e9)
    assert flops == pytest.approx(3.14e23, rel=0.01)
    est = C.estimate_cost(flops, accelerator="V100", effective_flops=28e12, price_per_hour=1.5)
    assert est.gpu_years == pytest.approx(355, rel=0.01)
    assert est.cost_usd == pytest.approx(4.6e6, rel=0.03)
    assert est.mfu is None and est.accelerator == "V100-SXM2"


@pytest.mark.parametrize(
    "gpu_hours,watts,reported",
    [
        (184_320, 400, 31.22),  # Llama 2 7B
        (368_640, 400, 62.44),  # 13B
        (1_038_336, 350, 153.90),  # 34B
        (1_720_320, 400, 291.42),  # 70B
    ],
)
def test_llama2_carbon(gpu_hours, watts, reported):
    # Touvron et al. 2023 (arXiv:2307.09288) Table 2, A100-80GB; PUE 1.1 and 0.385 kgCO2e/kWh
    # as in the LLaMA paper: our defaults.
    est = C.estimate_cost(gpu_hours=gpu_hours, accelerator="A100-80GB", power_watts=watts)
    assert est.tco2e == pytest.approx(reported, abs=0.01)


def test_llama2_70b_defaults_use_tdp():
    est = C.estimate_cost(gpu_hours=1_720_320, accelerator="a100-sxm-80gb")
    assert est.power_watts == 400 and est.pue == 1.1 and est.carbon_intensity == 0.385
    assert est.tco2e == pytest.approx(291.42, abs=0.01)
    assert est.kwh == pytest.approx(1_720_320 * 0.4 * 1.1)


def test_wall_time_and_mfu_path():
    peak = C.peak_flops("H100")
    est = C.estimate_cost(peak * 0.5 * 3600 * 100, accelerator="H100", mfu=0.5, n_gpus=10, price_per_hour=2.0)
    assert est.gpu_hours == pytest.approx(100)
    assert est.wall_hours == pytest.approx(10)
    assert est.cost_usd == pytest.approx(200)


# ----------------------------------------------------------------------------- catalogue
def test_catalogue_is_sourced_and_complete():
    for name in ("V100-SXM2", "A100-SXM-80GB", "H100-SXM", "H200-SXM"):
        assert name in C.CATALOGUE
    for acc in C.CATALOGUE.values():
        assert acc.source and ("datasheet" in acc.source or "whitepaper" in acc.source)
        assert acc.fp16_flops > 0 and acc.tdp_watts > 0
        if acc.price_per_hour is not None:
            assert acc.price_source
    assert C.peak_flops("A100") == 312e12
    assert C.peak_flops("h100-sxm") == pytest.approx(989.4e12)
    assert C.peak_flops("V100") == 125e12  # auto -> fp16
    with pytest.raises(ConfigError, match="no bf16"):
        C.peak_flops("V100", "bf16")
    with pytest.raises(ConfigError, match="unknown accelerator"):
        C.get_accelerator("TPU-v9")


@pytest.mark.parametrize(
    "name,expected",
    [
        ("NVIDIA H100 80GB HBM3", "H100-SXM"),
        ("NVIDIA H100 PCIe", "H100-PCIe"),
        ("NVIDIA H100 NVL", "H100-NVL"),
        ("NVIDIA A100-SXM4-40GB", "A100-SXM-40GB"),
        ("NVIDIA A100-SXM4-80GB", "A100-SXM-80GB"),
        ("NVIDIA A100 80GB PCIe", "A100-PCIe-80GB"),
        ("Tesla V100-SXM2-32GB", "V100-SXM2"),
        ("NVIDIA H200", "H200-SXM"),
        ("NVIDIA GeForce RTX 4090", "RTX-4090"),
        ("AMD Instinct MI300X", "MI300X"),
    ],
)
def test_match_device_name(name, expected):
    assert C.match_device_name(name).name == expected


def test_device_peak_flops_unknown_is_none():
    assert C.device_peak_flops(None) is None
    assert C.device_peak_flops("cpu") is None
    assert C.device_peak_flops("Tesla V100-SXM2-16GB", "bf16") == 125e12  # falls back to fp16


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"flops": -1.0}, "positive"),
        ({"flops": 1e20, "gpu_hours": 3.0}, "exactly one"),
        ({}, "exactly one"),
        ({"flops": 1e20, "mfu": 0.0}, "mfu"),
        ({"flops": 1e20, "mfu": 40.0}, "mfu"),
        ({"flops": 1e20, "n_gpus": 0}, "n_gpus"),
        ({"flops": float("nan")}, "positive"),
    ],
)
def test_estimate_cost_bad_input(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        C.estimate_cost(**kwargs)


def test_missing_price_is_a_note_not_a_number():
    est = C.estimate_cost(1e21, accelerator="H200")
    assert est.cost_usd is None and any("no price" in n for n in est.notes)


# ----------------------------------------------------------------------------- CLI
def test_cli_flops_from_config_yaml(tmp_path, capsys):
    cfg = tmp_path / "model.yaml"
    cfg.write_text("model:\n  d_model: 512\n  n_layers: 8\n  n_heads: 8\n  max_seq_len: 1024\n")
    rc, out = run_cli(["flops", str(cfg), "--tokens", "1B", "--gpu", "A100", "--json"], capsys)
    assert rc == 0
    data = json.loads(out)
    expected = ModelConfig(d_model=512, n_layers=8, n_heads=8, max_seq_len=1024)
    assert data["per_token"]["training"] == pytest.approx(expected.flops_per_token(1024))
    assert data["train_flops"] == pytest.approx(expected.flops_per_token(1024) * 1e9)
    assert data["time"]["accelerator"] == "A100-SXM-80GB"
    rc, out = run_cli(["flops", str(cfg)], capsys)
    assert rc == 0 and "backward FLOPs / token" in out


def test_cli_flops_from_pipeline_config(tmp_path, capsys):
    # a pipeline YAML (or a shipped pipeline's name): the model its pretrain stage builds, with
    # the tokenizer's vocabulary and pretrain.seq_len as the context
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(
        "tokenizer:\n  vocab_size: 1000\npretrain:\n  seq_len: 128\n  model:\n"
        "    d_model: 64\n    n_layers: 2\n    n_heads: 2\n"
    )
    rc, out = run_cli(["flops", str(pipe), "--json"], capsys)
    expected = ModelConfig(vocab_size=1000, d_model=64, n_layers=2, n_heads=2, max_seq_len=128)
    assert rc == 0 and json.loads(out)["per_token"]["n_params"] == expected.param_count()
    assert json.loads(out)["per_token"]["training"] == pytest.approx(expected.flops_per_token(128))
    rc, out = run_cli(["flops", "tiny", "--json"], capsys)  # 192 wide, 4 layers, vocab 4096
    tiny = ModelConfig(vocab_size=4096, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, max_seq_len=256)
    assert json.loads(out)["per_token"]["n_params"] == tiny.param_count()


def test_cli_flops_params_and_errors(tmp_path, capsys):
    rc, out = run_cli(["flops", "--params", "175B", "--tokens", "300B", "--json"], capsys)
    assert json.loads(out)["train_flops"] == pytest.approx(3.15e23)
    with pytest.raises(ConfigError, match="config file"):
        run_cli(["flops"], capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("d_model: 100\nn_heads: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid model config"):
        run_cli(["flops", str(bad)], capsys)
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"d_modle": 64}')
    with pytest.raises(ConfigError, match="d_modle"):
        run_cli(["flops", str(unknown)], capsys)


def test_cli_cost(capsys):
    rc, out = run_cli(
        [
            "cost",
            "--params",
            "175B",
            "--tokens",
            "300B",
            "--gpu",
            "V100",
            "--effective-tflops",
            "28",
            "--price",
            "1.5",
            "--json",
        ],
        capsys,
    )
    data = json.loads(out)
    assert data["gpu_years"] == pytest.approx(356.7, rel=0.01)
    rc, out = run_cli(["cost", "--gpu-hours", "1720320", "--gpu", "A100"], capsys)
    assert rc == 0 and "291.42 tCO2e" in out
    rc, out = run_cli(["cost", "--list-gpus"], capsys)
    assert "H200-SXM" in out and "datasheet" in out
    rc, out = run_cli(["cost", "--flops", "2e26", "--price", "2"], capsys)
    assert "1e+26" in out
    with pytest.raises(LMForgeError, match="go together"):
        run_cli(["cost", "--params", "7B"], capsys)


def test_mixed_fleet_llama2_in_one_call(capsys):
    """Llama 2 (Touvron et al. 2023, Table 2): 7B/13B/70B at 400 W and 34B at 350 W, 539 tCO2e."""
    from lmforge.scaling.fleet import estimate_fleet, parse_fleet_part

    specs = [
        "name=7B,gpu=A100-SXM,hours=184320,watts=400",
        "name=13B,gpu=A100-SXM,hours=368640,watts=400",
        "name=34B,gpu=A100-SXM,hours=1038336,watts=350",
        "name=70B,gpu=A100-SXM,hours=1720320,watts=400",
    ]
    fleet = estimate_fleet([parse_fleet_part(s) for s in specs])
    reported = [31.22, 62.44, 153.90, 291.42]  # the paper rounds each part
    assert [e.tco2e for _, e in fleet.parts] == pytest.approx(reported, abs=0.011)
    assert fleet.totals["tco2e"] == pytest.approx(539.0, abs=0.01)
    assert fleet.totals["gpu_hours"] == 3_311_616
    argv = ["cost", "--gpu", "A100-SXM"] + [x for s in specs for x in ("--part", s)]
    ap = argparse.ArgumentParser(prog="lmforge")
    add_parser(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(["scaling", *argv])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "539.00" in out and "34B" in out and "350" in out
    mixed = estimate_fleet(
        [parse_fleet_part("gpu=H100-SXM,hours=10"), parse_fleet_part("gpu=A100-SXM,flops=1e20")]
    )
    assert [e.accelerator for _, e in mixed.parts] == ["H100-SXM", "A100-SXM-80GB"]
    for bad, match in (
        ("gpu=A100", "exactly one of hours"),
        ("hours=1,colour=red", "KEY=VALUE"),
        ("hours=x", "not a number"),
    ):
        with pytest.raises(ConfigError, match=match):
            parse_fleet_part(bad)
    with pytest.raises(ConfigError, match="drop --flops"):
        args = ap.parse_args(["scaling", "cost", "--flops", "1e20", "--part", "hours=1"])
        args.func(args)
