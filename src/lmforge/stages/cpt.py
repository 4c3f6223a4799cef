"""`lmforge cpt`: continued pretraining on a new domain, with replay of the original corpus and
an annealing phase (skipped unless `cpt.domain` is set).

The domain text is tokenized with the model's own tokenizer into shards of the run; training mixes
domain and replay rows (`MixLoader`, a fixed fraction of the original corpus so the model keeps
what it knew) through the shared engine with the pretraining objective, then anneals the learning
rate on the domain alone. The summary reports held-out loss on both the domain and the original
text before and after, so forgetting is visible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator

from ..data.builtin import split_train_val
from ..data.readers import iter_documents
from ..data.shards import TokenLoader, load_shard, write_token_shards
from ..errors import ConfigError, DataError
from ..eval.perplexity import evaluate_shard, token_byte_lengths
from ..model.hf import load_pretrained, read_hf_config, save_pretrained
from ..runs import file_sha256
from ..tokenizer import LMTokenizer
from ..train.config import TrainConfig
from ..train.engine import Trainer
from ..train.objectives.pretrain import pretrain_objective
from .base import StageContext, define_stage


# =============================================================================================
class CPTConfig(TrainConfig):
    model: str | None = Field(None, description="model folder; default: this run's pretrain/model")
    domain: list[str] = Field(
        default_factory=list,
        description="new-domain text: files/folders/globs (.txt/.jsonl/...); empty = skip stage",
    )
    domain_val_fraction: float = Field(0.05, gt=0, lt=1)
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the model; auto = on CUDA (fixed-shape rows: one compilation)"
    )
    replay: str | None = Field(
        None,
        description="folder with the original corpus' token shards (train/val.bin); "
        "default: this run's tokenizer stage",
    )
    replay_fraction: float = Field(
        0.25, ge=0, lt=1, description="share of every batch drawn from the original corpus"
    )
    seq_len: int = Field(256, ge=8)
    eval_tokens: int = Field(32768, ge=0, description="tokens scored per domain at each eval (0 = all)")
    anneal_steps: int = Field(0, ge=0, description="extra steps with the LR decaying linearly to zero")
    anneal_data: list[str] | None = Field(
        None, description="curated high-quality text for annealing; default: domain"
    )
    anneal_replay_fraction: float = Field(0.5, ge=0, lt=1)
    max_steps: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "constant"
    eval_every: int = Field(50, ge=0)

    @field_validator("domain", "anneal_data", mode="before")
    @classmethod
    def _listify(cls, v):
        return [v] if isinstance(v, str) else v


class MixLoader:
    """Every batch = rows from each loader (new domain, replay), concatenated; resumable."""

    def __init__(self, loaders: list):
        self.loaders = loaders

    def __iter__(self):
        return self

    def __next__(self):
        xs, ys = zip(*(next(ld) for ld in self.loaders))
        return torch.cat(xs), torch.cat(ys)

    def state_dict(self) -> dict:
        return {"loaders": [ld.state_dict() for ld in self.loaders]}

    def load_state_dict(self, state: dict) -> None:
        for ld, s in zip(self.loaders, state["loaders"]):
            ld.load_state_dict(s)


def _tokenize_texts(spec: list[str], tok, out: Path, name: str, val_fraction: float | None, seed: int):

    texts = [d.text for d in iter_documents(spec) if d.text.strip()]
    if not texts:
        raise DataError(f"cpt: {spec} holds no text")
    if val_fraction is None:
        write_token_shards(texts, tok, out, name)
        return load_shard(out, name), None
    train, val = split_train_val(texts, val_fraction, seed)
    write_token_shards(train, tok, out, f"{name}_train")
    write_token_shards(val or train[:1], tok, out, f"{name}_val")
    return load_shard(out, f"{name}_train"), load_shard(out, f"{name}_val")


def _mix(cfg: CPTConfig, main, replay, fraction: float, seed: int) -> MixLoader:

    n_replay = round(cfg.batch_size * fraction) if replay is not None else 0
    if fraction > 0 and replay is not None and n_replay == 0:
        n_replay = 1
    n_main = cfg.batch_size - n_replay
    if n_main < 1:
        raise ConfigError(
            f"cpt.batch_size={cfg.batch_size} leaves no rows for the new domain at replay fraction {fraction}"
        )
    loaders = [TokenLoader(main, cfg.seq_len, n_main, seed=seed)]
    if n_replay:
        loaders.append(TokenLoader(replay, cfg.seq_len, n_replay, seed=seed + 1))
    return MixLoader(loaders)


@define_stage(
    "cpt",
    CPTConfig,
    needs=("tokenizer", "pretrain"),
    help="continued pretraining on a new domain (replay, annealing); skipped without cpt.domain",
    flags=(
        ("--model", "model", "model folder to continue"),
        ("--domain", "domain", "new-domain text file or folder"),
    ),
)
def cpt_stage(ctx: StageContext) -> dict:
    cfg: CPTConfig = ctx.cfg
    if not cfg.domain:
        ctx.log("no cpt.domain configured; nothing to do (set cpt.domain=PATH to continue pretraining)")
        return {"skipped": True}
    model_dir = Path(cfg.model) if cfg.model else ctx.input_dir("pretrain") / "model"
    tok = LMTokenizer.load(model_dir)
    device = ctx.device
    data_dir = ctx.dir / "data"
    dom_train, dom_val = _tokenize_texts(
        cfg.domain, tok, data_dir, "domain", cfg.domain_val_fraction, ctx.seed
    )

    orig_train, orig_val = _replay_shards(ctx, cfg, model_dir)

    ctx.estimate_time(
        model_dir,
        steps=cfg.max_steps + cfg.anneal_steps,
        tokens_per_step=cfg.batch_size * cfg.grad_accum * cfg.seq_len,
        seq_len=cfg.seq_len,
        keys="cpt.max_steps + anneal_steps, cpt.batch_size x grad_accum x seq_len, the model's size",
    )
    model = load_pretrained(model_dir, device=device).train()
    token_bytes = token_byte_lengths(tok)

    def evaluate(m):
        kw = dict(
            seq_len=cfg.seq_len, batch_size=cfg.batch_size, device=device, max_tokens=cfg.eval_tokens or None
        )
        out = {"loss": evaluate_shard(m, dom_val, token_bytes, **kw)["loss"]}
        if orig_val is not None:
            out["orig_loss"] = evaluate_shard(m, orig_val, token_bytes, **kw)["loss"]
        return out

    before = evaluate(model)
    ctx.log(
        f"before: new-domain loss {before['loss']:.4f}"
        + (f", original-corpus loss {before['orig_loss']:.4f}" if "orig_loss" in before else "")
    )
    loader = _mix(cfg, dom_train, orig_train, cfg.replay_fraction, ctx.seed)
    result = Trainer(
        model,
        pretrain_objective(),
        loader,
        cfg,
        ctx.dir,
        device=device,
        dtype=ctx.dtype,
        evaluate=evaluate,
        log=ctx.log,
    ).fit(resume=True)
    after = {"loss": result.final.get("eval_loss"), "orig_loss": result.final.get("eval_orig_loss")}
    metrics = {
        "domain_loss_before": before["loss"],
        "orig_loss_before": before.get("orig_loss"),
        "domain_loss_after": after["loss"],
        "orig_loss_after": after["orig_loss"],
        "replay_fraction": cfg.replay_fraction,
        "steps": result.step,
        **result.speed_metrics(),
        "domain_train_tokens": dom_train.n_tokens,
    }
    if cfg.anneal_steps:
        src = dom_train
        if cfg.anneal_data:
            src, _ = _tokenize_texts(cfg.anneal_data, tok, data_dir, "anneal", None, ctx.seed)
        metrics.update(_anneal(ctx, cfg, model, src, orig_train, evaluate))
    hf = read_hf_config(model_dir)
    save_pretrained(
        model,
        ctx.dir / "model",
        tokenizer_dir=model_dir,
        bos_id=hf.get("bos_token_id"),
        eos_id=hf.get("eos_token_id"),
    )
    ctx.log(
        "new-domain loss {:.4f} -> {}; original-corpus loss {} -> {}".format(
            before["loss"],
            _f(metrics.get("domain_loss_after_anneal") or after["loss"]),
            _f(before.get("orig_loss")),
            _f(metrics.get("orig_loss_after_anneal") or after["orig_loss"]),
        )
    )
    return metrics


def _replay_shards(ctx: StageContext, cfg: CPTConfig, model_dir: Path):
    """The original corpus' train/val shards to replay and score (None, None without them); they
    must come from the model's own tokenizer."""
    replay_dir = Path(cfg.replay) if cfg.replay else None
    if replay_dir is None:
        try:
            replay_dir = ctx.input_dir("tokenizer")
        except Exception:
            replay_dir = None
    if replay_dir is not None and (replay_dir / "train.json").exists():
        a, b = replay_dir / "tokenizer.json", model_dir / "tokenizer.json"
        if a.exists() and b.exists() and file_sha256(a) != file_sha256(b):
            raise ConfigError(
                f"cpt.replay: {replay_dir} was tokenized with a different tokenizer than "
                f"{model_dir}; point cpt.replay at shards made with the model's tokenizer or set "
                f"cpt.replay_fraction=0"
            )
        return load_shard(replay_dir, "train"), load_shard(replay_dir, "val")
    if cfg.replay_fraction > 0:
        raise ConfigError(
            "cpt.replay_fraction > 0 needs the original corpus' token shards: run the tokenizer "
            "stage or set cpt.replay=FOLDER (or cpt.replay_fraction=0)"
        )
    return None, None


def _anneal(ctx: StageContext, cfg: CPTConfig, model, src, orig_train, evaluate) -> dict:
    """The annealing phase: the learning rate decays to 0 over `anneal_steps` on `src` (plus its
    replay share), in its own checkpoint folder so a resume finds it."""
    acfg = cfg.model_copy(
        update={
            "max_steps": cfg.anneal_steps,
            "schedule": "wsd",
            "decay_fraction": 1.0,
            "min_lr_ratio": 0.0,
            "warmup_steps": 0,
        }
    )
    aloader = _mix(acfg, src, orig_train, cfg.anneal_replay_fraction, ctx.seed + 7)
    ares = Trainer(
        model,
        pretrain_objective(),
        aloader,
        acfg,
        ctx.dir / "anneal",
        device=ctx.device,
        dtype=ctx.dtype,
        evaluate=evaluate,
        log=ctx.log,
    ).fit(resume=True)
    return {
        "domain_loss_after_anneal": ares.final.get("eval_loss"),
        "orig_loss_after_anneal": ares.final.get("eval_orig_loss"),
        "anneal_steps": ares.step,
    }


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"
