"""Cached reference log-probs: no absolute path in the file, so identical runs match byte for byte."""

import json

from lmforge.align.reference import load_cache, portable_note, save_cache


def _header(path) -> dict:
    raw = path.read_bytes()
    return json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])


def test_identical_runs_in_two_roots_write_identical_caches(tmp_path):
    table = {bytes([i] * 16): (-1.0 * i, -2.0 * i) for i in range(4)}
    files = []
    for root in ("a", "b"):
        run = tmp_path / root / "runs" / "x"
        cache = run / "align" / "ref_logps.safetensors"
        save_cache(cache, table, note=str(run / "sft" / "model"))
        files.append(cache)
    assert files[0].read_bytes() == files[1].read_bytes()
    meta = _header(files[0])["__metadata__"]
    assert meta["reference"] == "sft/model"
    assert str(tmp_path) not in files[0].read_bytes().decode("latin-1")
    assert load_cache(files[0]) == table


def test_reference_outside_the_run_is_kept_as_given(tmp_path):
    cache = tmp_path / "runs" / "x" / "align" / "ref_logps.safetensors"
    assert portable_note("Qwen/Qwen2.5-0.5B", cache) == "Qwen/Qwen2.5-0.5B"
    assert portable_note(str(tmp_path / "models" / "m"), cache) == str(tmp_path / "models" / "m")
    assert portable_note("", cache) == ""
