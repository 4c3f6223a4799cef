"""RL update batches: prompt + completion rows right-padded into one micro-batch give every
completion token the log-prob (and gradient) it gets when its sequence is scored alone."""

from __future__ import annotations

import torch

from lmforge.align.buffer import build_sequences, micro_batch
from lmforge.model import ModelConfig, Transformer
from lmforge.train.objectives.rl import policy_forward


def _alone(model: Transformer, prompt: list[int], completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    logp = torch.log_softmax(model(ids).float()[0], dim=-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(completion))
    return logp[pos, torch.tensor(completion)]


def test_padded_rl_rows_score_like_sequences_alone():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)).train()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    comps = [[20, 21, 22, 23, 24], [30], [40, 41, 42]]
    buf = build_sequences(prompts, comps, pad_id=0)
    mb = micro_batch(buf, torch.tensor([2, 0, 1]))  # out of order, as a later epoch's shuffle
    logp, ent, _ = policy_forward(model, mb, temperature=1.0)
    assert ent is not None and mb["mask"].sum() == sum(len(c) for c in comps)
    order = [2, 0, 1]
    for row, i in enumerate(order):
        k = len(comps[i])
        torch.testing.assert_close(logp[row, :k], _alone(model, prompts[i], comps[i]), rtol=1e-5, atol=1e-5)
    # gradients: the masked sum over the batch equals the sum of the sequences' own sums
    params = [p for p in model.parameters() if p.requires_grad]
    g_batch = torch.autograd.grad((logp * mb["mask"]).sum(), params)
    alone = sum(_alone(model, p, c).sum() for p, c in zip(prompts, comps))
    g_alone = torch.autograd.grad(alone, params)
    for a, b in zip(g_batch, g_alone):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
