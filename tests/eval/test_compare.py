"""`lmforge compare`: config differences, summary metrics and overlaid curves of real tiny runs."""

import shutil

import matplotlib.image
import pytest

from lmforge.errors import DataError
from lmforge.eval.compare import compare, config_diff, curve_panels, find_runs, load_run, series
from lmforge.runs import read_jsonl
from tests.conftest import main, tiny_args


@pytest.fixture
def two_runs(clone_run):
    root = clone_run("lr_a")
    shutil.copytree(root / "lr_a", root / "lr_b")
    for name, lr in (("lr_a", "0.003"), ("lr_b", "0.01")):
        assert main(["pretrain", *tiny_args(root, name, "pretrain.max_steps=10", f"pretrain.lr={lr}")]) == 0
    return root


def test_compare_lists_the_differing_config_keys_and_draws_both_curves(two_runs, tmp_path, capsys):
    root = two_runs
    out = tmp_path / "cmp"
    assert main(["compare", str(root / "lr_a"), str(root / "lr_b"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pretrain.lr" in printed and "pretrain.val_loss" in printed

    res = compare([root / "lr_a", root / "lr_b"], out)
    assert res["header"] == ["key", "lr_a", "lr_b"]
    assert [row[0] for row in res["config_diff"]] == ["pretrain.lr"]  # the only key that differs
    assert res["config_diff"][0][1:] == [0.003, 0.01]
    summary = {row[0]: row[1:] for row in res["summary"]}
    a_loss, b_loss = summary["pretrain.val_loss"]
    assert a_loss != b_loss and summary["pretrain.steps"] == [10, 10]

    runs = [load_run(root / n, n) for n in ("lr_a", "lr_b")]
    panels = curve_panels(runs)
    assert ("pretrain", "loss", "loss") in panels and ("pretrain", "eval loss", "eval/loss") in panels
    drawn = series(runs, "pretrain", "loss")
    for n in ("lr_a", "lr_b"):  # each run's curve is its metrics.jsonl
        want = [
            (r["step"], r["loss"]) for r in read_jsonl(root / n / "pretrain" / "metrics.jsonl") if "loss" in r
        ]
        assert drawn[n] == want and len(want) == 2
    img = matplotlib.image.imread(out / "compare.png")
    assert img.shape[0] > 100 and img.shape[1] > 300
    html = (out / "compare.html").read_text()
    assert "data:image/png;base64," in html and "pretrain.lr" in html and "<script" not in html
    assert "| pretrain.lr | 0.003 | 0.01 |" in (out / "compare.md").read_text()


def test_a_sweep_folder_expands_to_its_runs_and_bad_paths_fail_clearly(two_runs, tmp_path):
    root = two_runs
    assert [d.name for d in find_runs([root])] == ["lr_a", "lr_b"]
    assert [d.name for d in find_runs([root, root / "lr_a"])] == ["lr_a", "lr_b"]  # no duplicates
    with pytest.raises(DataError, match="no such run directory"):
        find_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither a run directory"):
        find_runs([tmp_path / "empty"])
    with pytest.raises(DataError, match="at least two runs"):
        compare([root / "lr_a"], tmp_path / "out")


def test_config_diff_marks_keys_missing_in_one_run(tmp_path):
    from lmforge.eval.compare import RunData

    a = RunData("a", tmp_path, stages={"sft": {"config": {"lr": 1e-4, "peft": {"r": 8}}}})
    b = RunData("b", tmp_path, stages={"sft": {"config": {"lr": 1e-4}}, "rl": {"config": {"kl": 0.1}}})
    assert config_diff([a, b]) == [["rl.kl", None, 0.1], ["sft.peft.r", 8, None]]
