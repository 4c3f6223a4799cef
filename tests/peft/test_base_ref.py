"""An adapter names its base model relative to the adapter folder when both are in one run
directory, so identical runs in two places write identical files; readers resolve it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import CheckpointError
from lmforge.model.hf import load_pretrained
from lmforge.peft.base_ref import adapter_base, adapter_base_dir, base_model_ref
from lmforge.pipeline import load_config, run_stage
from lmforge.serve.loading import load_for_inference, load_model_and_tokenizer
from tests.conftest import WORDS, save_base_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


def _adapter(d, ref):
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": ref}))
    return d


def test_ref_is_relative_inside_the_run_directory_and_absolute_outside(tmp_path):
    run = tmp_path / "runs" / "x"
    assert base_model_ref(run / "pretrain" / "model", run / "sft" / "adapter", run) == "../../pretrain/model"
    outside = tmp_path / "models" / "base"
    assert base_model_ref(outside, run / "sft" / "adapter", run) == str(outside.resolve())


def test_reader_resolves_a_relative_base_against_the_adapter_folder(tmp_path, monkeypatch):
    run = tmp_path / "x"
    a = _adapter(run / "sft" / "adapter", "../../pretrain/model")
    monkeypatch.chdir(tmp_path.parent)  # not where the run is
    assert adapter_base(a) == run / "pretrain" / "model"
    assert adapter_base(_adapter(tmp_path / "h", "Qwen/Qwen2.5-0.5B")) == "Qwen/Qwen2.5-0.5B"
    assert adapter_base(_adapter(tmp_path / "n", None)) is None
    with pytest.raises(CheckpointError, match="pass the base model folder"):
        adapter_base_dir(a)  # the folder it names does not exist
    with pytest.raises(CheckpointError, match="base_model_name_or_path must be a string"):
        adapter_base(_adapter(tmp_path / "bad", 3))


def _lora_sft(root, base_src):
    """A LoRA SFT run whose base model sits inside the run directory, as pretrain/model would."""
    base = root / "t" / "pretrain" / "model"
    shutil.copytree(base_src, base)
    cfg = load_config(
        None,
        [
            f"run.root={root}",
            "run.name=t",
            f"sft.model={base}",
            "sft.method=lora",
            "sft.lora.r=2",
            "sft.max_examples=32",
            "sft.max_steps=2",
            "sft.batch_size=2",
            "sft.max_val_examples=4",
            "sft.num_samples=1",
            "sft.sample_max_new_tokens=2",
            "run.device=cpu",
        ],
    )
    return run_stage(cfg, "sft", force=True).dir


def test_identical_runs_in_two_roots_write_identical_adapters_that_load_from_anywhere(tmp_path, monkeypatch):
    src = tmp_path / "src"
    save_base_model(src, [" ".join(WORDS)] * 4, 300, max_seq_len=128)
    a = _lora_sft(tmp_path / "one", src)
    b = _lora_sft(tmp_path / "two", src)
    config = (a / "adapter" / "adapter_config.json").read_bytes()
    assert config == (b / "adapter" / "adapter_config.json").read_bytes()
    assert json.loads(config)["base_model_name_or_path"] == "../../pretrain/model"
    assert str(tmp_path) not in config.decode()

    monkeypatch.chdir(tmp_path)  # a relative base resolves against the adapter folder, not here
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    merged = load_pretrained(a / "model")
    with torch.no_grad():
        want = merged(ids)
        model, _, _, name = load_for_inference(a / "adapter")  # base taken from the adapter
        torch.testing.assert_close(model(ids), want, atol=1e-5, rtol=1e-5)
        model, _ = load_model_and_tokenizer(a / "adapter")
        torch.testing.assert_close(model(ids), want, atol=1e-5, rtol=1e-5)
    assert name == "pretrain+adapter"

    # `lmforge merge ADAPTER OUT`: the base is the one the adapter names
    assert main(["merge", str(a / "adapter"), str(tmp_path / "m")]) == 0
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "m")(ids), want, atol=1e-5, rtol=1e-5)
