"""`lmforge eval`: how good is the trained model, in numbers that mean something.

1. **Perplexity family** on the validation split: loss, perplexity and bits-per-byte over the
   token stream next to a unigram baseline on the same targets (as the pretraining evals), and
   document-level rolling perplexity with word perplexity and bits-per-byte on the first
   ``doc_tokens`` validation tokens (each document scored alone, every token predicted once).
2. **Tasks** (``eval.tasks``): multiple-choice tasks scored by log-likelihood (acc, acc_norm,
   acc_bytes with 95% intervals and the chance level) and generative tasks (exact match, pass@k).
   The default is ``builtin``: a sentence-ending cloze built offline from the validation text, so
   the default pipeline measures a downstream task in seconds with nothing downloaded. Name
   others as ``mmlu:PATH``, ``arc:PATH``, ``hellaswag:PATH``, ``gsm8k:PATH`` or a task spec
   file (see `lmforge.eval.readers`).

Writes ``eval/results.json`` (top-level keys loss/ppl/bpb/unigram_bpb/tokens as before, plus
``documents`` and ``tasks``) and ``eval/predictions/<key>.jsonl`` (per-item scores), which the
report stage turns into tables.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..align.reward_scoring import RewardScorer
from ..align.tasks import load_prompt_sets
from ..chat import ChatFormat, encode_records
from ..data.builtin import split_by_key
from ..data.shards import load_shard
from ..eval.chain import chat_answers, score_chain
from ..eval.evaluate import evaluate_task, headline, predictions_jsonl, unique_keys
from ..eval.loglik import Scorer
from ..eval.perplexity import (
    document_metrics,
    evaluate_shard,
    shard_documents,
    token_byte_lengths,
    unigram_bpb,
)
from ..eval.readers import load_task
from ..eval.report import hardware
from ..model.hf import load_pretrained, read_hf_config
from ..runs import POLICY_STAGES, atomic_write_json, atomic_write_text, read_manifest, run_relative
from ..serve.loading import check_pair
from ..sft.rows import assistant_loss
from ..tokenizer import LMTokenizer
from .base import StageContext, define_stage
from .sft import load_records


class GenerationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_samples: int = Field(1, ge=1, description="samples per problem (pass@k needs n_samples >= k)")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    pass_k: list[int] = Field(
        default_factory=lambda: [1], description="k values for pass@k (when n_samples > 1)"
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="default: the task's, capped at half the context"
    )
    batch_size: int = Field(16, ge=1)


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="model folder; default: the run's latest trained model")
    max_tokens: int | None = Field(
        None, ge=1, description="score at most this many val tokens (default: all)"
    )
    batch_size: int = Field(16, ge=1)
    seq_len: int | None = Field(None, ge=8, description="default: the model's context length")
    doc_tokens: int = Field(
        20000,
        ge=0,
        description="document-level rolling perplexity (word ppl) on up to this many val tokens; 0 = off",
    )
    context_len: int = Field(
        1,
        ge=1,
        description="rolling windows: min context of each window after the first "
        "(1 = lm-evaluation-harness; larger = sliding window)",
    )
    tasks: list[str] = Field(
        default_factory=lambda: ["builtin"],
        description="builtin, mmlu:PATH, mmlu_cloze:PATH, arc:PATH, hellaswag:PATH, "
        "gsm8k:PATH, task.yaml, items.jsonl",
    )
    num_fewshot: int | None = Field(None, ge=0, description="override every task's few-shot count")
    limit: int | None = Field(None, ge=1, description="evaluate at most this many items per task")
    task_seed: int = Field(1234, description="seed of few-shot sampling and of the builtin task")
    builtin_items: int = Field(200, ge=4, description="items in the builtin cloze task")
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="malformed task items: error, or skip and count"
    )
    batch_tokens: int = Field(8192, ge=64, description="token budget of one scoring batch")
    add_bos: bool = Field(
        True, description="prepend BOS to every context (lmforge models are trained with it)"
    )
    chain_chat_examples: int = Field(
        64, ge=0, description="model chain: SFT held-out conversations scored (assistant loss); 0 = off"
    )
    chain_prompts: int = Field(
        16,
        ge=0,
        description="model chain: held-out chat prompts (the rl stage's) every model answers greedily, "
        "scored by the run's reward model when it has one; 0 = off",
    )
    chain_answer_tokens: int = Field(32, ge=1, description="model chain: longest answer, in tokens")
    chain_tokens: int = Field(
        10000,
        ge=0,
        description="score every model of the run (pretrain, cpt, sft, align, rl) on the first N val "
        "tokens, with per-stage bits/byte deltas; 0 = off",
    )
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    save_predictions: bool = True


@define_stage(
    "eval",
    EvalConfig,
    needs=("tokenizer", "reward"),  # reward: the model chain's RM scores (optional; a new RM re-runs eval)
    uses_model=True,
    help="perplexity, bits-per-byte and benchmark tasks",
    flags=(
        ("--model", "model", "model folder to evaluate"),
        (
            "--task",
            "tasks",
            "task to run (repeatable): builtin, mmlu:PATH, arc:PATH, hellaswag:PATH, gsm8k:PATH, spec.yaml",
        ),
    ),
)
def eval_stage(ctx: StageContext) -> dict:
    cfg: EvalConfig = ctx.cfg
    model_dir = Path(cfg.model) if cfg.model else ctx.model_before()
    tok_dir = ctx.input_dir("tokenizer")
    model = load_pretrained(model_dir, device=ctx.device)
    tok = LMTokenizer.load(model_dir if (model_dir / "tokenizer.json").exists() else tok_dir)
    check_pair(model.cfg, tok, read_hf_config(model_dir), where=str(model_dir))
    seq_len = cfg.seq_len or model.cfg.max_seq_len
    val, train = load_shard(tok_dir, "val"), load_shard(tok_dir, "train")
    if val.meta.get("vocab_size", 0) > model.cfg.vocab_size:
        from ..errors import CheckpointError

        raise CheckpointError(
            f"{tok_dir}: the token shards use a {val.meta['vocab_size']:,}-token vocabulary but "
            f"{model_dir} has {model.cfg.vocab_size:,} rows; evaluate a model trained on them"
        )

    # 1. perplexity over the token stream (as during pretraining) + unigram baseline
    t0 = time.time()
    tb = token_byte_lengths(tok)
    res: dict[str, Any] = evaluate_shard(
        model,
        val,
        tb,
        seq_len=seq_len,
        batch_size=cfg.batch_size,
        device=ctx.device,
        max_tokens=cfg.max_tokens,
    )
    res["unigram_bpb"] = unigram_bpb(train.tokens, val, tb, seq_len=seq_len, max_tokens=cfg.max_tokens)
    res["model"] = run_relative(model_dir, ctx.run_dir)  # no absolute path in an artifact
    res["hardware"] = hardware()
    ctx.log(
        f"val loss {res['loss']:.4f}  ppl {res['ppl']:.2f}  bpb {res['bpb']:.4f}  "
        f"(unigram baseline {res['unigram_bpb']:.4f} bpb) on {res['tokens']:,} tokens [{time.time() - t0:.1f}s]"
    )
    metrics = {k: v for k, v in res.items() if k not in ("model", "hardware")}
    if cfg.chain_tokens:
        res["chain"] = _chain(ctx, cfg, val, tb, seq_len, metrics, res)

    scorer = Scorer(model, tok, max_len=seq_len, batch_tokens=cfg.batch_tokens, add_bos=cfg.add_bos)
    # 2. whole documents, rolling windows: word perplexity and bpb that compare across tokenizers
    val_texts: list[str] | None = None
    if cfg.doc_tokens:
        t0 = time.time()
        val_texts = shard_documents(val, tok, max_tokens=cfg.doc_tokens)
        doc = document_metrics(scorer, val_texts, context_len=min(cfg.context_len, seq_len))
        res["documents"] = doc
        metrics.update({"word_ppl": doc["word_ppl"], "doc_bpb": doc["bpb"]})
        ctx.log(
            f"documents: {doc['docs']} docs, {doc['tokens']:,} tokens: ppl {doc['ppl']:.2f}  word ppl "
            f"{doc['word_ppl']:.2f}  bpb {doc['bpb']:.4f} [{time.time() - t0:.1f}s]"
        )

    # 3. tasks
    res["tasks"] = {}
    g = cfg.generation
    tasks = []
    for spec in cfg.tasks:
        builtin = None
        if spec.strip() in ("builtin", "builtin_cloze"):
            builtin = shard_documents(val, tok, max_docs=10**9)
        tasks.append(
            load_task(
                spec,
                on_error=cfg.on_error,
                builtin_texts=builtin,
                builtin_n=cfg.builtin_items,
                seed=cfg.task_seed,
            )
        )
    for key, task in zip(unique_keys(tasks), tasks):  # two tasks of one name do not overwrite
        max_new = min(g.max_new_tokens or task.max_new_tokens, seq_len // 2)
        out = evaluate_task(
            model,
            tok,
            task,
            scorer=scorer,
            limit=cfg.limit,
            num_fewshot=cfg.num_fewshot,
            keep_predictions=cfg.save_predictions,
            n_samples=g.n_samples,
            temperature=g.temperature,
            top_p=g.top_p,
            ks=g.pass_k,
            seed=ctx.seed,
            batch_size=g.batch_size,
            max_new_tokens=max_new,
        )
        preds = out.pop("predictions", None)
        if preds is not None:
            atomic_write_text(ctx.dir / "predictions" / f"{key}.jsonl", predictions_jsonl(preds))
        res["tasks"][key] = out
        flat = headline(out)
        metrics.update({f"{key}/{k}": v for k, v in flat.items()})
        ctx.log(_task_line(out))
    atomic_write_json(ctx.dir / "results.json", res)
    return metrics


def run_models(run_dir: Path) -> list[tuple[str, Path]]:
    """(stage, model folder) of every completed model-producing stage of the run, in lifecycle order."""
    out = []
    for name in POLICY_STAGES:
        m = read_manifest(run_dir / name)
        if m and m.get("status") == "complete" and (run_dir / name / "model" / "config.json").is_file():
            out.append((name, run_dir / name / "model"))
    return out


def _sft_heldout_loss(ctx: StageContext, cfg: EvalConfig, seq_len: int):
    """A function model -> {"assistant_loss"} over the SFT stage's held-out conversations (the
    split re-derived from the run's sft config and seed, as the sft stage draws it), or None when
    the run has no SFT model or no such conversations. Only where that is cheap: JSONL files are
    read in a moment, but rebuilding the built-in SFT set takes half a minute on a loaded 2-core
    machine, a tenth of the default pipeline's budget, so a `builtin` source is skipped (logged)."""
    sft_cfg, sft_dir = getattr(ctx.pipeline, "sft", None), ctx.run_dir / "sft" / "model"
    if sft_cfg is None or not cfg.chain_chat_examples or not (sft_dir / "config.json").is_file():
        return None
    if "builtin" in (sft_cfg.val_data or sft_cfg.data):
        ctx.log(
            "model chain: chat assistant loss skipped (the SFT held-out set is the built-in one; set sft.val_data)"
        )
        return None
    records = load_records(sft_cfg.data, sft_cfg.max_examples)
    if sft_cfg.val_data:
        val_recs = load_records(sft_cfg.val_data)
    else:
        keys = [json.dumps(r, sort_keys=True, default=str) for _, r in records]
        val_recs = split_by_key(records, keys, sft_cfg.val_fraction, ctx.seed)[1]
    fmt = ChatFormat.from_dir(sft_dir)
    n = min(cfg.chain_chat_examples, sft_cfg.max_val_examples)
    examples, _ = encode_records(val_recs[:n], fmt, seq_len, on_error="skip")
    if not examples:
        return None
    pad = fmt.tok.pad_id if fmt.tok.pad_id is not None else (fmt.tok.eos_id or 0)
    return lambda model: {
        "assistant_loss": assistant_loss(model, examples, pad, ctx.device),
        "chat_examples": len(examples),
    }


def _chat_prompts(ctx: StageContext, cfg: EvalConfig, models: list[tuple[str, Path]]):
    """A function model -> `chat_answers` on the rl stage's held-out prompts (its data/val_data
    split with the run's seed: the prompts RL was evaluated on) when the run has a completed rl
    stage, else on the built-in questions' held-out split; scored by the run's reward model
    when it has one (its folder verified like any stage input); and the shown prompts' texts.
    (None, []) when off."""
    if not cfg.chain_prompts or not models:
        return None, []
    rl_cfg = getattr(ctx.pipeline, "rl", None)
    rl_done = (read_manifest(ctx.run_dir / "rl") or {}).get("status") == "complete"
    if rl_cfg is not None and rl_done:
        sets = load_prompt_sets(list(rl_cfg.data), rl_cfg.val_data, rl_cfg.val_fraction, ctx.seed)
    else:
        sets = load_prompt_sets(["questions"], None, 0.1, ctx.seed)
    items = sets[1][: cfg.chain_prompts]
    prompts = [[{"role": r, "content": c} for r, c in it.messages] for it in items]
    fmt = ChatFormat.from_dir(models[-1][1])  # one tokenizer for the whole run: the same prompt ids
    scorer = None
    if (read_manifest(ctx.run_dir / "reward") or {}).get("status") == "complete":
        scorer = RewardScorer.from_dir(ctx.input_dir("reward") / "model", device=str(ctx.device))
    shown = [it.messages[-1][1] for it in items[:3]]
    return (
        lambda model: chat_answers(
            model, fmt, prompts, max_tokens=cfg.chain_answer_tokens, scorer=scorer, keep=len(shown)
        ),
        shown,
    )


def _chain(ctx: StageContext, cfg: EvalConfig, val, tb, seq_len: int, metrics: dict, res: dict) -> list[dict]:
    """Score every model of the run (`score_chain`); adds `chain/<stage>_bpb` (and
    `_assistant_loss`, `_rm_score`) to `metrics`, the prompts of the kept answers to `res`
    (`chain_prompts`), and logs one line."""
    t0 = time.time()
    models = run_models(ctx.run_dir)
    loss_fn = _sft_heldout_loss(ctx, cfg, seq_len)
    answers_fn, res["chain_prompts"] = _chat_prompts(ctx, cfg, models)
    fns = [f for f in (loss_fn, answers_fn) if f is not None]
    rows = score_chain(
        models,
        val,
        tb,
        vocab_size=int(val.meta.get("vocab_size", 0)),
        seq_len=seq_len,
        batch_size=cfg.batch_size,
        device=ctx.device,
        max_tokens=cfg.chain_tokens,
        extra=(lambda m: {k: v for f in fns for k, v in f(m).items()}) if fns else None,
    )
    if rows:
        for r in rows:
            r["model"] = run_relative(r["model"], ctx.run_dir)
            metrics.update(
                {
                    f"chain/{r['stage']}_{k}": r[k]
                    for k in ("bpb", "assistant_loss", "rm_score")
                    if r.get(k) is not None
                }
            )
        if answers_fn is not None and not any(r.get("chat_prompts") for r in rows):
            ctx.log(
                f"model chain: no held-out chat prompt fits the models' context with "
                f"{cfg.chain_answer_tokens} answer tokens; no answers or reward-model scores"
            )
        parts = [_chain_part(r) for r in rows]
        ctx.log(
            f"model chain, bits/byte on the same {cfg.chain_tokens:,} val tokens (change per stage): "
            + ", ".join(parts)
            + f" [{time.time() - t0:.1f}s]"
        )
    return rows


def _chain_part(r: dict) -> str:
    if r.get("bpb") is None:
        return f"{r['stage']} skipped ({r.get('skipped')})"
    out = f"{r['stage']} {r['bpb']:.4f}" + (
        f" ({r['delta_bpb']:+.4f})" if r.get("delta_bpb") is not None else ""
    )
    if r.get("assistant_loss") is not None:
        out += f" / chat loss {r['assistant_loss']:.4f}"
    if r.get("rm_score") is not None:
        out += f" / RM score {r['rm_score']:+.3f}"
    return out


def _task_line(out: dict) -> str:
    parts = [f"{out['task']}: n={out['n']}"]
    for k in ("acc", "acc_norm", "exact_match", "pass@1"):
        if k in out:
            lo, hi = out[k]["ci95"]
            parts.append(f"{k} {out[k]['value']:.3f} [{lo:.3f}, {hi:.3f}]")
    if "chance" in out:
        parts.append(f"chance {out['chance']:.3f}")
    skipped = sum(out.get("skipped", {}).values())
    if skipped or out.get("truncated"):
        parts.append(f"skipped {skipped} {out.get('skipped') or ''} truncated {out.get('truncated', 0)}")
    parts.append(f"[{out['seconds']:.1f}s]")
    return "  ".join(parts)
