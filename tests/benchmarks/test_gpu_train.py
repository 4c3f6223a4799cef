"""The GPU training benchmark runs end to end on CPU with its tiny shape (so the script a GPU
session will run is known to work): both contenders, sane numbers, the JSON it writes."""

import json

import pytest
import torch

from tests.benchmarks import load_benchmark

pytest.importorskip("transformers")


def test_gpu_benchmark_tiny_on_cpu(tmp_path):
    mod = load_benchmark("gpu_train")
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
