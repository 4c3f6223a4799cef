"""Opening a model for inference from a prompt-tuning adapter folder: the base it names, wrapped
in `PromptTuned`; the engine puts the virtual tokens before every prompt and reports the user's
prompt tokens only."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import CheckpointError
from lmforge.model.generate import SamplingParams, generate
from lmforge.peft.prompt import PromptTuned
from lmforge.serve.engine import Engine
from lmforge.serve.loading import load_for_inference, load_model_and_tokenizer
from lmforge.serve.request import GenParams
from tests.factories import CORPUS, save_base_model


def test_a_prompt_tuning_adapter_serves_with_its_virtual_tokens(tmp_path):
    base = tmp_path / "base"
    tok, model = save_base_model(base, CORPUS, 300, seed=3, init_std=0.2)  # peaked: tokens follow the prefix
    pt = PromptTuned(model.eval(), 4, seed=5)
    pt.save_adapter(tmp_path / "adapter", base_model=str(base))

    loaded, tok2, _, name = load_for_inference(tmp_path / "adapter")
    assert isinstance(loaded, PromptTuned) and loaded.n_virtual == 4 and name == "base+adapter"
    ids = [tok.encode(t) for t in ("The function returns", "Paris is the")]
    want = generate(pt, ids, SamplingParams(max_new_tokens=5, temperature=0), use_cache=False)
    plain = generate(model, ids, SamplingParams(max_new_tokens=5, temperature=0), use_cache=False)
    assert want != plain  # the virtual tokens matter
    with Engine(loaded, tok2, max_batch=2) as eng:
        got = eng.generate(ids, GenParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert [c.token_ids for c in got] == want
    assert [c.prompt_tokens for c in got] == [len(i) for i in ids]  # the placeholders are not the user's

    evaluated, _ = load_model_and_tokenizer(tmp_path / "adapter")
    x = torch.tensor([ids[0]])
    with torch.no_grad():
        torch.testing.assert_close(evaluated(x), pt(x))
    with pytest.raises(CheckpointError, match="no weights to merge"):
        load_for_inference(tmp_path / "adapter", merge=True)
