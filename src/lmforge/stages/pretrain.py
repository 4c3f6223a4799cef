"""`lmforge pretrain`: next-token pretraining (or continued pretraining) on the token shards.

The model's vocabulary comes from the tokenizer and its context from `seq_len`; everything else
is `pretrain.model.*`. Runs through the shared training engine, which checkpoints into
`pretrain/checkpoints/` and resumes from there when the stage is re-run after a crash. The
final weights land in `pretrain/model/` as a Hugging Face-loadable folder with the tokenizer.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..data.shards import TokenLoader, load_shard
from ..eval.perplexity import evaluate_shard, token_byte_lengths
from ..model.config import ModelConfig
from ..model.hf import load_pretrained, save_pretrained
from ..model.resources import check_fits, training_memory
from ..model.transformer import Transformer
from ..tokenizer import LMTokenizer
from ..train.config import TrainConfig
from ..train.distributed import barrier, check_batch, init_distributed, resolve_strategy, shutdown
from ..train.engine import Trainer
from ..train.objectives.pretrain import pretrain_objective
from .base import StageContext, define_stage


class PretrainConfig(TrainConfig):
    model: ModelConfig = Field(
        default_factory=ModelConfig,
        description="shape; vocab_size and max_seq_len are set from the tokenizer and seq_len",
    )
    seq_len: int = Field(256, ge=8)
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the model; auto = on CUDA (fixed-shape rows: one compilation)"
    )
    eval_tokens: int = Field(65536, ge=0, description="val tokens scored at each eval (0 = all)")
    init_from: str | None = Field(None, description="start from this model folder (continued pretraining)")
    peak_tflops: float | None = Field(None, gt=0, description="device peak for MFU logging")
    warn_epochs: float = Field(
        20, gt=0, description="warn when max_steps repeats the training tokens more times than this"
    )

    def shape_for(self, vocab_size: int) -> ModelConfig:
        """The shape trained from scratch: `model` with the tokenizer's vocabulary and seq_len."""
        return ModelConfig.model_validate(
            {**self.model.model_dump(), "vocab_size": vocab_size, "max_seq_len": self.seq_len}
        )


def build_model(cfg: PretrainConfig, vocab_size: int, device: torch.device, seed: int) -> Transformer:
    if cfg.init_from:
        model = load_pretrained(cfg.init_from, device=device)
        if model.cfg.vocab_size < vocab_size:
            from ..errors import ConfigError

            raise ConfigError(
                f"pretrain.init_from: model vocab {model.cfg.vocab_size} < tokenizer vocab {vocab_size}"
            )
        return model.train()
    mcfg = cfg.shape_for(vocab_size)
    torch.manual_seed(seed)
    return Transformer(mcfg).to(device)


def check_resources(
    cfg: PretrainConfig, vocab_size: int, device: torch.device, batch: int, dtype: str
) -> None:
    """Refuse, before allocating, a shape whose training memory cannot fit the device."""
    if cfg.init_from:  # the folder's config is checked when it is loaded
        return
    half = device.type == "cuda" and dtype in ("auto", "bfloat16", "float16")
    est = training_memory(
        cfg.shape_for(vocab_size),
        batch_size=batch,
        seq_len=cfg.seq_len,
        optimizer=cfg.optimizer,
        act_bytes=2 if half else 4,
    )
    check_fits(est, device, "pretrain")


def estimate_time(ctx: StageContext, cfg: PretrainConfig, mcfg, world: int) -> None:
    ctx.estimate_time(
        mcfg,
        steps=cfg.max_steps,
        tokens_per_step=cfg.batch_size * cfg.grad_accum * cfg.seq_len,
        seq_len=cfg.seq_len,
        keys=f"{ctx.name}.max_steps, {ctx.name}.batch_size x grad_accum x seq_len, {ctx.name}.model (d_model, n_layers)",
        devices=world,
    )


def warn_repeats(cfg: PretrainConfig, tokens: int, data_tokens: int, log) -> None:
    epochs = tokens / max(int(data_tokens), 1)
    if epochs > cfg.warn_epochs:
        log(
            f"warning: {cfg.max_steps} steps repeat the {int(data_tokens):,} training tokens {epochs:,.0f} "
            f"times (pretrain.warn_epochs={cfg.warn_epochs:g}); the model will memorise them. Add data or "
            f"lower pretrain.max_steps / batch_size / seq_len (or raise pretrain.warn_epochs)"
        )


def full_model(model: Transformer, strategy: str) -> Transformer:
    """The trained model as one plain module (FSDP2 shards are gathered on every rank)."""
    if strategy != "fsdp":
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    plain = Transformer(model.cfg)
    plain.load_state_dict(state, strict=False)
    if model.cfg.tie_embeddings:
        plain.lm_head.weight = plain.model.embed_tokens.weight
    return plain


@define_stage(
    "pretrain",
    PretrainConfig,
    needs=("tokenizer",),
    distributed=True,
    help="pretrain the transformer on the token shards",
)
def pretrain_stage(ctx: StageContext) -> dict:
    cfg: PretrainConfig = ctx.cfg
    tok_dir = ctx.input_dir("tokenizer")
    tok = LMTokenizer.load(tok_dir)
    device = ctx.device
    info = init_distributed(device.type, need_group=cfg.parallel == "fsdp")
    local_batch = check_batch(cfg.batch_size, info.world)
    if device.type == "cuda" and info.world > 1:
        device = torch.device("cuda", info.local_rank)
    check_resources(cfg, tok.vocab_size, device, local_batch, ctx.dtype)
    if not cfg.init_from:  # from the config alone, before anything is allocated
        estimate_time(ctx, cfg, cfg.shape_for(tok.vocab_size), info.world)
    model = build_model(cfg, tok.vocab_size, device, ctx.seed)
    if cfg.init_from:
        estimate_time(ctx, cfg, model.cfg, info.world)
    mcfg = model.cfg
    train, val = load_shard(tok_dir, "train"), load_shard(tok_dir, "val")
    loader = TokenLoader(train, cfg.seq_len, local_batch, seed=ctx.seed, rank=info.rank, world=info.world)
    token_bytes = token_byte_lengths(tok)
    n_params = model.num_params()
    ctx.log(
        f"model: {n_params / 1e6:.2f}M parameters ({mcfg.non_embedding_params() / 1e6:.2f}M non-embedding), "
        f"{mcfg.n_layers} layers, d_model {mcfg.d_model}, {mcfg.n_heads} heads; device {device}"
    )
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    if info.world > 1:
        ctx.log(
            f"data parallel over {info.world} processes ({resolve_strategy(cfg.parallel, info.world)}), "
            f"{local_batch} sequences per rank per micro-batch"
        )
    ctx.log(
        f"{cfg.max_steps} steps x {tokens_per_step:,} tokens = {cfg.max_steps * tokens_per_step / 1e6:.1f}M tokens "
        f"({cfg.max_steps * tokens_per_step / max(train.meta['n_tokens'], 1):.2f} epochs)"
    )
    warn_repeats(cfg, cfg.max_steps * tokens_per_step, train.meta["n_tokens"], ctx.log)

    def evaluate(m):
        return evaluate_shard(
            m,
            val,
            token_bytes,
            seq_len=cfg.seq_len,
            batch_size=local_batch,
            device=device,
            max_tokens=cfg.eval_tokens or None,
        )

    peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else None
    if peak is None and device.type == "cuda":
        from ..scaling.cost import device_peak_flops

        peak = device_peak_flops(
            torch.cuda.get_device_name(device), "bf16" if ctx.dtype in ("auto", "bfloat16") else "auto"
        )
    trainer = Trainer(
        model,
        pretrain_objective(),
        loader,
        cfg,
        ctx.dir,
        device=device,
        dtype=ctx.dtype,
        evaluate=evaluate,
        flops_per_token=mcfg.flops_per_token(cfg.seq_len),
        peak_flops=peak,
        log=ctx.log,
        dist_info=info,
    )
    try:
        result = trainer.fit(resume=True)
        final = full_model(model, trainer.strategy)
        if info.is_main:
            save_pretrained(
                final, ctx.dir / "model", tokenizer_dir=tok_dir, bos_id=tok.bos_id, eos_id=tok.eos_id
            )
        barrier()
    finally:
        shutdown(info)
    metrics = {
        "params": n_params,
        "non_embedding_params": mcfg.non_embedding_params(),
        "steps": result.step,
        **result.speed_metrics(),
        "train_loss": result.final.get("loss"),
        "val_loss": result.final.get("eval_loss"),
        "val_bpb": result.final.get("eval_bpb"),
        "best_val_loss": result.best_eval_loss,
        "stopped_early": result.stopped_early,
        "train_seconds": round(result.seconds, 2),
        "flops": mcfg.flops_per_token(cfg.seq_len) * result.tokens,
    }
    if result.resumed_from is not None:
        metrics["resumed_from_step"] = result.resumed_from
    return metrics
