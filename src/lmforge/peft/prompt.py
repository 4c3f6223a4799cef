"""Prompt tuning: N learnable "virtual token" embeddings prepended to every input; the model is
frozen (Lester et al. 2021). The cheapest adapter there is: N x d_model parameters.

`PromptTuned` wraps a Transformer and has the same call signature (input_ids, position_ids,
attn_mask, cache), so the training engine, the SFT objective and generation use it unchanged.
Semantics follow PEFT on a HF model: the virtual tokens take positions 0..N-1, real tokens
start at N (with packing, each example's positions restart at N), every real token may attend
to all virtual tokens, and the returned logits cover the real tokens only.

Generation (the serving engine's slot cache, or any duck-typed cache that is told positions):
the caller puts N placeholder ids before each prompt (`virtual_prefix`); the placeholders'
embeddings are replaced by the virtual tokens at positions 0..N-1, so the cache holds the
virtual tokens' keys and values like any prompt's and decoding needs nothing special. The
returned logits then cover every position, virtual ones included.

Init: `text` copies the embeddings of a phrase's tokens (repeated to fill N), the better start
for small N; `random` samples rows of the vocabulary embedding matrix. Saved as PEFT's
PROMPT_TUNING adapter (`prompt_embeddings` [N, d]), which `peft.PeftModel` loads onto the
exported HF model (tested: same logits).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, ConfigError
from ..model.attention import DocumentMask
from ..model.transformer import Transformer
from ..runs import atomic_path, atomic_write_json


class PromptSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_virtual_tokens: int = Field(16, ge=1)
    init: str = Field("text", pattern="^(text|random)$")
    init_text: str = "Answer the question about the Python standard library in one sentence."


class PromptTuned(nn.Module):
    def __init__(self, model: Transformer, n_virtual: int, init_ids: list[int] | None = None, seed: int = 0):
        super().__init__()
        if model.cfg.hf_config is not None:
            raise ConfigError(
                f"prompt tuning runs on lmforge's own decoder; this {model.cfg.hf_type} model runs on the "
                "generic transformers path: use sft.method=lora instead"
            )
        if model.cfg.positions != "rope" or model.cfg.rope_theta_local is not None:
            raise ConfigError(
                "prompt tuning needs a model with one RoPE table (virtual tokens take positions "
                f"0..N-1 in it); this {model.cfg.hf_type or 'model'} has learned positions or a "
                "second RoPE base: use sft.method=lora instead"
            )
        self.model, self.cfg, self.n_virtual = model, model.cfg, n_virtual
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.model.embed_tokens.weight.detach()
        if init_ids:
            ids = (list(init_ids) * (n_virtual // len(init_ids) + 1))[:n_virtual]
        else:
            ids = torch.randint(
                0, emb.shape[0], (n_virtual,), generator=torch.Generator().manual_seed(seed)
            ).tolist()
        self.prompt_embeddings = nn.Parameter(emb[torch.tensor(ids, device=emb.device)].float().clone())

    @property
    def lm_head(self):
        return self.model.lm_head

    def forward(self, input_ids, position_ids=None, attn_mask=None, cache=None):
        return self.model.lm_head(self.hidden_states(input_ids, position_ids, attn_mask, cache))

    def virtual_prefix(self, ids: list[int], placeholder: int = 0) -> list[int]:
        """A prompt for generation with a cache: N placeholder ids (positions of the virtual
        tokens), then `ids`."""
        return [placeholder] * self.n_virtual + list(ids)

    def _cached(self, input_ids, position_ids, attn_mask, cache):
        """Hidden states of every position when a cache holds the earlier ones; positions below
        N (the placeholders of `virtual_prefix`) take the virtual tokens' embeddings."""
        if position_ids is None:
            raise ValueError("a prompt-tuned model decoding with a cache needs explicit position_ids")
        m = self.model
        x = m.model.embed_tokens(input_ids)
        virtual = position_ids < self.n_virtual
        if bool(virtual.any()):
            rows = self.prompt_embeddings.to(x.dtype)[position_ids.clamp(max=self.n_virtual - 1)]
            x = torch.where(virtual[..., None], rows.expand_as(x), x)
        cos, sin = m.model.rotary(position_ids, x.dtype)
        q_index = position_ids if self.cfg.sliding_window is not None else None
        for layer in m.model.layers:
            x = layer(x, cos, sin, attn_mask, cache, q_index)
        cache.length += input_ids.shape[1]
        return m.model.norm(x)

    def hidden_states(self, input_ids, position_ids=None, attn_mask=None, cache=None):
        """Final-norm hidden states of the real tokens [B, T, d] (virtual positions dropped);
        with a cache, of every position (see the module docstring)."""
        if cache is not None:
            return self._cached(input_ids, position_ids, attn_mask, cache)
        B, T = input_ids.shape
        N, dev = self.n_virtual, input_ids.device
        m = self.model
        x = m.model.embed_tokens(input_ids)
        prompt = self.prompt_embeddings.to(x.dtype)[None].expand(B, N, -1)
        x = torch.cat([prompt, x], dim=1)
        if position_ids is None:
            position_ids = torch.arange(T, device=dev)[None].expand(B, T)
        pos = torch.cat(
            [torch.arange(N, device=dev)[None].expand(B, N), position_ids.expand(B, T) + N], dim=1
        )
        if isinstance(attn_mask, DocumentMask):  # packed rows: the virtual tokens are every document's
            full = attn_mask.with_prefix(N)
        else:
            if attn_mask is None:
                attn_mask = (
                    torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None, None].expand(B, 1, T, T)
                )
            full = torch.zeros(B, 1, N + T, N + T, dtype=torch.bool, device=dev)
            full[:, :, :N, :N] = torch.ones(N, N, dtype=torch.bool, device=dev).tril()
            full[:, :, N:, :N] = True
            full[:, :, N:, N:] = attn_mask
        cos, sin = m.model.rotary(pos, x.dtype, N + T)  # positions < N + T: no `.max()` read back
        for layer in m.model.layers:
            x = layer(x, cos, sin, full, None)
        return m.model.norm(x[:, N:])

    def loss(self, input_ids, targets, ignore_index: int = -100, **kw):
        logits = self(input_ids, **kw)
        return nn.functional.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index
        )

    # -- PEFT format
    def save_adapter(
        self,
        out_dir: str | Path,
        base_model: str | None = None,
        settings: PromptSettings | None = None,
        tokenizer: str | None = None,
    ) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "adapter_model.safetensors") as tmp:
            save_file(
                {"prompt_embeddings": self.prompt_embeddings.detach().cpu().contiguous()},
                str(tmp),
                metadata={"format": "pt"},
            )
        text = settings is not None and settings.init == "text"
        atomic_write_json(
            out / "adapter_config.json",
            {
                "peft_type": "PROMPT_TUNING",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": base_model,
                "num_virtual_tokens": self.n_virtual,
                "token_dim": self.cfg.d_model,
                "num_transformer_submodules": 1,
                "num_attention_heads": self.cfg.n_heads,
                "num_layers": self.cfg.n_layers,
                "prompt_tuning_init": "TEXT" if text else "RANDOM",
                "prompt_tuning_init_text": settings.init_text if settings is not None and text else None,
                "tokenizer_name_or_path": tokenizer if text else None,
                "inference_mode": True,
            },
        )
        return out

    @classmethod
    def load_adapter(cls, model: Transformer, folder: str | Path) -> PromptTuned:
        import json

        folder = Path(folder)
        try:
            cfg = json.loads((folder / "adapter_config.json").read_text())
            state = load_file(str(folder / "adapter_model.safetensors"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{folder}: cannot read prompt-tuning adapter ({e})") from None
        if cfg.get("peft_type") != "PROMPT_TUNING":
            raise CheckpointError(f"{folder}: peft_type {cfg.get('peft_type')!r}, expected PROMPT_TUNING")
        emb = state.get("prompt_embeddings")
        if emb is None or emb.dim() != 2:
            raise CheckpointError(f"{folder}: adapter_model.safetensors has no [N, d] prompt_embeddings")
        if emb.shape[1] != model.cfg.d_model:
            raise CheckpointError(
                f"{folder}: prompt_embeddings has width {emb.shape[1]} but the model's d_model is "
                f"{model.cfg.d_model}: the adapter was trained for a different base model"
            )
        wrapped = cls(model, emb.shape[0], init_ids=[0])
        with torch.no_grad():
            wrapped.prompt_embeddings.copy_(emb)
        return wrapped


def init_ids_for(settings: PromptSettings, tok) -> list[int] | None:
    return tok.encode(settings.init_text) if settings.init == "text" else None
