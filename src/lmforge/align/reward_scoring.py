"""Scoring answers with a reward model outside training: one function for every caller.

A reward model is only meaningful on inputs shaped like the ones it was trained on. The reward
stage trains on chat-formatted turns (the prompt rendered through the chat template up to the
assistant turn, then the answer with its end-of-turn token), so scoring `tok(prompt, answer)` as
a text pair feeds it inputs it never saw, and its ranking of two models can flip. `RewardScorer`
therefore scores a (prompt, answer) the way the model's own training saw it:

- an lmforge reward model (a `*ForSequenceClassification` folder that `lmforge reward` wrote or
  that lmforge can load) goes through `align.reward.RewardScorer.encode`, the reward stage's own
  rendering, so judge scores equal the training-time scores of the same turns (tested);
- any other Hugging Face sequence-classification model is run by transformers: with its
  tokenizer's chat template when it has one (how chat reward models are trained), else as the
  text pair (prompt, answer) -- the convention of reward models without a template (e.g.
  OpenAssistant's DeBERTa). `mode` says which one was used, and callers report it.

`lmforge judge compare --reward-model` uses it; PPO's `reward_model` reward goes through the
same `align.reward.RewardScorer` rendering.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..chat import ChatFormat
from ..errors import DataError, LMForgeError
from ..model.hf import read_hf_config
from .reward import RewardScorer as _TrainedRewardScorer
from .reward import is_reward_model, load_reward_model

Conversation = Sequence[dict]


def conversation(prompt: str | Conversation, answer: str) -> list[dict]:
    """The turns a reward model scores: the prompt (a user message, or the messages so far) and
    the answer as the assistant turn."""
    head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    return [*head, {"role": "assistant", "content": answer}]


class RewardScorer:
    """Scalar reward of (prompt, answer) pairs, rendered as the reward model was trained."""

    def __init__(
        self, score_fn: Callable[[list[list[dict]]], Sequence[float]], mode: str, name: str = "reward model"
    ):
        self._score_fn, self.mode, self.name = score_fn, mode, name

    @classmethod
    def from_dir(
        cls, folder: str | Path, device: str = "cpu", batch_size: int = 16, backend: str = "auto"
    ) -> RewardScorer:
        """`backend`: auto (lmforge when it can load the folder, else transformers), lmforge, or
        transformers."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise DataError(f"{folder}: not a model folder (no config.json); pass a reward model folder")
        if not is_reward_model(folder):
            arch = read_hf_config(folder).get("architectures")
            raise DataError(
                f"{folder / 'config.json'}: architectures {arch} is not a sequence-classification "
                f"(reward) model; train one with `lmforge reward`"
            )
        if backend not in ("auto", "lmforge", "transformers"):
            raise DataError(f"reward scoring backend must be auto, lmforge or transformers, got {backend!r}")
        if backend != "transformers":
            try:
                rm, fmt = load_reward_model(folder, device), ChatFormat.from_dir(folder)
            except (LMForgeError, KeyError, ValueError):
                if backend == "lmforge":
                    raise
                # not a reward model lmforge can run: transformers runs it below
            else:
                trained = _TrainedRewardScorer(rm, fmt, device, batch_size=batch_size)
                return cls(
                    lambda convs: trained.score(convs).tolist(), "chat_template (as trained)", str(folder)
                )
        score_fn, mode = _transformers_scorer(folder, device)
        return cls(score_fn, mode, str(folder))

    def score(self, conversations: Sequence[Conversation]) -> list[float]:
        """Rewards of conversations that end with the assistant turn to judge."""
        convs = [list(c) for c in conversations]
        for i, c in enumerate(convs):
            if not c or c[-1].get("role") != "assistant":
                raise DataError(f"reward scoring: conversation {i} must end with the assistant turn to score")
        return [float(x) for x in self._score_fn(convs)] if convs else []

    def score_answers(self, prompts: Sequence[str | Conversation], answers: Sequence[str]) -> list[float]:
        if len(prompts) != len(answers):
            raise DataError(f"reward scoring: {len(prompts)} prompts but {len(answers)} answers")
        return self.score([conversation(p, a) for p, a in zip(prompts, answers)])


def _transformers_scorer(folder: Path, device: str):
    try:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError:  # pragma: no cover
        raise DataError("scoring this reward model needs `transformers` (pip install lmforge[hf])") from None
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).to(device).eval()
    if model.config.num_labels != 1:
        raise DataError(
            f"{folder}: a reward model has one output (num_labels=1), this has {model.config.num_labels}"
        )
    chat = bool(getattr(tok, "chat_template", None))

    @torch.no_grad()
    def one(conv: list[dict]) -> float:
        if chat:
            ids = tok.apply_chat_template(conv, tokenize=True, return_dict=False)
            x = torch.tensor([list(ids)], device=device)
            return float(model(input_ids=x).logits[0, 0])
        prompt = "\n".join(m["content"] for m in conv[:-1])
        enc = tok(prompt, conv[-1]["content"], return_tensors="pt", truncation=True).to(device)
        return float(model(**enc).logits[0, 0])

    def score(convs: list[list[dict]]) -> list[float]:
        return [one(c) for c in convs]

    return score, "chat_template" if chat else "text_pair"
