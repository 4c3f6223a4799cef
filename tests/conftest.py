"""Shared fixtures: a tiny run directory with data and tokenizer stages done, built once."""

import shutil
from pathlib import Path

import pytest

# Third-party test data kept beside the repository (never inside it, never used by the product).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

from lmforge.cli import main

TINY = [
    "data.max_docs=60", "tokenizer.vocab_size=512",
    "pretrain.model.d_model=32", "pretrain.model.n_layers=2", "pretrain.model.n_heads=4",
    "pretrain.model.n_kv_heads=2", "pretrain.seq_len=32", "pretrain.batch_size=4",
    "pretrain.max_steps=20", "pretrain.warmup_steps=2", "pretrain.eval_every=10",
    "pretrain.eval_tokens=1024", "pretrain.checkpoint_every=5", "pretrain.log_every=5",
    "eval.max_tokens=4096", "sample.max_new_tokens=8", "run.device=cpu",
    "sft.max_steps=3", "sft.batch_size=2", "sft.max_examples=64", "sft.max_val_examples=8", "sft.num_samples=1",
    "reward.max_steps=2", "reward.max_examples=40", "reward.max_val_examples=8",
    "align.max_steps=2", "align.max_examples=40", "align.max_val_examples=8",
    "rl.max_steps=2", "rl.batch_size=4", "rl.max_val_examples=4", "rl.eval_every=0", "rl.ppo.max_new_tokens=4",
]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster (and steadier on a busy machine) on one torch thread; modules opt in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    from lmforge.eval.testing import one_thread as single_thread

    with single_thread():
        yield


def tiny_args(root, name="t", *extra):
    return ["tiny", f"run.root={root}", f"run.name={name}", *TINY, *extra]


@pytest.fixture(scope="session")
def prepared_root(tmp_path_factory):
    """A run root whose run 'base' has completed data and tokenizer stages."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["run", "--only", "data,tokenizer", *tiny_args(root, "base")]) == 0
    return root


@pytest.fixture
def clone_run(prepared_root, tmp_path):
    """Copy the prepared run to a fresh root under a new name; returns the new root."""
    def make(name):
        shutil.copytree(prepared_root / "base", tmp_path / name)
        return tmp_path
    return make
