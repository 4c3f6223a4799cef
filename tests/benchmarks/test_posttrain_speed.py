"""The post-training speed benchmark runs its CPU path (one run per call, as its child processes
do) on a tiny model: processed tokens per step near the budget, loss units under their own name."""

import pytest
import torch

from tests.benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("posttrain_speed")


@pytest.mark.parametrize("run, unit", [("sft_unpacked", "assistant_tokens"), ("dpo", "pairs")])
def test_one_run_on_cpu(tmp_path, bench, run, unit):
    from lmforge.model.config import ModelConfig
    from lmforge.model.hf import save_pretrained
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(**bench.SHAPES["tiny"], max_seq_len=256)
    save_pretrained(Transformer(cfg), tmp_path / "m", bos_id=1, eos_id=2)
    threads = torch.get_num_threads()
    try:
        res = bench.main(
            ["--device", "cpu", "--seq", "256", "--batch", "2", "--steps", "1", "--warmup", "0"]
            + ["--examples", "40", "--_one", run, "--_model", str(tmp_path / "m")]
        )
    finally:
        torch.set_num_threads(threads)
    (row,) = res["rows"]
    assert row["run"] == run and row["tokens_per_s"] > 0 and row[f"{unit}_per_s"] > 0
    assert row["tokens_per_step"] > 0 and row["peak_memory_kind"] == "cpu_peak_rss"
    if run == "sft_unpacked":  # the token budget: batch x seq
        assert row["tokens_per_step"] <= 2 * 256
