"""Reward models over a generic-path trunk (`model/generic.py`): the model's own `transformers`
`<Arch>ForSequenceClassification`, trained and scored through lmforge's interface.

The module tree is the HF sequence classifier's (shared the same way `GenericCausalLM` shares a
causal LM's), so the saved folder is that class's own: trunk weights under the architecture's
base prefix (`model.`, `gpt_neox.`, ...), `score.weight` [1, d_model], config.json with
`num_labels: 1` and `pad_token_id`, and `AutoModelForSequenceClassification` gives the same score
(read at the last non-pad token of each row, as lmforge reads it at lengths - 1). An
architecture whose `transformers` has no sequence-classification class is refused, naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..model.generic import GenericCausalLM
from ..model.hf import copy_tokenizer_files, from_hf_config, to_hf_config, write_weights
from ..runs import atomic_write_json


def sequence_classifier_class(model_type: str | None, source: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(model_type or "")
    if name is None:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} runs on the generic transformers path and transformers has "
            f"no sequence-classification class for it, so no reward model can be built on it"
        )
    return name


class GenericRewardModel(GenericCausalLM):
    """Scores [B] from a transformers sequence classifier's trunk and `score` head."""

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        h = self.hidden_states(input_ids)
        if lengths is None:
            last = h[:, -1]
        else:
            last = h[torch.arange(h.shape[0], device=h.device), lengths.to(h.device) - 1]
        score: Any = self.hf.score
        return score(last.to(score.weight.dtype)).squeeze(-1).float()

    @classmethod
    def from_causal_lm(cls, lm: GenericCausalLM, seed: int = 0) -> GenericRewardModel:
        """The classifier of `lm`'s architecture over `lm`'s trunk module itself (LoRA layers and
        frozen weights included); the head starts small and random (seeded), in fp32, as
        `RewardModel.from_causal_lm`."""
        from transformers import AutoModelForSequenceClassification

        name = sequence_classifier_class(lm.cfg.hf_type, lm.source)
        keep = {k: v for k, v in lm.hf.config.to_dict().items() if k not in ("id2label", "label2id")}
        config = type(lm.hf.config).from_dict({**keep, "num_labels": 1})
        config._attn_implementation = lm.hf.config._attn_implementation
        with torch.device("meta"):  # the trunk is replaced below: never allocate a second one
            hfm = AutoModelForSequenceClassification.from_config(config)
        prefix = hfm.base_model_prefix
        if type(hfm).__name__ != name or prefix != lm.hf.base_model_prefix:
            raise CheckpointError(f"{lm.source}: {type(hfm).__name__} does not share {name}'s trunk")
        setattr(hfm, prefix, getattr(lm.hf, prefix))
        p = next(lm.parameters())
        g = torch.Generator().manual_seed(seed)
        d = lm.cfg.d_model
        hfm.score = torch.nn.Linear(d, 1, bias=False, device=p.device, dtype=torch.float32)
        with torch.no_grad():
            hfm.score.weight.copy_(torch.randn(1, d, generator=g) / d**0.5)
        left = [n for n, t in [*hfm.named_parameters(), *hfm.named_buffers()] if t.is_meta]
        if left:
            raise CheckpointError(f"{lm.source}: {name} has weights beside its trunk and score: {left[:3]}")
        rm = cls(hfm.train(lm.training), lm.cfg, lm.source)
        if hasattr(lm, "lora_settings"):
            rm.lora_settings = lm.lora_settings
        return rm

    @property
    def score(self) -> torch.nn.Module:
        return self.hf.score


def save_generic_reward_model(
    rm: GenericRewardModel, out: Path, tokenizer_dir, *, bos_id, eos_id, pad_id
) -> Path:
    from ..train.checkpoint import model_state_for_saving

    out.mkdir(parents=True, exist_ok=True)
    state = model_state_for_saving(rm)
    state = {k: v for k, v in state.items() if not k.startswith(("lm_head.", "embed_out."))}
    dt = str(state["score.weight"].dtype).removeprefix("torch.")
    write_weights(state, out)
    cfg = to_hf_config(rm.cfg, bos_id=bos_id, eos_id=eos_id, dtype=dt)
    cfg.update(
        architectures=[sequence_classifier_class(rm.cfg.hf_type, rm.source)],
        num_labels=1,
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
        pad_token_id=pad_id if pad_id is not None else cfg.get("eos_token_id"),
    )
    atomic_write_json(out / "config.json", cfg)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    return out


def load_generic_reward_model(folder: Path, hf: dict, device) -> GenericRewardModel:
    from transformers import AutoModelForSequenceClassification

    cfg = from_hf_config(hf, str(folder / "config.json"))
    sequence_classifier_class(cfg.hf_type, str(folder / "config.json"))
    kw: dict[str, Any] = dict(local_files_only=True, trust_remote_code=False, use_safetensors=True)
    try:
        hfm = AutoModelForSequenceClassification.from_pretrained(
            str(folder), dtype=torch.float32, attn_implementation="sdpa", **kw
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{folder}: transformers cannot load this reward model ({e})") from None
    return GenericRewardModel(hfm.to(device), cfg, str(folder)).eval()
