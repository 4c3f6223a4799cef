"""`generate_batch`: the engine on a caller's model, sized to the call, its mode restored, a
failed generation raised (never an empty completion)."""

import pytest
import torch

from lmforge.errors import LMForgeError
from lmforge.serve import batch
from lmforge.serve.request import GenParams
from tests.factories import tiny_model

PROMPTS = [[5, 9, 13, 2], [7], [3, 4, 5, 6, 7, 8, 9, 10, 11]]


def test_cache_is_sized_to_the_call(monkeypatch):
    built = []

    class Recording(batch.Engine):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            built.append((self.max_batch, self.context, self.cache.k[0].shape))

    monkeypatch.setattr(batch, "Engine", Recording)
    model = tiny_model(128, max_seq_len=64)
    out = batch.generate_batch(model, PROMPTS, GenParams(max_tokens=5, temperature=0), stop_token_ids=[])
    assert [len(c.token_ids) for c in out] == [5, 5, 5]
    ((max_batch, context, shape),) = built
    assert max_batch == 3 and context == 9 + 5 and shape[0] == 3 and shape[2] == 14  # not 64 x 64
    batch.generate_batch(
        model, PROMPTS, GenParams(max_tokens=5, temperature=0), stop_token_ids=[], max_batch=2
    )
    assert built[-1][0] == 2
    assert batch.generate_batch(model, [], GenParams(max_tokens=5)) == []


def test_mode_restored_and_failures_raised():
    model = tiny_model(128, max_seq_len=64).train()
    batch.generate_batch(model, PROMPTS, GenParams(max_tokens=3, temperature=0), stop_token_ids=[])
    assert model.training
    with pytest.raises(ValueError, match="exceeds the model's context"):
        batch.generate_batch(model, PROMPTS, GenParams(max_tokens=60), stop_token_ids=[])
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(LMForgeError, match="generation failed"):
        batch.generate_batch(model, PROMPTS, GenParams(max_tokens=3, temperature=1.0), stop_token_ids=[])
    assert model.training
