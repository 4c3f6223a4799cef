"""Checkpoint pruning: `keep_checkpoints` holds after a resume, not only after a save."""

import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.train.checkpoint import list_checkpoints, prune_checkpoints, save_checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.engine import Trainer
from lmforge.train.objectives.pretrain import pretrain_objective
from tests.conftest import TokenRows


def _model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, max_seq_len=16))


def _steps(root):
    return [int(p.name.split("_")[1]) for p in list_checkpoints(root)]


def test_prune_keeps_the_newest(tmp_path):
    m = _model()
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, step, m, None, {"step": step})
    assert _steps(tmp_path) == [2, 4, 6, 8]
    removed = prune_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["step_00000002", "step_00000004"]
    assert _steps(tmp_path) == [6, 8]
    assert prune_checkpoints(tmp_path, None) == [] and _steps(tmp_path) == [6, 8]


def _trainer(root, keep, max_steps):
    cfg = TrainConfig(
        max_steps=max_steps, batch_size=2, checkpoint_every=2, keep_checkpoints=keep, warmup_steps=0
    )
    return Trainer(
        _model(),
        pretrain_objective(),
        TokenRows(2),
        cfg,
        root,
        device=torch.device("cpu"),
        log=lambda s: None,
    )


def test_resume_prunes_checkpoints_left_beyond_keep(tmp_path):
    # a finished run that kept 4 checkpoints (as a kill between placing the last one and pruning
    # would leave them), resumed with keep_checkpoints=2 and nothing left to train
    _trainer(tmp_path, keep=4, max_steps=8).fit()
    assert _steps(tmp_path / "checkpoints") == [2, 4, 6, 8]
    tr = _trainer(tmp_path, keep=2, max_steps=8)
    assert tr.fit().resumed_from == 8
    assert _steps(tmp_path / "checkpoints") == [6, 8]
