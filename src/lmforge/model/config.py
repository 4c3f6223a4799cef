"""Model shape: the handful of knobs that size a Llama-style decoder.

`ModelConfig` is what a checkpoint's `config.json` (lmforge flavour) holds and what the HF
converters map to and from `LlamaConfig` / `Qwen2Config`, and for MoE models `MixtralConfig`
(`model/hf_moe.py`). Counting helpers live here so that the trainer,
the scaling tools and the report all use one definition of "parameters" and "FLOPs".
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(4096, ge=2)
    d_model: int = Field(256, ge=8, description="residual width")
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(4, ge=1)
    n_kv_heads: int | None = Field(None, ge=1, description="grouped-query attention; default = n_heads")
    d_ff: int | None = Field(
        None, ge=1, description="SwiGLU hidden width; default ~8/3 d_model rounded to 64"
    )
    max_seq_len: int = Field(256, ge=2)
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = True
    qkv_bias: bool = Field(False, description="bias on q/k/v projections (Qwen2 style)")
    init_std: float = Field(0.02, gt=0)
    # Mixture-of-Experts feed-forward (0 experts = dense SwiGLU)
    n_experts: int = Field(0, ge=0, description="experts per MoE layer; 0 = dense model")
    experts_top_k: int = Field(2, ge=1, description="experts each token is routed to")
    moe_gate: Literal["softmax", "sigmoid"] = "softmax"
    capacity_factor: float | None = Field(None, gt=0, description="None = dropless routing")
    shared_expert: bool = Field(False, description="an always-on expert beside the routed ones")
    moe_d_ff: int | None = Field(None, ge=1, description="expert hidden width; default = d_ff")
    aux_loss_coef: float = Field(0.01, ge=0, description="load-balancing loss weight")
    z_loss_coef: float = Field(0.001, ge=0, description="router z-loss weight")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"head_dim = d_model/n_heads = {self.d_model // self.n_heads} must be even for RoPE"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads ({self.kv_heads}) must divide n_heads ({self.n_heads})")
        if self.n_experts and self.experts_top_k > self.n_experts:
            raise ValueError(f"experts_top_k ({self.experts_top_k}) exceeds n_experts ({self.n_experts})")
        return self

    # -- derived sizes
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        return 64 * ((int(8 * self.d_model / 3) + 63) // 64)

    @property
    def expert_dim(self) -> int:
        return self.moe_d_ff or self.ff_dim

    def _ffn_params(self, active: bool) -> int:
        """Feed-forward parameters of one layer (all experts, or those a token uses)."""
        d = self.d_model
        if not self.n_experts:
            return 3 * d * self.ff_dim
        used = self.experts_top_k if active else self.n_experts
        return d * self.n_experts + (used + int(self.shared_expert)) * 3 * d * self.expert_dim

    # -- counts
    def param_count(self, include_embeddings: bool = True, active: bool = False) -> int:
        """Parameters; with `active`, only those one token uses (MoE: top-k experts)."""
        d, hd = self.d_model, self.head_dim
        attn = d * (self.n_heads * hd) + 2 * d * (self.kv_heads * hd) + (self.n_heads * hd) * d
        if self.qkv_bias:
            attn += self.n_heads * hd + 2 * self.kv_heads * hd
        mlp = self._ffn_params(active)
        norms = 2 * d
        body = self.n_layers * (attn + mlp + norms) + d  # + final norm
        if not include_embeddings:
            return body
        emb = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return body + emb + head

    def non_embedding_params(self) -> int:
        return self.param_count(include_embeddings=False)

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token, attention included (PaLM appendix B / Chinchilla style).

        forward = 2 * (non-embedding matmul params + lm head) + 2 * 2 * n_layers * seq * d_attn
        (QK^T and AV, causal masking not discounted, as is customary for MFU); training = 3x.
        """
        seq = seq_len or self.max_seq_len
        d, hd = self.d_model, self.head_dim
        matmul = (
            self.n_layers
            * (d * self.n_heads * hd * 2 + 2 * d * self.kv_heads * hd + self._ffn_params(active=True))
            + self.vocab_size * d
        )
        fwd = 2 * matmul + 4 * self.n_layers * seq * self.n_heads * hd
        return float(3 * fwd if training else fwd)
