"""Verified artifacts: flipped bytes in every kind of file a stage writes are caught on read."""

import json
import os

import numpy as np
import pytest

from lmforge.align.reference import load_cache, save_cache
from lmforge.artifacts import CACHE_FILE, RACY_NS, record_artifacts, verify_path, verify_stage
from lmforge.cli import main
from lmforge.data.shards import load_shard, write_token_shards
from lmforge.errors import ArtifactError, DataError
from lmforge.model.hf import load_pretrained
from lmforge.runs import StageRecord, read_manifest
from lmforge.tokenizer import LMTokenizer
from tests.conftest import save_base_model, tiny_args

TEXTS = [f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(60)]


def _finish(stage_dir, name):
    """Complete a stage the way the pipeline does: manifest with recorded artifacts."""
    rec = StageRecord(stage_dir, name, {}, fingerprint="f")
    rec.complete(record_artifacts(stage_dir))
    return read_manifest(stage_dir)


def _flip(path, offset=-1):
    """Change one byte, keeping the size (what a bit rot or a stray writer does)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _age(stage_dir, seconds=3600):
    """Make every file look written long before its manifest (no racy timestamps)."""
    past = os.stat(stage_dir / "manifest.json").st_mtime - seconds
    for p in stage_dir.rglob("*"):
        if p.is_file() and p.name != "manifest.json":
            os.utime(p, (past, past))


@pytest.fixture
def model_stage(tmp_path):
    stage = tmp_path / "run" / "pretrain"
    save_base_model(stage / "model", TEXTS, 300)
    _finish(stage, "pretrain")
    return stage


def test_manifest_records_size_and_hash_but_not_checkpoints_or_hidden(tmp_path):
    (tmp_path / "checkpoints" / "step_1").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_1" / "w").write_bytes(b"x")
    (tmp_path / ".tmp.x.tmp").write_bytes(b"y")
    (tmp_path / "out.json").write_text("{}")
    m = _finish(tmp_path, "s")
    assert list(m["artifacts"]) == ["out.json"]
    assert m["artifacts"]["out.json"]["size"] == 2
    assert len(m["artifacts"]["out.json"]["sha256"]) == 64


def test_flipped_model_weights_are_caught(model_stage):
    load_pretrained(model_stage / "model")  # intact: loads
    _flip(model_stage / "model" / "model.safetensors")
    with pytest.raises(
        ArtifactError, match=r"model\.safetensors: content \(sha256\) differs.*lmforge pretrain"
    ):
        load_pretrained(model_stage / "model")


def test_changed_model_config_is_caught(model_stage):
    cfg = model_stage / "model" / "config.json"
    cfg.write_text(cfg.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 20'))
    with pytest.raises(ArtifactError, match=r"config\.json: .* bytes instead of"):
        load_pretrained(model_stage / "model")


def test_flipped_tokenizer_is_caught(tmp_path):
    stage = tmp_path / "tokenizer"
    save_base_model(stage, TEXTS, 300)
    _finish(stage, "tokenizer")
    LMTokenizer.load(stage)
    _flip(stage / "tokenizer.json", offset=len((stage / "tokenizer.json").read_bytes()) // 2)
    with pytest.raises(ArtifactError, match=r"tokenizer\.json.*stage 'tokenizer'"):
        LMTokenizer.load(stage)


def test_flipped_token_shard_is_caught_even_with_valid_ids(tmp_path):
    stage = tmp_path / "tokenizer"
    tok, _ = save_base_model(stage, TEXTS, 300)
    write_token_shards(TEXTS, tok, stage, "train")
    _finish(stage, "tokenizer")
    load_shard(stage, "train")
    tokens = np.fromfile(stage / "train.bin", dtype=np.uint16)
    tokens[5] = 10 if tokens[5] != 10 else 11  # another, perfectly valid id
    tokens.tofile(stage / "train.bin")
    with pytest.raises(ArtifactError, match=r"train\.bin: content .*re-run that stage: `lmforge tokenizer"):
        load_shard(stage, "train")


def test_flipped_reference_logps_are_caught(tmp_path):
    stage = tmp_path / "align"
    stage.mkdir()
    table = {bytes([i] * 16): (-1.5 * i, -2.5 * i) for i in range(8)}
    save_cache(stage / "ref_logps.safetensors", table)
    _finish(stage, "align")
    assert load_cache(stage / "ref_logps.safetensors") == table  # exact in float32
    _flip(stage / "ref_logps.safetensors")
    with pytest.raises(ArtifactError, match=r"ref_logps\.safetensors.*stage 'align'"):
        verify_path(stage / "ref_logps.safetensors")
    with pytest.raises(ArtifactError):
        verify_stage(stage)


def test_missing_file_is_caught(model_stage):
    (model_stage / "model" / "tokenizer_config.json").unlink()
    with pytest.raises(ArtifactError, match="tokenizer_config.json: missing"):
        verify_stage(model_stage)


def test_fast_path_trusts_old_unchanged_files_and_caches_fresh_hashes(model_stage):
    # freshly written: racily clean, so every file is hashed, then cached
    n = len(read_manifest(model_stage)["artifacts"])
    assert verify_stage(model_stage) == n
    assert (model_stage / CACHE_FILE).is_file()
    # files older than the recording by more than the timestamp granularity: no hashing
    _age(model_stage)
    _finish(model_stage, "pretrain")
    assert verify_stage(model_stage) == 0
    # a changed mtime (a touch, a copy without times) re-hashes; same content still passes
    os.utime(model_stage / "model" / "config.json")
    assert verify_stage(model_stage) == 1
    assert RACY_NS >= 1_000_000_000


def test_folder_outside_a_run_directory_is_not_checked(tmp_path):
    save_base_model(tmp_path / "mine", TEXTS, 300)
    _flip(tmp_path / "mine" / "model.safetensors", offset=-5)  # the user's own file: no record
    assert verify_path(tmp_path / "mine") == 0


def test_out_of_range_token_id_names_the_file(tmp_path):
    tok, _ = save_base_model(tmp_path, TEXTS, 300)
    write_token_shards(TEXTS, tok, tmp_path, "val")
    tokens = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    tokens[17] = 60000
    tokens.tofile(tmp_path / "val.bin")
    with pytest.raises(DataError, match=r"val\.bin: token id 60000 at position 17 is outside the vocabulary"):
        load_shard(tmp_path, "val")
    with pytest.raises(DataError, match="outside the vocabulary"):
        load_shard(tmp_path, "val", vocab_size=int(np.max(tokens[:17])))


def test_pipeline_names_the_stage_and_lmforge_run_reruns_it(clone_run, capsys):
    root = clone_run("v")
    args = tiny_args(root, "v")
    train_bin = root / "v" / "tokenizer" / "train.bin"
    good = train_bin.read_bytes()
    tokens = np.frombuffer(good, dtype=np.uint16).copy()
    tokens[3] = 10 if tokens[3] != 10 else 11  # another, perfectly valid id
    train_bin.write_bytes(tokens.tobytes())
    # a single stage that reads it: refused, naming the file and the stage to re-run
    assert main(["pretrain", *args]) == 2
    err = capsys.readouterr().err
    assert "train.bin" in err and "lmforge tokenizer" in err
    # the pipeline re-runs the damaged stage (deterministic: the same bytes come back)
    assert main(["run", "--only", "data,tokenizer", *args]) == 0
    out = capsys.readouterr().out
    assert "running the stage again" in out
    assert train_bin.read_bytes() == good
    assert read_manifest(root / "v" / "tokenizer")["status"] == "complete"
    assert json.loads((root / "v" / "tokenizer" / "train.json").read_text())["n_tokens"] == len(tokens)
