"""`scaling fit` flags outlier runs, says what dropping them changes, and drops them on request;
Kaplan fits on runs that are not on a grid carry a warning."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from lmforge.scaling import laws as L
from lmforge.scaling.cli import add_parser
from lmforge.scaling.outliers import describe_change, find_outliers, without

TRUE = L.ParametricLaw(1.8, 480.0, 2000.0, 0.35, 0.37, "truth")
PLANTED = {3: -0.26, 11: -0.20, 17: 0.15}  # run index -> log-residual added


def synthetic_table(tmp_path):
    rng = np.random.default_rng(0)
    n, d = np.meshgrid(np.geomspace(5e7, 5e9, 5), np.geomspace(1e9, 3e11, 5))
    n, d = n.ravel(), d.ravel()
    log_noise = rng.normal(0, 0.004, len(n))
    for i, r in PLANTED.items():
        log_noise[i] = r
    loss = TRUE.loss(n, d) * np.exp(log_noise)
    path = tmp_path / "runs.csv"
    rows = ["name,params,tokens,loss"] + [f"r{i},{n[i]:.6g},{d[i]:.6g},{loss[i]:.6g}" for i in range(len(n))]
    path.write_text("\n".join(rows) + "\n")
    return path


def cli(argv, capsys):
    ap = argparse.ArgumentParser(prog="lmforge")
    add_parser(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(["scaling", *argv])
    rc = args.func(args)
    return rc, capsys.readouterr().out


def test_planted_outliers_are_found_by_the_mad_rule(tmp_path):
    table = L.load_runs(synthetic_table(tmp_path))
    out = find_outliers(table, TRUE)
    assert sorted(out.index) == sorted(PLANTED) and out.index[0] == 3  # worst first
    assert out.residuals[3] == pytest.approx(-0.26, abs=1e-5) and out.scale < 0.01
    assert find_outliers(without(table, out.index), TRUE).index == []
    with pytest.raises(ValueError):
        find_outliers(table, TRUE, k=0)


def test_fit_reports_outliers_and_drop_outliers_refits(tmp_path, capsys):
    runs = synthetic_table(tmp_path)
    rc, text = cli(["fit", str(runs), "--out", str(tmp_path / "a"), "--bootstrap", "0", "--no-plots"], capsys)
    assert rc == 0 and "3 outlier run(s)" in text and "--drop-outliers" in text
    a = json.loads((tmp_path / "a" / "fit.json").read_text())
    assert {r["name"] for r in a["outliers"]["runs"]} == {"r3", "r11", "r17"} and not a["outliers"]["dropped"]
    assert a["n_runs"] == 25 and "->" in a["outliers"]["change"]
    rc, text = cli(
        ["fit", str(runs), "--out", str(tmp_path / "b"), "--bootstrap", "0", "--no-plots", "--drop-outliers"],
        capsys,
    )
    b = json.loads((tmp_path / "b" / "fit.json").read_text())
    assert b["n_runs"] == 22 and b["outliers"]["dropped"]
    table = L.load_runs(runs)

    def error(fit: dict) -> float:  # how far the fitted law is from the truth on the runs' grid
        law = L.ParametricLaw.from_dict(fit["parametric"]["law"])
        return float(np.abs(np.log(law.loss(table.n, table.d) / TRUE.loss(table.n, table.d))).max())

    assert (
        error(b) < 0.01 and error(a) < 0.05
    )  # the Huber loss already resists them; the report says by how much
    assert b["outliers"]["law_without"] == b["parametric"]["law"]


def test_describe_change_names_what_moved():
    a = L.ParametricLaw(1.8, 480.0, 12846.0, 0.35, 0.45, "a")
    b = L.ParametricLaw(1.8, 480.0, 2085.0, 0.35, 0.37, "b")
    text = describe_change(a, b)
    assert "B 1.285e+04 -> 2085 (-84%)" in text and "beta 0.45 -> 0.37" in text and "E " not in text


def test_kaplan_warns_when_runs_are_not_on_a_grid():
    rng = np.random.default_rng(1)
    n = np.geomspace(1e7, 1e9, 12)
    d = rng.permutation(np.geomspace(1e8, 1e11, 12))  # each size its own, unrelated, token count
    table = L.RunTable.from_arrays(n, d, TRUE.loss(n, d))
    k = L.fit_kaplan(table)
    assert k.laws["N"].r2 < 0.9 and any("L(N): R^2" in w for w in k.warnings)
    grid_n, grid_d = np.meshgrid(np.geomspace(1e7, 1e9, 4), np.geomspace(1e8, 1e11, 4))
    on_grid = L.RunTable.from_arrays(
        grid_n.ravel(), grid_d.ravel(), TRUE.loss(grid_n.ravel(), grid_d.ravel())
    )
    assert not any("L(N)" in w for w in L.fit_kaplan(on_grid).warnings)
