"""Reward models: the transformer trunk with a scalar `score` head, trained on preference pairs.

Layout = the model family's own Hugging Face sequence-classification class with `num_labels: 1`
(`LlamaForSequenceClassification`, `Qwen2...`, `Mistral...`, `Qwen3...`, `Gemma...`, `Gemma2...`,
`Gemma3Text...`, `Phi3...`, `GPT2...`, `Mixtral...`): the trunk weights under the family's names
(the causal LM's, converted by the family, e.g. GPT-2's `transformer.h.*` Conv1D layout),
`score.weight` [1, d_model], no lm_head, and `pad_token_id` in config.json. The score is read at
the *last non-pad token* of each row, as transformers does, so
`AutoModelForSequenceClassification.from_pretrained(folder)` gives the same numbers (tested).
lmforge's own MoE layout (`lmforge_moe`) has no transformers class: lmforge alone reads it.

Training objective: Bradley-Terry, ``-logsigmoid(r_chosen - r_rejected - margin)`` with the
optional per-pair margin from the data. Evaluation: held-out pairwise accuracy (chosen scored
above rejected) with a Wilson 95% interval -- small reward models sit near chance, so the
interval is what tells a real signal from noise.

`RewardScorer.score(items)` is the one entry point for PPO, best-of-n and evaluation: items are
conversations (message lists ending with the assistant turn to judge, rendered exactly as in
training) or raw strings; `score_ids` takes token ids directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from ..chat import ChatFormat
from ..errors import CheckpointError, DataError
from ..model.config import ModelConfig
from ..model.families import family_for_config
from ..model.hf import (
    _read_weights,
    copy_tokenizer_files,
    from_hf_config,
    read_hf_config,
    to_hf_config,
    write_weights,
)
from ..model.transformer import Decoder, Transformer
from ..runs import atomic_write_json
from ..stats import wilson
from ..train.objectives.preference import bradley_terry_loss
from .pair_batches import collate_pairs
from .preference import Pair
from .reward_generic import GenericRewardModel, load_generic_reward_model, save_generic_reward_model


class RewardModel(nn.Module):
    """Transformer trunk + linear score head (no bias) reading the last real token."""

    # the trunk's forward, borrowed from Transformer (it uses self.model only)
    hidden_states: Callable[..., torch.Tensor] = Transformer.hidden_states

    def __init__(self, cfg: ModelConfig, trunk: Decoder | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = trunk if trunk is not None else Decoder(cfg)
        self.score = nn.Linear(cfg.d_model, 1, bias=False)

    @classmethod
    def from_causal_lm(cls, lm: Transformer, seed: int = 0) -> RewardModel:
        """Reuse a language model's trunk (its lm_head is dropped); the head starts small and
        random (seeded) so the initial scores are near zero but the trunk gets gradients. A
        generic-path model gets its architecture's transformers classifier (`reward_generic.py`)."""
        if getattr(lm, "generic", False):
            return GenericRewardModel.from_causal_lm(lm, seed)  # type: ignore[arg-type,return-value]
        rm = cls(lm.cfg, lm.model)
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(1, lm.cfg.d_model, generator=g) / lm.cfg.d_model**0.5
        rm.score.weight.data = w.to(lm.model.embed_tokens.weight.device)  # fp32 even over a bf16 trunk
        return rm

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B]: the head applied at position lengths-1 of each (right-padded) row."""
        h = self.hidden_states(input_ids)
        if lengths is None:
            last = h[:, -1]
        else:
            last = h[torch.arange(h.shape[0], device=h.device), lengths.to(h.device) - 1]
        return self.score(last.to(self.score.weight.dtype)).squeeze(-1).float()


# ----------------------------------------------------------------------------- save / load
def save_reward_model(
    rm: RewardModel,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> Path:
    """The family's `*ForSequenceClassification` folder (num_labels 1) with the tokenizer files."""
    from ..train.checkpoint import model_state_for_saving

    out = Path(out_dir)
    if isinstance(rm, GenericRewardModel):
        return save_generic_reward_model(rm, out, tokenizer_dir, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    out.mkdir(parents=True, exist_ok=True)
    state = model_state_for_saving(rm)
    dt = str(state["score.weight"].dtype).removeprefix("torch.")
    cfg = to_hf_config(rm.cfg, bos_id=bos_id, eos_id=eos_id, dtype=dt)
    write_weights(family_for_config(rm.cfg).keys_out(state, rm.cfg), out)
    arch = sequence_classifier(cfg.get("model_type"))
    cfg.update(
        architectures=[arch],
        num_labels=1,
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
        pad_token_id=pad_id if pad_id is not None else eos_id,
    )
    atomic_write_json(out / "config.json", cfg)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    return out


SEQUENCE_CLASSIFIERS = {
    "llama": "LlamaForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
    "gemma": "GemmaForSequenceClassification",
    "gemma2": "Gemma2ForSequenceClassification",
    "gemma3_text": "Gemma3TextForSequenceClassification",
    "phi3": "Phi3ForSequenceClassification",
    "gpt2": "GPT2ForSequenceClassification",
    "mixtral": "MixtralForSequenceClassification",
}


def sequence_classifier(model_type: str | None) -> str:
    """The transformers class of a reward model of `model_type` (lmforge's own MoE layout, which
    transformers cannot load, gets a name of its own that only lmforge reads)."""
    if model_type in SEQUENCE_CLASSIFIERS:
        return SEQUENCE_CLASSIFIERS[model_type]
    return f"{''.join(w.capitalize() for w in str(model_type).split('_'))}ForSequenceClassification"


def is_reward_model(folder: str | Path) -> bool:
    hf = read_hf_config(folder)
    return any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or [])


def load_reward_model(folder: str | Path, device: str | torch.device = "cpu") -> RewardModel:
    folder = Path(folder)
    hf = read_hf_config(folder)
    if not is_reward_model(folder):
        raise CheckpointError(
            f"{folder / 'config.json'}: architectures {hf.get('architectures')} is not a "
            f"sequence-classification (reward) model; train one with `lmforge reward`"
        )
    if hf.get("num_labels", len(hf.get("id2label") or {0: 0})) != 1:
        raise CheckpointError(
            f"{folder / 'config.json'}: a reward model has num_labels 1, this one {hf.get('num_labels')}"
        )
    cfg = from_hf_config(hf, str(folder / "config.json"))
    if cfg.hf_config is not None:  # the generic path: the architecture's transformers classifier
        return load_generic_reward_model(folder, hf, device)  # type: ignore[return-value]
    with torch.device("meta"):
        rm = RewardModel(cfg)
    state = _read_weights(folder, cfg)  # the family's names -> lmforge's (score.weight as is)
    own = rm.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and "rotary" not in k]
    if missing or unexpected:
        raise CheckpointError(
            f"{folder}: weights do not match a reward model of this config (missing "
            f"{missing[:3]}, unexpected {unexpected[:3]})"
        )
    for k, v in state.items():
        if k in own and tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"{folder}: {k} has shape {tuple(v.shape)}, config.json implies {tuple(own[k].shape)}"
            )
    rm = rm.to_empty(device=device)
    rm.load_state_dict({k: v for k, v in state.items() if k in own})
    rotary = type(rm.model.rotary)
    rm.model.rotary = rotary(cfg.head_dim, cfg.rope_theta, cfg.max_seq_len, cfg.rope_linear_factor).to(device)
    if cfg.rope_theta_local is not None:
        rm.model.rotary_local = rotary(cfg.head_dim, cfg.rope_theta_local, cfg.max_seq_len).to(device)
    return rm.eval()


# ----------------------------------------------------------------------------- training / eval
def pair_batch(pairs: Sequence[Pair], pad_id: int) -> dict:
    """2B right-padded rows (chosen first), their lengths, and the margins."""
    return collate_pairs(pairs, pad_id)


@torch.no_grad()
def pair_scores(
    rm: nn.Module, pairs: Sequence[Pair], pad_id: int, device, batch_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of chosen and rejected for every pair, in order."""
    was = rm.training
    rm.eval()
    cs, rs = [], []
    for i in range(0, len(pairs), batch_size):
        b = pair_batch(pairs[i : i + batch_size], pad_id)
        r = rm(b["input_ids"].to(device), b["lengths"].to(device)).float().cpu()
        n = r.shape[0] // 2
        cs.append(r[:n])
        rs.append(r[n:])
    rm.train(was)
    return (torch.cat(cs), torch.cat(rs)) if cs else (torch.zeros(0), torch.zeros(0))


def evaluate_reward(
    rm: nn.Module, pairs: Sequence[Pair], pad_id: int, device, batch_size: int = 16, use_margin: bool = True
) -> dict[str, float]:
    """Held-out pairwise accuracy (ties count half) with its Wilson 95% interval, mean score
    margin and Bradley-Terry loss."""
    if not pairs:
        return {}
    c, r = pair_scores(rm, pairs, pad_id, device, batch_size)
    m = torch.tensor([p.margin for p in pairs]) if use_margin else None
    d = c - r
    wins = float((d > 0).sum()) + 0.5 * float((d == 0).sum())
    lo, hi = wilson(wins, len(pairs))
    return {
        "loss": float(bradley_terry_loss(c, r, m).mean()),
        "accuracy": wins / len(pairs),
        "accuracy_ci_low": lo,
        "accuracy_ci_high": hi,
        "margin": float(d.mean()),
    }


def length_baseline(pairs: Sequence[Pair]) -> dict[str, float | str]:
    """The length-only baseline: the held-out accuracy of "prefer the shorter answer" (and of
    "prefer the longer", 1 minus it), ties counting half, lengths in tokens. Preference data often
    prefers one length (HH-RLHF: the shorter answer wins 0.559 of the time), so a reward model's
    accuracy means preference learning only where it beats the better of the two rules.
    Returns {"shorter", "longer", "best" (the better accuracy), "rule", "ci_low", "ci_high"}."""
    if not pairs:
        return {}
    wins = sum(
        1.0 if len(p.chosen) < len(p.rejected) else 0.5 if len(p.chosen) == len(p.rejected) else 0.0
        for p in pairs
    )
    shorter = wins / len(pairs)
    rule, best = ("shorter", shorter) if shorter >= 0.5 else ("longer", 1.0 - shorter)
    lo, hi = wilson(best * len(pairs), len(pairs))
    return {
        "shorter": shorter,
        "longer": 1.0 - shorter,
        "best": best,
        "rule": rule,
        "ci_low": lo,
        "ci_high": hi,
    }


# ----------------------------------------------------------------------------- scoring API
class RewardScorer:
    """Score conversations (or raw strings, or token ids) with a trained reward model."""

    def __init__(
        self,
        rm: RewardModel,
        fmt: ChatFormat,
        device: str | torch.device = "cpu",
        max_len: int | None = None,
        batch_size: int = 16,
    ):
        self.rm, self.fmt, self.device = rm.to(device).eval(), fmt, torch.device(device)
        self.max_len = max_len or rm.cfg.max_seq_len
        self.batch_size = batch_size
        tok = fmt.tok
        self.pad_id = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)

    @classmethod
    def from_dir(cls, folder: str | Path, device: str | torch.device = "cpu", **kw) -> RewardScorer:
        return cls(load_reward_model(folder, device), ChatFormat.from_dir(folder), device, **kw)

    def encode(self, item: str | Sequence[dict]) -> list[int]:
        """Token ids as the reward model saw them in training: the prompt rendered through the
        chat template up to the last assistant turn's content, then that turn (with its
        end-of-turn token), tokenised separately. Raw strings are tokenised as they are."""
        if isinstance(item, str):
            return self.fmt.tok.encode(item)
        msgs = list(item)
        if not msgs or msgs[-1].get("role") != "assistant":
            raise DataError("reward scoring: a conversation must end with the assistant turn to score")
        full, spans = self.fmt.assistant_spans(msgs)
        s, e = spans[-1]
        return self.fmt.tok.encode(full[:s]) + self.fmt.tok.encode(full[s:e])

    @torch.no_grad()
    def score_ids(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Scores [N] (float32, CPU); over-long inputs keep their last `max_len` tokens."""
        out = []
        for i in range(0, len(ids), self.batch_size):
            rows = [list(x)[-self.max_len :] or [self.pad_id] for x in ids[i : i + self.batch_size]]
            T = max(len(r) for r in rows)
            x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
            for b, r in enumerate(rows):
                x[b, : len(r)] = torch.tensor(r)
            lengths = torch.tensor([len(r) for r in rows])
            out.append(self.rm(x.to(self.device), lengths.to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, items: Sequence[str | Sequence[dict]]) -> torch.Tensor:
        return self.score_ids([self.encode(it) for it in items])

    def best_of(self, prompt: Sequence[dict], candidates: Sequence[str]) -> tuple[int, torch.Tensor]:
        """Best-of-n: the index of the highest-scoring candidate answer to `prompt` (the
        conversation so far), and every candidate's score."""
        if not candidates:
            raise DataError("best_of: no candidate answers to rank")
        scores = self.score([[*prompt, {"role": "assistant", "content": c}] for c in candidates])
        return int(scores.argmax()), scores


__all__ = [
    "RewardModel",
    "RewardScorer",
    "evaluate_reward",
    "load_reward_model",
    "pair_batch",
    "pair_scores",
    "save_reward_model",
]
