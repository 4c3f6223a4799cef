"""Shared fixtures: a tiny run directory with data and tokenizer stages done, built once."""

import os
import shutil
from pathlib import Path

import pytest

# Third-party test data kept beside the repository (never inside it, never used by the product).
# $LMFORGE_SHARED_DATA points elsewhere (a git worktree sits one level deeper than the checkout).
SHARED_DATA = Path(
    os.environ.get("LMFORGE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)

from lmforge.cli import main  # noqa: E402
from tests.factories import (  # noqa: E402,F401  (re-exported: tests import them from here)
    PARAGRAPH,
    WORDS,
    make_tiny_model,
    random_sentences,
    save_base_model,
    single_thread,
    tiny_model,
    tiny_tokenizer,
    train_on,
)

TINY = [
    "data.max_docs=60",
    "tokenizer.vocab_size=512",
    "pretrain.model.d_model=32",
    "pretrain.model.n_layers=2",
    "pretrain.model.n_heads=4",
    "pretrain.model.n_kv_heads=2",
    "pretrain.seq_len=32",
    "pretrain.batch_size=4",
    "pretrain.max_steps=20",
    "pretrain.warmup_steps=2",
    "pretrain.eval_every=10",
    "pretrain.eval_tokens=1024",
    "pretrain.checkpoint_every=5",
    "pretrain.log_every=5",
    "eval.max_tokens=4096",
    "sample.max_new_tokens=8",
    "run.device=cpu",
    "sft.max_steps=3",
    "sft.batch_size=2",
    "sft.max_examples=64",
    "sft.max_val_examples=8",
    "sft.num_samples=1",
    "reward.max_steps=2",
    "reward.max_examples=40",
    "reward.max_val_examples=8",
    "align.max_steps=2",
    "align.max_examples=40",
    "align.max_val_examples=8",
    "rl.max_steps=2",
    "rl.batch_size=4",
    "rl.max_val_examples=4",
    "rl.eval_every=0",
    "rl.ppo.max_new_tokens=4",
]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster (and steadier on a busy machine) on one torch thread; modules opt in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    with single_thread():
        yield


PAIR_WORDS = (
    "apple river stone cloud tiger lemon piano candle forest bridge rocket garden silver window "
    "dragon pepper castle violin marble island orange falcon meadow harbor engine basket comet "
    "desert feather glacier hammer jungle kettle ladder mirror needle oyster pillow quartz saddle "
    "temple valley walnut yogurt zebra anchor"
).split()


def synthetic_pairs(words=PAIR_WORDS) -> list[dict]:
    """Chosen: a friendly sentence; rejected: a rude one a token shorter -- so an untrained model
    (which prefers fewer tokens) starts below chance and learning the preference is easy to see."""
    return [
        {"prompt": f"Tell me about the {w}.", "chosen": f"The {w} is nice.", "rejected": f"The {w} bad."}
        for w in words
    ]


def save_pairs_and_base(d):
    """`d/prefs.jsonl` of `synthetic_pairs()` and a base model in `d/base` whose tokenizer was
    trained on them: what the reward and align stage tests start from. Returns (model_dir,
    data, tokenizer, model)."""
    import json

    recs = synthetic_pairs()
    data = d / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tok, model = save_base_model(
        d / "base", [r["prompt"] + " " + r["chosen"] + " " + r["rejected"] for r in recs] * 4, 400
    )
    return d / "base", data, tok, model


class TokenRows:
    """A deterministic stateful iterator of random (input, target) token batches over a 50-token
    vocabulary; batch i depends on (seed, i) alone, and `state_dict` resumes it exactly."""

    def __init__(self, batch=2, seed=0):
        self.batch, self.seed, self.i = batch, seed, 0

    def __iter__(self):
        return self

    def __next__(self):
        import torch

        g = torch.Generator().manual_seed(self.seed * 1000 + self.i)
        self.i += 1
        x = torch.randint(0, 50, (self.batch, 9), generator=g)
        return x[:, :-1], x[:, 1:]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


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
