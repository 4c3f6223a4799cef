"""The GPU training benchmark runs end to end on CPU with its tiny shape (so the script a GPU
session will run is known to work): both contenders, sane numbers, the JSON it writes."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_train.py"


def test_gpu_benchmark_tiny_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_train", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_train"] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop("gpu_train", None)
    threads = torch.get_num_threads()
    try:
        res = mod.main(
            [
                "--tiny",
                "--device",
                "cpu",
                "--warmup",
                "1",
                "--steps",
                "2",
                "--rounds",
                "1",
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert [r["model"] for r in res["rows"]] == ["lmforge", "hf"]
    a, b = res["rows"]
    assert a["first_loss"] == pytest.approx(b["first_loss"], abs=1e-4)  # the same network
    for r in res["rows"]:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu_measured"] < 1.5
    assert res["flops_per_token"] > 6 * res["params"]  # attention adds to 6N
    assert json.loads((tmp_path / "r.json").read_text())["shape"] == "tiny"
