"""Pretraining-step throughput: lmforge `Transformer` vs Hugging Face `LlamaForCausalLM`.

Both models have the identical shape (the HF one is built from lmforge's own HF config,
`lmforge.model.hf.to_hf_config` -> `LlamaConfig`, attn_implementation="sdpa") and start from the
same weights (lmforge's state dict is loaded into the HF model). Both are driven by the *same*
code: one `lmforge.train.engine.Trainer` per model and its real optimizer step
(`Trainer._train_step`: forward, fp32 cross-entropy summed over tokens, backward, grad-norm clip,
fused AdamW with the engine's decay/no-decay split, zero_grad). The only difference is the
network, so the ratio measures the model code.

Noise: the machine is small and shared, so the contenders are timed interleaved
(A, B, A, B, ...) on the same batches after a warm-up, and the figure that matters is the
ratio of the medians measured in the same run.

Sanity: the losses of the first steps (same batch, same weights, same optimizer) must agree to
1e-4, which shows the two are the same network.

    python benchmarks/train_throughput.py                      # default shape
    python benchmarks/train_throughput.py --layers 4 --d-model 256 --heads 4 --kv-heads 2
    python benchmarks/train_throughput.py --compile            # + lmforge under torch.compile
    python benchmarks/train_throughput.py --variants fused,gqa,nosync+compile   # + prototypes
    python benchmarks/train_throughput.py --profile            # where the time goes

`--variants` times monkeypatched prototypes of changes to `lmforge/model/transformer.py`
(`make_fused`, `make_gqa`, `make_nosync` below; "+compile" runs one under torch.compile); they are measured here, the model file itself is not changed.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.model.config import ModelConfig
from lmforge.model.hf import to_hf_config
from lmforge.model.transformer import Transformer, apply_rotary
from lmforge.train.config import TrainConfig
from lmforge.train.engine import Trainer
from lmforge.train.objectives.pretrain import pretrain_objective


# ----------------------------------------------------------------------------- objectives
class HFNextToken:
    """The engine's pretrain objective, applied to a `transformers` model (logits + the same CE)."""

    def __init__(self):
        self._inner = pretrain_objective()

    def __call__(self, model, batch):
        x, y = batch
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100, reduction="sum"
        )
        return loss, int((y != -100).sum()), {}

    def count(self, batch):
        return self._inner.count(batch)


# ----------------------------------------------------------------------------- prototypes
# Candidate changes to transformer.py, measured as monkeypatched variants of the same module
# tree. Parameter names stay HF-compatible (q_proj/k_proj/v_proj/gate_proj/up_proj), the
# fused matrices are views into one storage so no copy happens per step.


def _attn_fused_forward(self, x, cos, sin, attn_mask=None, cache=None):
    B, T, _ = x.shape
    qkv = F.linear(x, self._qkv_weight, self._qkv_bias)
    q, k, v = qkv.split((self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd), dim=-1)
    q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)
    k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)
    v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if cache is not None:
        k, v = cache.update(self.layer_idx, k, v)
    gqa = self.n_kv != self.n_heads
    if attn_mask is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
    return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


def _mlp_fused_forward(self, x):
    gate, up = F.linear(x, self._gate_up_weight).chunk(2, dim=-1)
    return self.down_proj(F.silu(gate) * up)


def _attn_gqa_forward(self, x, cos, sin, attn_mask=None, cache=None):
    """Only the GQA change: SDPA's enable_gqa instead of repeat_interleave."""
    B, T, _ = x.shape
    q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)
    k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
    v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    gqa = self.n_kv != self.n_heads
    y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
    return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


def make_fused(model: Transformer) -> Transformer:
    """Fuse q/k/v and gate/up into single matrices whose rows are the original parameters.

    The fused weight is one nn.Parameter; q_proj.weight etc. become views of it (so a state
    dict keeps HF names). Here only speed is measured, so the views are kept as plain
    attributes and the optimizer sees the fused parameter."""
    for blk in model.model.layers:
        a, m = blk.self_attn, blk.mlp
        w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach().clone()
        a._qkv_weight = nn.Parameter(w)
        if a.q_proj.bias is not None:
            a._qkv_bias = nn.Parameter(
                torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]).detach().clone()
            )
        else:
            a._qkv_bias = None
        del a.q_proj, a.k_proj, a.v_proj
        a.forward = types.MethodType(_attn_fused_forward, a)
        m._gate_up_weight = nn.Parameter(torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach().clone())
        del m.gate_proj, m.up_proj
        m.forward = types.MethodType(_mlp_fused_forward, m)
    return model


def make_gqa(model: Transformer) -> Transformer:
    for blk in model.model.layers:
        if hasattr(blk.self_attn, "_qkv_weight"):  # "fused" already uses enable_gqa
            continue
        blk.self_attn.forward = types.MethodType(_attn_gqa_forward, blk.self_attn)
    return model


def _rotary_forward_nosync(self, position_ids, dtype, need=None):
    if need is None:  # explicit position ids (packing, decoding): one host sync, as before
        need = int(position_ids.max()) + 1
    if need > self.cos.shape[0]:
        self._build(max(need, 2 * self.cos.shape[0]))
    if position_ids.dim() == 1 and need == position_ids.shape[0]:  # 0..T-1: a slice, not a gather
        cos, sin = self.cos[:need], self.sin[:need]
    else:
        cos, sin = self.cos[position_ids], self.sin[position_ids]
    cos, sin = cos.to(dtype), sin.to(dtype)
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return cos, sin


def _hidden_states_nosync(self, input_ids, position_ids=None, attn_mask=None, cache=None):
    B, T = input_ids.shape
    need = None
    if position_ids is None:
        start = cache.length if cache is not None else 0
        need = start + T  # known on the host: no .max() on a device tensor
        position_ids = torch.arange(start, need, device=input_ids.device)
    x = self.model.embed_tokens(input_ids)
    cos, sin = self.model.rotary(position_ids, x.dtype, need)
    for layer in self.model.layers:
        x = layer(x, cos, sin, attn_mask, cache)
    if cache is not None:
        cache.length += T
    return self.model.norm(x)


def make_nosync(model: Transformer) -> Transformer:
    """Rotary without `int(position_ids.max())` when positions are 0..T-1: that call is a host
    sync every forward on GPU and a graph break under torch.compile."""
    model.model.rotary.forward = types.MethodType(_rotary_forward_nosync, model.model.rotary)
    model.hidden_states = types.MethodType(_hidden_states_nosync, model)
    return model


# "compile" in a variant (e.g. "fused+nosync+compile") wraps it in torch.compile via the engine.
VARIANTS = {"fused": make_fused, "gqa": make_gqa, "nosync": make_nosync}


# ----------------------------------------------------------------------------- setup
def build(args) -> tuple[ModelConfig, Transformer, nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        max_seq_len=args.seq,
        tie_embeddings=not args.untied,
    )
    torch.manual_seed(args.seed)
    lm = Transformer(cfg)
    hf_cfg = LlamaConfig(**to_hf_config(cfg))
    hf_cfg.use_cache = False
    hf = (
        LlamaForCausalLM(hf_cfg, attn_implementation="sdpa")
        if _accepts_attn_kw()
        else LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")
    )
    hf.config._attn_implementation = "sdpa"
    sd = {k: v for k, v in lm.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "rotary" not in k and not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"weight copy failed: missing {missing[:4]} unexpected {unexpected[:4]}")
    if cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr(), "HF head not tied"
    n_lm = sum(p.numel() for p in {id(p): p for p in lm.parameters()}.values())
    n_hf = sum(p.numel() for p in {id(p): p for p in hf.parameters()}.values())
    assert n_lm == n_hf, (n_lm, n_hf)
    return cfg, lm, hf


def _accepts_attn_kw() -> bool:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM

        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2
            ),
            attn_implementation="sdpa",
        )
        return True
    except TypeError:
        return False


def trainer_for(model, objective, args, out: Path, compile_: bool = False) -> Trainer:
    tc = TrainConfig(
        max_steps=10**6,
        batch_size=args.batch,
        lr=args.lr,
        warmup_steps=0,
        schedule="constant",
        weight_decay=0.1,
        beta1=0.9,
        beta2=0.95,
        grad_clip=1.0,
        compile=compile_,
    )
    t = Trainer(
        model,
        objective,
        data=None,
        cfg=tc,
        out_dir=out,
        device=torch.device("cpu"),
        dtype="float32",
        log=lambda s: None,
    )
    t._set_lr()
    return t


def batches(args, n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(args.seed + 1)
    out = []
    for _ in range(n):
        seq = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
        out.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return out


def timed_step(tr: Trainer, b) -> tuple[float, float]:
    t0 = time.perf_counter()
    loss = tr._train_step([b])[0]  # (mean loss, metrics[, units]): the engine's private step
    return time.perf_counter() - t0, loss


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per contender")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--untied", action="store_true", help="separate lm_head (default: tied, lmforge's default)"
    )
    ap.add_argument("--compile", action="store_true", help="also time lmforge under torch.compile")
    ap.add_argument("--compile-hf", action="store_true", help="also time HF under torch.compile")
    ap.add_argument(
        "--variants", default="", help=f"comma list of prototypes to time too: {','.join(VARIANTS)}"
    )
    ap.add_argument(
        "--profile", action="store_true", help="torch.profiler table for lmforge and HF, then exit"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0 = torch default). 1: on a loaded 2-core machine two OpenMP threads "
        "wait on each other at every op (measured 3-40x slower steps; RESULTS_foundation.md)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    cfg, lm, hf = build(args)
    data = batches(args)
    tmp = Path(tempfile.mkdtemp(prefix="lmforge_tp_"))

    contenders: dict[str, Trainer] = {}
    contenders["lmforge"] = trainer_for(lm, pretrain_objective(), args, tmp / "a")
    contenders["hf"] = trainer_for(hf, HFNextToken(), args, tmp / "b")
    variants = list(filter(None, args.variants.split(",")))
    if args.compile:
        variants.append("compile")
    for name in variants:
        parts = name.split("+")
        bad = [p for p in parts if p not in VARIANTS and p != "compile"]
        if bad:
            ap.error(f"unknown variant part(s) {bad}; choose from {sorted(VARIANTS)} and 'compile'")
        m = copy.deepcopy(lm)
        for p in parts:
            if p != "compile":
                m = VARIANTS[p](m)
        contenders[f"lmforge+{name}"] = trainer_for(
            m, pretrain_objective(), args, tmp / name.replace("+", "_"), compile_="compile" in parts
        )
    if args.compile_hf:
        contenders["hf+compile"] = trainer_for(
            copy.deepcopy(hf), HFNextToken(), args, tmp / "d", compile_=True
        )

    tok = args.batch * args.seq
    print(
        f"# train_throughput  torch {torch.__version__}  transformers {transformers.__version__}  "
        f"threads {torch.get_num_threads()}  {platform.machine()}"
    )
    print(
        f"shape: layers={cfg.n_layers} d_model={cfg.d_model} heads={cfg.n_heads} kv_heads={cfg.kv_heads} "
        f"d_ff={cfg.ff_dim} vocab={cfg.vocab_size} seq={args.seq} batch={args.batch} tied={cfg.tie_embeddings} "
        f"fp32  params={lm.num_params() / 1e6:.2f}M  tokens/step={tok}"
    )

    # Sanity: the first warm-up steps see the same batches from the same weights.
    losses: dict[str, list[float]] = {k: [] for k in contenders}
    t_first: dict[str, float] = {}
    for i in range(args.warmup):
        for name, tr in contenders.items():
            dt, loss = timed_step(tr, data[i % len(data)])
            losses[name].append(loss)
            if i == 0:
                t_first[name] = dt
    for name in contenders:
        if name == "lmforge":
            continue
        d0 = abs(losses[name][0] - losses["lmforge"][0])
        dmax = max(abs(a - b) for a, b in zip(losses[name], losses["lmforge"]))
        ok = "OK" if d0 <= 1e-4 else "MISMATCH"
        print(
            f"sanity: first-step loss lmforge {losses['lmforge'][0]:.6f}  {name} {losses[name][0]:.6f}  "
            f"|diff| {d0:.2e} [{ok}]  (max |diff| over {args.warmup} warm-up steps {dmax:.2e})"
        )
    if any("compile" in k for k in contenders):
        print("first step (incl. compile): " + "  ".join(f"{k} {v:.1f}s" for k, v in t_first.items()))

    if args.profile:
        profile(contenders, data, args)
        return 0

    times: dict[str, list[float]] = {k: [] for k in contenders}
    for i in range(args.steps):
        b = data[i % len(data)]
        order = list(contenders.items())
        if i % 2:  # alternate who goes first, so neither always runs right after the other
            order.reverse()
        for name, tr in order:
            dt, _ = timed_step(tr, b)
            times[name].append(dt)

    base = statistics.median(times["hf"])
    print()
    print("| model | median step (ms) | min step (ms) | tokens/s | vs HF (speed) |")
    print("|---|---:|---:|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.1f} | {min(ts) * 1e3:.1f} | {tok / med:,.0f} | {base / med:.3f}x |")
    # per-pair ratio: each lmforge step against the HF step right next to it, a noise-robust estimate
    pair = [h / a for a, h in zip(times["lmforge"], times["hf"])]
    q = statistics.quantiles(pair, n=4)
    print(
        f"\npaired ratio HF_time/lmforge_time: median {statistics.median(pair):.3f}x "
        f"(IQR {q[0]:.3f}-{q[2]:.3f}) over {len(pair)} interleaved pairs"
    )
    return 0


def profile(contenders: dict[str, Trainer], data, args, steps: int = 5) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    for name in ("lmforge", "hf"):
        tr = contenders[name]
        with tprofile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for i in range(steps):
                tr._train_step([data[i % len(data)]])[0]
        print(f"\n## profile: {name} ({steps} steps)")
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=48)
        )


if __name__ == "__main__":
    sys.exit(main())
