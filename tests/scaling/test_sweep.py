"""`lmforge scaling sweep`: a micro-sweep through the real pretrain stage, resume, bad input."""

import json
import math

import pytest

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.pipeline import load_config
from lmforge.scaling import sweep as S
from tests.conftest import tiny_args

# 3 sizes x 2 token budgets on the test corpus (vocab 512, seq 32, batch 16: 512 tokens/step,
# 62 and 250 steps). One torch thread: tiny models gain nothing from two, and on a busy machine
# two threads waiting on each other are many times slower. At these widths the best LR falls
# steeply with width (measured: d_model 16 best at >= 3e-2, 64 near 5e-3), so LR ~ 1/width
# (1e-2 at the reference width 32); with one LR for all sizes, the smallest model wins here.
SIZES = ["8x1", "32x1", "64x1"]
TOKENS = ["32K", "128K"]
STEP = 16 * 32
EXTRA = [
    "pretrain.lr=1e-2",
    "pretrain.batch_size=16",
    "pretrain.checkpoint_every=0",
    "pretrain.eval_every=0",
    "pretrain.log_every=50",
    "pretrain.eval_tokens=4096",
    "run.threads=1",
]


def sweep_args(root):
    """Overrides (no CONFIG: the default is tiny) whose run directory is the session's prepared
    run 'base', so the sweep finds its data and tokenizer stages complete."""
    return tiny_args(root, "base", *EXTRA)[1:]


@pytest.fixture(scope="module")
def micro(prepared_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "grid"
    spec = S.SweepSpec(sizes=SIZES, tokens=TOKENS, lr_width_exp=1.0)  # LR ~ 1/width
    res = S.run_sweep(None, sweep_args(prepared_root), spec, out, fit=False)
    return res, out, spec


def test_micro_sweep_writes_a_table_of_finite_losses(micro):
    res, out, _ = micro
    assert [p.status for p in res.points] == ["ran"] * 6
    rows = (out / "runs.csv").read_text().splitlines()
    header = rows[0].split(",")
    table = [dict(zip(header, r.split(","))) for r in rows[1:]]
    assert len(table) == 6 and {r["name"] for r in table} == {p.name for p in res.points}
    for r, p in zip(table, res.points):
        assert math.isfinite(float(r["val_loss"])) and 0 < float(r["val_loss"]) < math.log(512) + 1
        assert int(r["tokens"]) == p.tokens == int(r["steps"]) * STEP
        assert int(r["params"]) == p.params  # the planner counts N as pretrain does
        m = json.loads((out / p.name / "pretrain" / "manifest.json").read_text())
        assert m["status"] == "complete" and m["metrics"]["batch_tokens"] == STEP
        assert m["metrics"]["sweep"]["point"] == p.name and m["config"]["schedule"] == "wsd"
        assert m["config"]["model"]["d_model"] == p.model["d_model"]
    # the stage folders are shared by hard links, not trained again
    assert (out / res.points[0].name / "tokenizer" / "tokenizer.json").stat().st_nlink >= 2
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["mode"] == "grid" and len(summary["points"]) == 6


def test_bigger_and_longer_runs_reach_lower_loss_on_average(micro):
    res, _, _ = micro
    loss = {(p.model["d_model"], p.tokens): p.val_loss for p in res.points}
    d_short, d_long = sorted({d for _, d in loss})
    sizes = sorted({s for s, _ in loss})
    for s in sizes:  # more tokens help every size
        assert loss[s, d_long] < loss[s, d_short] - 0.1
    by_size = [(loss[s, d_short] + loss[s, d_long]) / 2 for s in sizes]
    assert by_size[-1] < by_size[0] - 0.05  # the largest model beats the smallest on average
    assert loss[sizes[-1], d_long] == min(loss.values())


def test_runs_of_one_size_share_their_trajectory_until_decay(micro):
    """Same seed, data order, warmup and peak LR: the short run of a size is the long run's
    prefix up to its WSD decay (62 steps: decay from step 50), so loss vs D is not noise."""
    res, out, _ = micro
    for size in ("d8-l1", "d64-l1"):
        logs = [
            [json.loads(x) for x in (out / f"{size}-t{t}" / "pretrain" / "metrics.jsonl").open()]
            for t in TOKENS
        ]
        at50 = [next(r["loss"] for r in log if r.get("step") == 50 and "loss" in r) for log in logs]
        assert at50[0] == at50[1]
        warm = {p.warmup_steps for p in res.points if p.name.startswith(size)}
        assert len(warm) == 1


def test_rerun_skips_completed_points(micro, prepared_root):
    res, out, spec = micro
    before = {p.name: (out / p.name / "pretrain" / "manifest.json").read_text() for p in res.points}
    again = S.run_sweep(None, sweep_args(prepared_root), spec, out, fit=False)
    assert [p.status for p in again.points] == ["cached"] * 6
    assert [p.val_loss for p in again.points] == [p.val_loss for p in res.points]
    after = {p.name: (out / p.name / "pretrain" / "manifest.json").read_text() for p in res.points}
    assert after == before


def test_plan_isoflop_points_share_compute(prepared_root):
    cfg = load_config(None, sweep_args(prepared_root))
    spec = S.SweepSpec(sizes=["16x1", "32x2", "64x2"], isoflops=["2e9", "8e9"])
    pts = S.plan_points(cfg, spec, vocab_size=512)
    assert len(pts) == 6 and {p.budget for p in pts} == {2e9, 8e9}
    for p in pts:  # D = C / 6N, rounded to whole steps
        assert abs(p.flops_6nd - p.budget) <= 6 * p.params * STEP / 2
        assert p.name.endswith("-c2e9") or p.name.endswith("-c8e9")
    small, big = pts[0], pts[2]
    assert small.params < big.params and small.tokens > big.tokens and small.lr > big.lr
    assert all(p.warmup_steps <= 2 for p in pts)  # min(config warmup, 10% of steps)


def test_plan_notes_name_embedding_heavy_sizes_and_repeated_data(prepared_root):
    cfg = load_config(None, sweep_args(prepared_root))
    spec = S.SweepSpec(sizes=["8x1", "64x2"], tokens=["4K", "1M"])
    pts = S.plan_points(cfg, spec, vocab_size=512, train_tokens=200_000)
    notes = S._plan_notes(pts)
    # d8-l1: 4,096 of ~5k parameters are the (tied) embedding table; d64-l2 is mostly blocks
    heavy = [n for n in notes if "mostly embedding table" in n]
    assert len(heavy) == 1 and "d8-l1" in heavy[0] and "d64-l2" not in heavy[0]
    assert any("repeat the training data (up to 5.0 epochs" in n for n in notes)
    assert any("fewer than 20 steps" in n and "d8-l1-t4K" in n for n in notes)
    assert not S._plan_notes(
        S.plan_points(cfg, S.SweepSpec(sizes=["64x2"], tokens=["64K"]), vocab_size=512, train_tokens=200_000)
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        (dict(sizes=[], tokens=["4K"]), "no model sizes"),
        (dict(sizes=["32x2"], tokens=[]), "exactly one of them"),
        (dict(sizes=["32x2"], tokens=["4K"], isoflops=["1e9"]), "exactly one of them"),
        (dict(sizes=["32x2"], tokens=["100"]), "less than one training step of 512 tokens"),
        (dict(sizes=["16x1", "64x2"], isoflops=["1e7"]), "largest size d64-l2"),
        (dict(sizes=["64y2"], tokens=["4K"]), "not a shape"),
        (dict(sizes=["36x2"], tokens=["4K"]), "not a multiple of head_dim 8"),
        (dict(sizes=["32x2", "32x2"], tokens=["4K"]), "listed twice"),
        (dict(sizes=["32x2"], tokens=["4K", "4000"]), "listed twice"),
        (dict(sizes=["32x2"], tokens=["-5"]), "positive"),
    ],
)
def test_bad_grids_are_refused_before_any_work(prepared_root, tmp_path, spec, message):
    with pytest.raises(ConfigError, match=message):
        S.run_sweep(None, sweep_args(prepared_root), S.SweepSpec(**spec), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_continued_pretraining_is_refused(prepared_root, tmp_path):
    with pytest.raises(ConfigError, match="from scratch; remove pretrain.init_from"):
        S.run_sweep(
            None,
            sweep_args(prepared_root) + ["pretrain.init_from=some/model"],
            S.SweepSpec(sizes=["32x2"], tokens=["4K"]),
            tmp_path / "x",
        )


def test_cli_dry_run_and_errors(prepared_root, tmp_path, capsys):
    base = sweep_args(prepared_root)
    assert (
        main(
            [
                "scaling",
                "sweep",
                "tiny",
                *base,
                "--sizes",
                "16x1,32x2",
                "--isoflops",
                "2e9,8e9",
                "--out",
                str(tmp_path / "dry"),
                "--dry-run",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Sweep plan: 4 runs (isoflop)" in out and "d32-l2-c8e9" in out and "dry run" in out
    assert not (tmp_path / "dry").exists()
    assert (
        main(["scaling", "sweep", *base, "--sizes", "", "--tokens", "4K", "--out", str(tmp_path / "e")]) == 2
    )
    assert "no model sizes" in capsys.readouterr().err
    assert (
        main(["scaling", "sweep", *base, "--sizes", "32x2", "--tokens", "10", "--out", str(tmp_path / "e")])
        == 2
    )
    assert "less than one training step" in capsys.readouterr().err


def test_spec_file_with_mapping_sizes(prepared_root, tmp_path):
    spec_file = tmp_path / "sweep.yaml"
    spec_file.write_text(
        "sizes: ['16x1', {d_model: 32, n_layers: 2, n_heads: 2, name: wide-heads}]\n"
        "isoflops: 4e9, 1.6e10\nlr_width_exp: 0\n"
    )
    spec = S.SweepSpec.from_yaml(spec_file)
    cfg = load_config(None, sweep_args(prepared_root))
    pts = S.plan_points(cfg, spec, vocab_size=512)
    assert [p.name for p in pts][:2] == ["d16-l1-c4e9", "wide-heads-c4e9"]
    assert pts[1].model["n_heads"] == 2 and {p.lr for p in pts} == {1e-2}
    (tmp_path / "bad.yaml").write_text("sizes: [16x1]\ntokenz: [4K]\n")
    with pytest.raises(ConfigError, match="unknown sweep key.*tokenz"):
        S.SweepSpec.from_yaml(tmp_path / "bad.yaml")


def test_fit_runs_reuses_scaling_fit(tmp_path):
    """The collect-and-fit step is `scaling fit` on runs.csv: fit.json and plots land in OUT."""
    from lmforge.scaling.laws import ParametricLaw

    law = ParametricLaw(E=2.0, A=50.0, B=300.0, alpha=0.3, beta=0.35)
    lines = ["name,params,tokens,val_loss,budget,peak_lr"]
    for c in (1e12, 4e12, 1.6e13):
        for n in (1e5, 2e5, 4e5, 8e5):
            d = c / (6 * n)
            lines.append(f"p{n:g}-{c:g},{n:g},{d:g},{law.loss(n, d):.6g},{c:g},0.01")
    (tmp_path / "runs.csv").write_text("\n".join(lines) + "\n")
    fit = S.fit_runs(tmp_path / "runs.csv", tmp_path, plots=False, bootstrap=10)
    assert fit["parametric"]["law"]["alpha"] == pytest.approx(0.3, abs=0.05)
    assert "hparams" not in fit  # peak_lr is not read as a searched lr
    assert (tmp_path / "fit.json").is_file()


def test_failed_fit_is_reported_not_raised(micro, prepared_root, tmp_path):
    # 6 runs with only 2 distinct token counts cannot separate the D term
    res, out, spec = micro
    again = S.run_sweep(None, sweep_args(prepared_root), spec, out, fit=True, plots=False, bootstrap=0)
    assert again.fit is None and "distinct value(s) of D" in again.fit_error
    assert [p.status for p in again.points] == ["cached"] * 6


@pytest.mark.slow
def test_parallel_jobs_train_in_child_processes(prepared_root, tmp_path):
    spec = S.SweepSpec(sizes=["8x1", "16x1"], tokens=["4K"])
    res = S.run_sweep(None, sweep_args(prepared_root), spec, tmp_path / "par", fit=False, jobs=2)
    assert [p.status for p in res.points] == ["ran", "ran"]
    for p in res.points:
        assert math.isfinite(p.val_loss)
        assert "pretrain" in (tmp_path / "par" / p.name / "sweep.log").read_text()
        assert (tmp_path / "par" / p.name / "pipeline.yaml").is_file()
