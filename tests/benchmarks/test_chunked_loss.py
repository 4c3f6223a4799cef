"""The chunked-loss benchmark's per-variant step runs in-process on a tiny shape, and both
variants give the same loss (the 'chunked' one really chunks: its budget is forced down)."""

import argparse

import pytest

from tests.benchmarks import load_benchmark


def test_variants_agree(monkeypatch):
    import lmforge.model.output as output

    bench = load_benchmark("chunked_loss")
    monkeypatch.setattr(output, "LOGITS_BUDGET", output.LOGITS_BUDGET)  # `one` changes it; restored after
    a = argparse.Namespace(device="cpu", d_model=32, layers=1, vocab=128, batch=2, seq=16, warmup=0, steps=1)
    whole = bench.one("whole", a)
    monkeypatch.setattr(output, "LOGITS_BUDGET", 1)
    monkeypatch.setattr(output, "DEFAULT_CHUNK", 7)
    chunked = bench.one("chunked", a)
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert whole["peak_gib"] > 0 and whole["step_s"] > 0
