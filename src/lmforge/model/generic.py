"""The generic path: any causal LM that `transformers` loads offline, behind lmforge's model
interface, so every stage (SFT, reward, DPO family, PPO/GRPO, eval, serve, LoRA) runs it.

Why a wrapper and not a converter: a native family (`families/`) maps a checkpoint onto
lmforge's own decoder, which is fast (fused kernels, FlexAttention document masks, the serve
fast path) but has to be written family by family. Everything else runs the model's own
`transformers` code: correct by construction, slower. `load_pretrained` picks the path from
config.json's `model_type` and says which one in a single warning line.

How the model looks like a `Transformer` to the rest of lmforge:
- `GenericCausalLM` *is* the Hugging Face model's module tree: it shares the HF model's
  `_modules` / `_parameters` / `_buffers`, so parameter names are the HF names (`model.layers.0
  .self_attn.q_proj.weight`, `gpt_neox.layers.0.attention.query_key_value.weight`): a state
  dict is the HF state dict, a LoRA adapter's keys are the ones `peft` expects, and a module
  replaced by name (LoRA) is replaced in the HF model too.
- `hidden_states` runs the HF trunk (`base_model`) and `lm_head` is the output projection plus
  what the family does after it (Cohere's `logit_scale`, a final soft-cap), so the chunked loss
  paths of the objectives work unchanged. Loading checks both against the HF model's own
  logits on a few tokens, with and without a cache, and refuses a model where they differ.
- Attention masks are always built here as explicit 4D boolean masks (causal, packed documents
  from a `DocumentMask`, or the caller's boolean mask), which `transformers` uses as given:
  packing stays leak-free without FlexAttention. A sliding window is not applied by such a
  mask, so a model whose window is shorter than its context gets its context capped to the
  window (said in the load line).
- A K/V cache (`transformer.KVCache`, serve's `SlotCache`) is reached through `CacheBridge`,
  a `transformers.Cache` whose `update` writes into the lmforge cache: the generator and the
  serve engine run the model unchanged.
Reward models over such a trunk are the architecture's own `<Arch>ForSequenceClassification`
(`align/reward_generic.py`). Not on this path: prompt tuning and QLoRA (they rebuild lmforge's
own decoder) and the serve engine's fused fast path.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError
from .attention import DocumentMask
from .config import ModelConfig
from .families.generic import from_hf as generic_config
from .output import linear_cross_entropy, loss_chunk
from .transformer import count_params

SPEED_NOTE = (
    "generic path: correct, slower: no fused kernels, dense attention masks instead of "
    "FlexAttention for packed rows, no serve fast path; no prompt tuning or QLoRA"
)


class GenericPathWarning(UserWarning):
    """The one line that says a model runs through `transformers` rather than a native family."""


def transformers_causal_lm(model_type: str | None) -> bool:
    """True when the installed `transformers` has an AutoModelForCausalLM class for `model_type`."""
    if not model_type:
        return False
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return False
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _keys(cache: Any, n_new: int) -> int:
    """Key columns the next forward of `n_new` tokens attends over, for any lmforge cache."""
    key_length = getattr(cache, "key_length", None)
    return int(key_length(n_new)) if key_length is not None else int(cache.length) + n_new


def attention_allowed(attn_mask: Any, B: int, T: int, S: int, device: torch.device) -> torch.Tensor:
    """Boolean [B or 1, 1, T, S] (True = may attend) with `Transformer`'s semantics: a
    `DocumentMask` is causal within documents; a boolean mask is used as given; None is causal
    with the T queries as the last T of the S keys (one query sees every key)."""
    if isinstance(attn_mask, DocumentMask):
        return attn_mask.dense()
    if attn_mask is not None:
        m = attn_mask.to(device=device, dtype=torch.bool)
        while m.dim() < 4:
            m = m.unsqueeze(0) if m.dim() == 2 else m.unsqueeze(1)
        return m
    if T == 1:
        return torch.ones(1, 1, 1, S, dtype=torch.bool, device=device)
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None, None]


def _make_bridge(inner: Any):
    """A `transformers.Cache` whose `update` writes into lmforge's cache `inner` (KVCache or
    serve's SlotCache) and returns that cache's keys and values."""
    from transformers.cache_utils import Cache

    class CacheBridge(Cache):
        def __init__(self) -> None:
            super().__init__(layers=[])

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return inner.update(layer_idx, key_states, value_states)

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return int(inner.length)

    return CacheBridge()


class GenericHead(nn.Module):
    """The output projection plus what the family applies after it (`logit_scale`, soft-cap)."""

    def __init__(self, proj: nn.Module, scale: float | None, softcap: float | None):
        super().__init__()
        self.proj, self.scale, self.softcap = proj, scale, softcap

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.proj(h)
        if self.scale is not None:
            y = y * self.scale
        if self.softcap:
            y = torch.tanh(y / self.softcap) * self.softcap
        return y


class GenericCausalLM(nn.Module):
    """A `transformers` causal LM with `Transformer`'s interface (see the module docstring)."""

    generic = True
    hf: Any  # the transformers model whose module tree this one shares

    def __init__(self, hf_model: Any, cfg: ModelConfig, source: str = "model"):
        super().__init__()
        # the HF model's tree is this module's tree: same children, names and parameters
        self.__dict__["hf"] = hf_model
        self.__dict__["_modules"] = hf_model._modules
        self.__dict__["_parameters"] = hf_model._parameters
        self.__dict__["_buffers"] = hf_model._buffers
        self.__dict__["_non_persistent_buffers_set"] = hf_model._non_persistent_buffers_set
        self.cfg = cfg
        self.source = source
        hc = hf_model.config
        self._scale = getattr(hc, "logit_scale", None) if hf_model.config.model_type == "cohere" else None
        self._softcap = getattr(hc, "final_logit_softcapping", None)
        params = inspect.signature(hf_model.base_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._sdpa = getattr(hc, "_attn_implementation", None) == "sdpa"
        self.train(hf_model.training)

    def train(self, mode: bool = True):
        super().train(mode)
        self.hf.training = mode
        return self

    @property
    def lm_head(self) -> nn.Module:
        proj = self.hf.get_output_embeddings()
        if self._scale is None and not self._softcap:
            return proj
        return GenericHead(proj, self._scale, self._softcap)

    @property
    def embed_tokens(self) -> nn.Module:
        return self.hf.get_input_embeddings()

    def _mask(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self._sdpa:  # SDPA takes a boolean mask (and stays in the autocast dtype)
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def hidden_states(self, input_ids, position_ids=None, attn_mask=None, cache=None):
        B, T = input_ids.shape
        S = _keys(cache, T) if cache is not None else T
        dev = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(S - T, S, device=dev)
        pos = position_ids.reshape(-1, position_ids.shape[-1]).expand(B, T)
        dtype = self.embed_tokens.weight.dtype
        if torch.is_autocast_enabled(dev.type):
            dtype = torch.get_autocast_dtype(dev.type)
        mask = self._mask(attention_allowed(attn_mask, B, T, S, dev), dtype)
        kw: dict[str, Any] = {self._cache_kw: _make_bridge(cache) if cache is not None else None}
        out = self.hf.base_model(
            input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=cache is not None, **kw
        )
        if cache is not None:
            cache.length += T
        return out.last_hidden_state

    def forward(self, input_ids, position_ids=None, attn_mask=None, cache=None, targets=None):
        """Logits [B, T, vocab], or with `targets` the summed next-token cross-entropy (fp32,
        chunked head when large), as `Transformer.forward`."""
        h = self.hidden_states(input_ids, position_ids, attn_mask, cache)
        if targets is None:
            return self.lm_head(h)
        n = h.shape[0] * h.shape[1]
        return linear_cross_entropy(
            h.flatten(0, 1), self.lm_head, targets.reshape(-1), loss_chunk(n, self.cfg.vocab_size)
        )

    def loss(self, input_ids, targets, ignore_index: int = -100, **kw) -> torch.Tensor:
        logits = self(input_ids, **kw)
        return F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index
        )

    def moe_aux_loss(self) -> torch.Tensor | None:
        return None

    def num_params(self, trainable_only: bool = False) -> int:
        return count_params(self, trainable_only)


# ----------------------------------------------------------------------------- loading
def _context_cap(hf: dict) -> int | None:
    """The sliding window when it is shorter than the context (the 4D masks do not apply it)."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    ctx = generic_config(hf, "config.json").max_seq_len
    return int(window) if window and int(window) < ctx else None


@torch.no_grad()
def _self_check(model: GenericCausalLM, source: str) -> None:
    """lmforge's forward (trunk + head, its masks, a cache) against the HF model's own logits
    on a few tokens; a model computed differently is refused, never run approximately."""
    from .transformer import KVCache

    dev = next(model.parameters()).device
    n = min(6, model.cfg.max_seq_len)
    ids = (torch.arange(n, device=dev) * 7 + 1)[None] % model.cfg.vocab_size
    ref = model.hf(input_ids=ids, use_cache=False).logits.float()
    dt = next(model.parameters()).dtype
    tol = 1e-4 if dt == torch.float32 else 3e-2
    scale = float(ref.abs().max()) + 1.0
    got = model(ids).float()
    cache = KVCache(model.cfg, 1, n, dev, dt)
    try:
        cached = torch.cat([model(ids[:, : n - 1], cache=cache), model(ids[:, n - 1 :], cache=cache)], 1)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise CheckpointError(
            f"{source}: the model's attention does not fit lmforge's K/V cache ({type(e).__name__}: {e}); "
            f"this architecture cannot run on the generic path"
        ) from None
    for what, out in (("forward", got), ("cached decoding", cached.float())):
        err = float((out - ref).abs().max())
        if err > tol * scale:
            raise CheckpointError(
                f"{source}: lmforge's {what} of this {model.cfg.hf_type} model differs from transformers' "
                f"logits by {err:.3g}; this architecture cannot run on the generic path"
            )


def load_generic(
    folder: str | Path, hf: dict, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> GenericCausalLM:
    """The model of `folder` (a config.json whose model_type has no native family) through
    `transformers.AutoModelForCausalLM`, offline, safetensors only, no remote code."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    auto: Any = AutoModelForCausalLM  # with output_loading_info it returns (model, info)
    folder = Path(folder)
    source = str(folder / "config.json")
    cfg = generic_config(hf, source)
    cap = _context_cap(hf)
    if cap is not None:
        cfg = cfg.model_copy(update={"max_seq_len": cap})
    kw: dict[str, Any] = dict(
        local_files_only=True,
        trust_remote_code=False,
        use_safetensors=True,
        dtype=dtype or torch.float32,
        output_loading_info=True,
    )
    mt = hf.get("model_type")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the load line below is the output; no per-tensor bar
    try:
        try:
            model, info = auto.from_pretrained(str(folder), attn_implementation="sdpa", **kw)
        except ValueError as e:
            if "sdpa" not in str(e).lower():
                raise
            model, info = auto.from_pretrained(str(folder), attn_implementation="eager", **kw)
    except (OSError, ValueError, KeyError, RuntimeError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{folder}: transformers cannot load this {mt} model ({e})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    # transformers initialises missing weights at random and drops unexpected ones: refuse both
    bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        found = "; ".join(f"{k.replace('_', ' ')} {v[:3]}" for k, v in bad.items() if v)
        raise CheckpointError(f"{folder}: the weights do not match a {mt} model of config.json ({found})")
    out = GenericCausalLM(cast(Any, model).to(device), cfg, str(folder)).eval()
    _self_check(out, str(folder))
    capped = f"; context capped to the sliding window ({cap} tokens)" if cap is not None else ""
    warnings.warn(
        f"{folder}: model_type {hf.get('model_type')!r} has no native lmforge family; running it "
        f"through transformers' AutoModelForCausalLM ({SPEED_NOTE}){capped}",
        GenericPathWarning,
        stacklevel=3,
    )
    return out
