"""The GRPO recipe benchmark's statistics: the t-interval over seeds, the paired bootstrap over
problems, the per-seed summary, and its refusal of a malformed override (before any work)."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "grpo_recipe.py"


def _load():
    spec = importlib.util.spec_from_file_location("grpo_recipe", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["grpo_recipe"] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop("grpo_recipe", None)
    return mod


def test_t_interval_by_hand():
    bench = _load()
    mean, lo, hi = bench.t_interval([0.01, 0.03, 0.05])
    half = 4.303 * 0.02 / math.sqrt(3)  # sd of (0.01, 0.03, 0.05) is 0.02; t(2) = 4.303
    assert (
        mean == pytest.approx(0.03) and lo == pytest.approx(0.03 - half) and hi == pytest.approx(0.03 + half)
    )
    with pytest.raises(ValueError):
        bench.t_interval([0.1])


def test_paired_bootstrap_and_summary():
    bench = _load()
    rng = np.random.default_rng(0)
    before = (rng.random(200) < 0.5).astype(float)
    # every seed fixes the same 30 wrong problems and breaks none: a gain the interval must see
    fixed = np.flatnonzero(before == 0)[:30]
    after = {s: before.copy() for s in (1, 2, 3)}
    for x in after.values():
        x[fixed] = 1.0
    fig = bench.summarise(before, after, {1: 10.0, 2: 11.0, 3: 12.0})
    assert fig["per_seed"][2]["gain"] == pytest.approx(30 / 200) and fig["per_seed"][3]["seconds"] == 12.0
    bs = fig["bootstrap"]
    assert bs["mean"] == pytest.approx(0.15) and 0 < bs["low"] < 0.15 < bs["high"]
    # no spread between seeds: the t-interval collapses onto the mean
    assert fig["t_interval"]["low"] == pytest.approx(0.15) == pytest.approx(fig["t_interval"]["high"])
    # gains that cancel: both intervals straddle zero
    after = {1: before.copy(), 2: before.copy()}
    after[1][fixed] = 1.0
    after[2][np.flatnonzero(before == 1)[:30]] = 0.0
    fig = bench.summarise(before, after, {})
    assert fig["t_interval"]["low"] < 0 < fig["t_interval"]["high"]
    assert fig["bootstrap"]["low"] < 0 < fig["bootstrap"]["high"]


def test_bad_override_is_refused(tmp_path, capsys):
    bench = _load()
    with pytest.raises(SystemExit):
        bench.main(["--root", str(tmp_path), "--set", "lr=1e-4"])
    assert "rl.KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "tiny").exists()


def test_fact_clusters_widen_the_bootstrap():
    """Problems that share an arithmetic fact move together: resampling whole facts gives a wider
    interval than resampling problems when the gain sits in one fact's problems."""
    bench = _load()
    assert (
        bench.fact("Tom has 8 pens and gives 4 to a friend. How many pens does Tom have left?", "4")
        == "8 4 4"
    )
    before = np.ones(60)
    before[:6] = 0.0  # six wrong problems, all of one fact
    clusters = ["8 4 4"] * 6 + [f"f{i // 3}" for i in range(54)]  # the rest: 18 facts of 3 problems
    after = np.ones((3, 60))
    m, lo, hi = bench.paired_bootstrap(before, after)
    mc, loc, hic = bench.paired_bootstrap(before, after, clusters=clusters)
    assert m == mc == pytest.approx(0.1)
    assert loc < lo and hic > hi
    fig = bench.summarise(before, {1: after[0], 2: after[1]}, {}, clusters=clusters)
    assert fig["fact_bootstrap"]["facts"] == 19
