"""Model shape: the handful of knobs that size a Llama-style decoder, plus the flags that make
the same decoder compute Qwen3, Gemma / Gemma 2, Phi-3 and GPT-2.

`ModelConfig` is what a checkpoint's `config.json` (lmforge flavour) holds and what the HF
converters map to and from `LlamaConfig` / `Qwen2Config` / `MistralConfig`, the family
converters in `model/families/` (Qwen3, Gemma, Gemma 2, Phi-3, GPT-2), and for MoE models
`MixtralConfig` (`model/hf_moe.py`). The defaults are Llama's; each family flag is off by
default, so a config written before the flag existed means what it meant then. Counting helpers live here so that the trainer,
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
    # Family features (defaults = Llama)
    hf_type: str | None = Field(
        None, description="HF model_type written on export; None = llama / qwen2 / mistral from the flags"
    )
    head_size: int | None = Field(None, ge=2, description="attention head width; default d_model / n_heads")
    qk_norm: bool = Field(False, description="RMSNorm on each query and key head before RoPE (Qwen3)")
    norm: Literal["rms", "rms_offset", "layer"] = Field(
        "rms", description="rms; rms_offset = Gemma's x * (1 + w); layer = LayerNorm with bias (GPT-2)"
    )
    activation: Literal["silu", "gelu_tanh", "gelu"] = "silu"
    gated_mlp: bool = Field(True, description="gate * up (SwiGLU / GeGLU); False = plain MLP (GPT-2)")
    bias: bool = Field(False, description="biases on every linear layer but the head (GPT-2)")
    positions: Literal["rope", "learned"] = Field("rope", description="learned = GPT-2 position table")
    embed_scale: bool = Field(False, description="multiply embeddings by sqrt(d_model) (Gemma)")
    sandwich_norm: bool = Field(False, description="norms before and after attention and MLP (Gemma 2)")
    query_scale: float | None = Field(
        None, gt=0, description="attention scores scaled by query_scale ** -0.5; default head width"
    )
    attn_softcap: float | None = Field(None, gt=0, description="attention logit soft-cap (Gemma 2)")
    logit_softcap: float | None = Field(None, gt=0, description="final logit soft-cap (Gemma 2)")
    sliding_window: int | None = Field(
        None, ge=1, description="query i sees key j iff 0 <= i - j < window, on the layers it applies to"
    )
    rope_theta_local: float | None = Field(
        None, gt=0, description="RoPE base of the sliding-window layers when it differs (Gemma 3)"
    )
    rope_linear_factor: float = Field(
        1.0, ge=1, description="linear RoPE scaling (positions / factor) of the full-attention layers"
    )
    layer_types: list[Literal["full", "sliding"]] | None = Field(
        None, description="per-layer attention; None = every layer sliding when sliding_window is set"
    )
    # Mixture-of-Experts feed-forward (0 experts = dense SwiGLU)
    n_experts: int = Field(0, ge=0, description="experts per MoE layer; 0 = dense model")
    experts_top_k: int = Field(2, ge=1, description="experts each token is routed to")
    moe_gate: Literal["softmax", "sigmoid"] = "softmax"
    capacity_factor: float | None = Field(None, gt=0, description="None = dropless routing")
    shared_expert: bool = Field(False, description="an always-on expert beside the routed ones")
    moe_d_ff: int | None = Field(None, ge=1, description="expert hidden width; default = d_ff")
    aux_loss_coef: float = Field(0.01, ge=0, description="load-balancing loss weight")
    z_loss_coef: float = Field(0.001, ge=0, description="router z-loss weight")
    # A model run by `transformers` itself (no native family): its whole config.json
    hf_config: dict | None = Field(
        None, description="config.json of a generic-path model (model/generic.py); None = native"
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.head_size is None and self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"head_dim = {self.head_dim} must be even for RoPE")
        if self.layer_types is not None and len(self.layer_types) != self.n_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
        if self.layer_types and "sliding" in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types has sliding layers but sliding_window is not set")
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
        return self.head_size or self.d_model // self.n_heads

    def window_of(self, layer: int) -> int | None:
        """The sliding window of one layer (None = full causal attention)."""
        if not self.sliding_window:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding":
            return self.sliding_window
        return None

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
            mats = 3 if self.gated_mlp else 2
            return mats * d * self.ff_dim + (self.bias * ((mats - 1) * self.ff_dim + d))
        used = self.experts_top_k if active else self.n_experts
        return d * self.n_experts + (used + int(self.shared_expert)) * 3 * d * self.expert_dim

    # -- counts
    def param_count(self, include_embeddings: bool = True, active: bool = False) -> int:
        """Parameters; with `active`, only those one token uses (MoE: top-k experts)."""
        d, hd = self.d_model, self.head_dim
        attn = d * (self.n_heads * hd) + 2 * d * (self.kv_heads * hd) + (self.n_heads * hd) * d
        if self.qkv_bias or self.bias:
            attn += self.n_heads * hd + 2 * self.kv_heads * hd
        attn += d * self.bias + 2 * hd * self.qk_norm
        mlp = self._ffn_params(active)
        norm = 2 * d if self.norm == "layer" else d
        norms = (4 if self.sandwich_norm else 2) * norm
        body = self.n_layers * (attn + mlp + norms) + norm  # + final norm
        if not include_embeddings:
            return body
        emb = self.vocab_size * d + (self.max_seq_len * d if self.positions == "learned" else 0)
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return body + emb + head

    def activation_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Training activation memory per token, for sizing `seq_len` before anything is allocated:
        ~34 d bytes per layer at 16-bit (Korthikanti et al. 2022, no recomputation; fused attention,
        so no T^2 term), plus the logits, their fp32 copy and gradient (~10 bytes per vocab entry)."""
        per_layer = 34 * self.d_model * bytes_per_value // 2
        return self.n_layers * per_layer + 10 * self.vocab_size

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
