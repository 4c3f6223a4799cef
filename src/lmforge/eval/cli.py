"""Evaluation commands outside the pipeline: `lmforge tasks | perplexity | contamination | judge |
harness`. The main CLI calls `add_parser(subparsers)`; each handler returns an exit status and
raises `LMForgeError` for anything the user can fix. `--out FILE` writes the full JSON result.

    lmforge tasks --model DIR --task arc:ARC.jsonl --task mmlu:mmlu [--num-fewshot 5] [--limit 100]
        [--out res.json] [--predictions DIR]   (tasks sharing a name get keys arc-A, arc-B, ...)
    lmforge perplexity --model DIR docs.jsonl [--context-len 128]
    lmforge contamination ngram --train runs/tiny/tokenizer --task arc:ARC.jsonl [-n 13]
    lmforge contamination permutation --model DIR --task arc:ARC.jsonl [--shard-size 5]
    lmforge judge compare --prompts prompts.jsonl --a DIR_A --b DIR_B --judge-model DIR
    lmforge judge export --prompts prompts.jsonl --a answers_a.jsonl --b DIR_B --out sheet.html
    lmforge judge import verdicts.csv --key sheet.html.key.json
    lmforge harness --model DIR --tasks hellaswag,arc_easy [--include-path my_tasks/]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import DataError
from ..runs import atomic_write_json, atomic_write_text

EPILOG = "Details and formulas: docs/evaluation.md."


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _save(a, obj) -> None:
    if getattr(a, "out", None):
        atomic_write_json(a.out, obj)
        print(f"wrote {a.out}")


def _load(a):
    from ..serve.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(a.model, getattr(a, "tokenizer", None), device=a.device)


def _fmt_ci(block: dict) -> str:
    lo, hi = block["ci95"]
    return f"{block['value']:.3f} [{lo:.3f}, {hi:.3f}]"


# ----------------------------------------------------------------------------- tasks / perplexity
def cmd_tasks(a) -> int:
    from .evaluate import evaluate_task, predictions_jsonl, unique_keys
    from .loglik import Scorer
    from .readers import load_task

    model, tok = _load(a)
    scorer = Scorer(model, tok, batch_tokens=a.batch_tokens, add_bos=not a.no_bos)
    tasks = [load_task(spec, on_error=a.on_error, seed=a.seed) for spec in a.task]
    pred_dir = a.predictions or (str(Path(a.out).with_suffix("")) + ".predictions" if a.out else None)
    results = {}
    for key, task in zip(unique_keys(tasks), tasks):
        res = evaluate_task(
            model,
            tok,
            task,
            scorer=scorer,
            limit=a.limit,
            num_fewshot=a.num_fewshot,
            keep_predictions=pred_dir is not None,
            n_samples=a.n_samples,
            temperature=a.temperature,
            ks=a.pass_k or [1],
            seed=a.seed,
            max_new_tokens=min(a.max_new_tokens or task.max_new_tokens, model.cfg.max_seq_len // 2),
        )
        preds = res.pop("predictions", None)
        if preds is not None:
            assert pred_dir is not None  # predictions are only kept when there is a folder for them
            atomic_write_text(Path(pred_dir) / f"{key}.jsonl", predictions_jsonl(preds))
        results[key] = res
        parts = [f"{key:<14} n={res['n']:<5}"]
        for k in ("acc", "acc_norm", "exact_match", *[f"pass@{k}" for k in (a.pass_k or [])]):
            if k in res:
                parts.append(f"{k} {_fmt_ci(res[k])}")
        if "chance" in res:
            parts.append(f"chance {res['chance']:.3f}")
        if sum(res["skipped"].values()) or res.get("truncated"):
            parts.append(f"skipped {res['skipped']} truncated {res['truncated']}")
        print("  ".join(parts))
    if pred_dir is not None:
        print(f"per-item predictions in {pred_dir}/")
    _save(a, results)
    return 0


def cmd_perplexity(a) -> int:
    from ..data.readers import iter_documents
    from .loglik import Scorer
    from .perplexity import document_metrics

    model, tok = _load(a)
    texts = [d.text for d in iter_documents(a.files, text_field=a.text_field)]
    if a.max_docs:
        texts = texts[: a.max_docs]
    if not texts:
        raise DataError(f"{a.files}: no documents")
    res = document_metrics(
        Scorer(model, tok, batch_tokens=a.batch_tokens),
        texts,
        context_len=min(a.context_len, model.cfg.max_seq_len),
    )
    print(
        f"{res['docs']} docs, {res['tokens']:,} tokens, {res['words']:,} words: loss {res['loss']:.4f}  "
        f"ppl {res['ppl']:.3f}  word ppl {res['word_ppl']:.3f}  bits/byte {res['bpb']:.4f}"
    )
    _save(a, res)
    return 0


# ----------------------------------------------------------------------------- contamination
def cmd_ngram(a) -> int:
    from .contamination import iter_corpus, ngram_overlap, task_texts
    from .readers import load_task

    task = load_task(a.task, on_error="skip")
    res = ngram_overlap(
        iter_corpus(a.train),
        task_texts(task),
        n=a.n,
        min_words=a.min_words,
        threshold=a.threshold,
        ids=[d.id for d in task.docs],
    )
    print(
        f"{task.name}: {res['contaminated']:,} of {res['judged']:,} items share a {a.n}-gram with the "
        f"{res['train_docs']:,} training documents ({100 * res['contaminated_fraction']:.2f}%); mean overlap "
        f"{res['mean_overlap']:.4f}; {res['too_short']} items too short to judge"
    )
    for ex in res["examples"][:5]:
        print(
            f"  {ex['item']}: {100 * ex['overlap']:.0f}% of n-grams seen, e.g. training doc "
            f"{ex['first_train_doc']}: {ex['text'][:80]!r}"
        )
    _save(a, res)
    return 0


def cmd_permutation(a) -> int:
    from .contamination import permutation_test, task_texts
    from .loglik import Scorer
    from .readers import load_task

    model, tok = _load(a)
    task = load_task(a.task, on_error="skip")
    ex = task_texts(task)[: a.limit] if a.limit else task_texts(task)
    res = permutation_test(
        Scorer(model, tok, batch_tokens=a.batch_tokens),
        ex,
        shard_size=a.shard_size,
        n_permutations=a.permutations,
        seed=a.seed,
    )
    verdict = "evidence of contamination" if res["p_value"] < a.alpha else "no evidence of contamination"
    print(
        f"{task.name}: p = {res['p_value']:.3g} ({verdict} at alpha {a.alpha}); {res['shards']} shards of "
        f"{res['shard_size']}, {res['n_permutations']} permutations each; canonical order beats "
        f"{100 * res['canonical_rank_mean']:.0f}% of shuffles on average"
    )
    _save(a, res)
    return 0


# ----------------------------------------------------------------------------- judging
def _read_prompts(path: str) -> list[str]:
    p = Path(path)
    if p.suffix.lower() == ".txt":
        return [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n}: invalid JSON ({e.msg})") from None
        text = rec.get("prompt") if isinstance(rec, dict) else None
        if text is None and isinstance(rec, dict) and rec.get("messages"):
            text = next((m.get("content") for m in rec["messages"] if m.get("role") == "user"), None)
        if not isinstance(text, str):
            raise DataError(f"{p}:{n}: no 'prompt' field (nor a user message)")
        out.append(text)
    if not out:
        raise DataError(f"{p}: no prompts")
    return out


def _answers(src: str, prompts: list[str], a) -> list[str]:
    """A model folder (answers generated greedily) or a JSONL/TXT of answers, one per prompt."""
    p = Path(src)
    if p.is_dir():
        from ..serve.loading import load_model_and_tokenizer
        from .judge import generate_answers

        model, tok = load_model_and_tokenizer(p, device=a.device)
        return generate_answers(model, tok, prompts, max_new_tokens=a.max_new_tokens)
    if p.suffix.lower() == ".txt":
        ans = [line for line in p.read_text(encoding="utf-8").splitlines()]
    else:
        ans = []
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            val = next((rec[k] for k in ("answer", "completion", "response", "output") if k in rec), None)
            if not isinstance(val, str):
                raise DataError(f"{p}:{n}: no answer/completion/response field")
            ans.append(val)
    if len(ans) != len(prompts):
        raise DataError(f"{p}: {len(ans)} answers for {len(prompts)} prompts; need one per prompt, in order")
    return ans


def cmd_judge_compare(a) -> int:
    from ..serve.loading import load_model_and_tokenizer
    from .judge import Judge, LMJudge, RewardModelJudge, compare

    prompts = _read_prompts(a.prompts)
    ans_a, ans_b = _answers(a.a, prompts, a), _answers(a.b, prompts, a)
    if bool(a.judge_model) == bool(a.reward_model):
        raise DataError(
            "pass exactly one of --judge-model DIR (an LM asked which answer is better) or "
            "--reward-model DIR (a sequence-classification reward model)"
        )
    judge: Judge
    if a.reward_model:
        judge = RewardModelJudge.from_pretrained(a.reward_model, device=a.device)
    else:
        model, tok = load_model_and_tokenizer(a.judge_model, device=a.device)
        judge = LMJudge(model, tok)
    res = compare(
        prompts,
        ans_a,
        ans_b,
        judge,
        swap=not a.no_swap,
        tie_margin=a.tie_margin,
        names=(Path(a.a).name, Path(a.b).name),
    )
    if isinstance(judge, RewardModelJudge):  # exactly when --reward-model was given
        res["reward_scoring"] = judge.mode
    print(
        f"{res['model_a']} vs {res['model_b']}: win rate {res['win_rate']:.3f} "
        f"[{res['ci95'][0]:.3f}, {res['ci95'][1]:.3f}] over {res['n']} prompts "
        f"({res['wins']} wins, {res['ties']} ties, {res['losses']} losses)"
        + (
            f"; judge's first-position bias {res['first_position_bias']:+.3f}"
            if "first_position_bias" in res
            else ""
        )
    )
    _save(a, res)
    return 0


def cmd_judge_export(a) -> int:
    from .judge import export_sheet

    prompts = _read_prompts(a.prompts)
    res = export_sheet(
        prompts,
        _answers(a.a, prompts, a),
        _answers(a.b, prompts, a),
        a.out,
        names=(Path(a.a).name, Path(a.b).name),
        seed=a.seed,
    )
    print(f"wrote {res['sheet']} ({res['items']} items) and the key {res['key']} (keep it from the raters)")
    return 0


def cmd_judge_import(a) -> int:
    from .judge import import_verdicts

    res = import_verdicts(a.sheet, a.key)
    print(
        f"{res['model_a']} vs {res['model_b']}: win rate {res['win_rate']:.3f} [{res['ci95'][0]:.3f}, "
        f"{res['ci95'][1]:.3f}] from {res['n']} verdicts ({res['wins']} wins, {res['ties']} ties, "
        f"{res['losses']} losses; {res['unrated']} unrated)"
    )
    if a.json:
        _print(res)
    return 0


# ----------------------------------------------------------------------------- harness
def cmd_harness(a) -> int:
    try:
        from .harness import run_harness
    except ImportError as e:  # pragma: no cover
        raise DataError("lmforge harness needs lm-eval: pip install lm-eval") from e
    res = run_harness(
        a.model,
        [t.strip() for t in a.tasks.split(",") if t.strip()],
        tokenizer=a.tokenizer,
        include_path=a.include_path,
        num_fewshot=a.num_fewshot,
        limit=a.limit,
        batch_tokens=a.batch_tokens,
        device=a.device,
        seed=a.seed,
        add_bos=not a.no_bos,
    )
    if res is None:
        return 1
    for task, metrics in res["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{task}: {shown}")
    if a.out:
        atomic_write_json(a.out, {"results": res["results"], "config": res.get("config")})
        print(f"wrote {a.out}")
    return 0


# ----------------------------------------------------------------------------- wiring
def _model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="model folder (lmforge or HF Llama-family)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model folder's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps (default: cpu)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="token budget per scoring batch")


def _add_tasks(subparsers: argparse._SubParsersAction) -> None:
    """`lmforge tasks`: benchmark tasks on a model folder."""
    t = subparsers.add_parser(
        "tasks",
        help="benchmark tasks on a model folder (MMLU, ARC, HellaSwag, GSM8K, specs)",
        description="Evaluate a model folder on tasks: multiple choice by log-likelihood "
        "(acc, acc_norm, acc_bytes) or generative (exact match, pass@k).",
        epilog=EPILOG,
    )
    _model_args(t)
    t.add_argument(
        "--task",
        action="append",
        required=True,
        help="mmlu:PATH, mmlu_cloze:PATH, arc:PATH, hellaswag:PATH, gsm8k:PATH, spec.yaml, items.jsonl "
        "(repeatable)",
    )
    t.add_argument("--num-fewshot", type=int, help="override the tasks' few-shot count")
    t.add_argument("--limit", type=int, help="at most this many items per task")
    t.add_argument("--seed", type=int, default=1234, help="few-shot / sampling seed")
    t.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="malformed items")
    t.add_argument("--n-samples", type=int, default=1, help="generative: samples per problem")
    t.add_argument("--temperature", type=float, default=0.0, help="generative: 0 = greedy")
    t.add_argument("--pass-k", type=int, action="append", help="generative: report pass@k (repeatable)")
    t.add_argument("--max-new-tokens", type=int, help="generative: token budget")
    t.add_argument("--no-bos", action="store_true", help="do not prepend BOS to contexts")
    t.add_argument("--out", help="write the full results JSON here")
    t.add_argument(
        "--predictions",
        help="write per-item predictions to DIR/<task>.jsonl (default with --out: <out>.predictions/)",
    )
    t.set_defaults(func=cmd_tasks)


def _add_perplexity(subparsers: argparse._SubParsersAction) -> None:
    """`lmforge perplexity`: rolling-window perplexity and bits-per-byte."""
    pp = subparsers.add_parser(
        "perplexity",
        help="token/word perplexity and bits-per-byte of documents",
        description="Score whole documents with rolling windows (every token predicted "
        "once): loss, perplexity, word perplexity, bits-per-byte.",
        epilog=EPILOG,
    )
    _model_args(pp)
    pp.add_argument("files", nargs="+", help="text/JSONL/Parquet files, folders or globs")
    pp.add_argument("--text-field", default="text")
    pp.add_argument(
        "--context-len", type=int, default=1, help="min context per window (1 = harness; more = sliding)"
    )
    pp.add_argument("--max-docs", type=int)
    pp.add_argument("--out")
    pp.set_defaults(func=cmd_perplexity)


def _add_contamination(subparsers: argparse._SubParsersAction) -> None:
    """`lmforge contamination ngram|permutation`."""
    c = subparsers.add_parser(
        "contamination", help="was the eval set in the training data? (n-gram, permutation)", epilog=EPILOG
    )
    cs = c.add_subparsers(dest="contamination_command", metavar="COMMAND", required=True)
    ng = cs.add_parser(
        "ngram",
        help="n-gram overlap between a training corpus and an eval set",
        description="Share of each eval item's word n-grams found in the training corpus.",
        epilog=EPILOG,
    )
    ng.add_argument(
        "--train",
        required=True,
        help="training corpus: files/folder/glob, 'builtin', or a run's tokenizer folder (token shards)",
    )
    ng.add_argument("--task", required=True, help="eval set as a task spec (arc:PATH, ...)")
    ng.add_argument("-n", type=int, default=13, help="n-gram length in words (default 13)")
    ng.add_argument("--min-words", type=int, default=8, help="shorter items are not judged")
    ng.add_argument(
        "--threshold", type=float, default=0.0, help="overlap fraction that flags an item (0 = any)"
    )
    ng.add_argument("--out")
    ng.set_defaults(func=cmd_ngram)
    pm = cs.add_parser(
        "permutation",
        help="Oren et al. permutation test on a model (no training data needed)",
        description="Is the canonical order of the eval examples more likely than shuffled "
        "orders? One-sided t-test over shards; small p = contamination.",
        epilog=EPILOG,
    )
    _model_args(pm)
    pm.add_argument("--task", required=True, help="eval set (in its published order) as a task spec")
    pm.add_argument("--shard-size", type=int, help="examples per shard (default: about n/4 shards, <= 50)")
    pm.add_argument("--permutations", type=int, default=20, help="shuffles per shard")
    pm.add_argument("--limit", type=int, help="use the first N examples")
    pm.add_argument("--alpha", type=float, default=0.05)
    pm.add_argument("--seed", type=int, default=0)
    pm.add_argument("--out")
    pm.set_defaults(func=cmd_permutation)


def _pair_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", required=True, help="JSONL with 'prompt' (or messages), or TXT one per line")
    p.add_argument(
        "--a", required=True, help="model A: a model folder (answers generated) or answers JSONL/TXT"
    )
    p.add_argument("--b", required=True, help="model B: a model folder or answers JSONL/TXT")
    p.add_argument("--max-new-tokens", type=int, default=64, help="when generating answers")
    p.add_argument("--device", default="cpu")


def _add_judge(subparsers: argparse._SubParsersAction) -> None:
    """`lmforge judge compare|export|import`."""
    j = subparsers.add_parser(
        "judge",
        help="pairwise comparison of two models' answers (judge / reward model / humans)",
        epilog=EPILOG,
    )
    js = j.add_subparsers(dest="judge_command", metavar="COMMAND", required=True)
    jc = js.add_parser(
        "compare", help="win rate of A over B by a judge model or a reward model", epilog=EPILOG
    )
    _pair_args(jc)
    jc.add_argument("--judge-model", help="LM folder asked 'which response is better' (both orders)")
    jc.add_argument(
        "--reward-model",
        help="reward model folder (lmforge reward or HF sequence-classification); answers are scored "
        "as chat turns, the way the reward stage trains",
    )
    jc.add_argument("--no-swap", action="store_true", help="judge in one order only (keeps position bias)")
    jc.add_argument("--tie-margin", type=float, default=0.05, help="|P(A better) - 0.5| below this is a tie")
    jc.add_argument("--out")
    jc.set_defaults(func=cmd_judge_compare)
    je = js.add_parser("export", help="side-by-side sheet (CSV or HTML) for human raters", epilog=EPILOG)
    _pair_args(je)
    je.add_argument("--out", required=True, help="sheet.csv or sheet.html (the key goes to <out>.key.json)")
    je.add_argument("--seed", type=int, default=0)
    je.set_defaults(func=cmd_judge_export)
    ji = js.add_parser(
        "import", help="read raters' verdicts back: win rate with a 95%% interval", epilog=EPILOG
    )
    ji.add_argument("sheet", help="the filled CSV (id, verdict = 1 | 2 | tie)")
    ji.add_argument("--key", help="the key file (default: <sheet>.key.json)")
    ji.add_argument("--json", action="store_true")
    ji.set_defaults(func=cmd_judge_import)


def _add_harness(subparsers: argparse._SubParsersAction) -> None:
    """`lmforge harness`: lm-evaluation-harness with lmforge as the backend."""
    h = subparsers.add_parser(
        "harness",
        help="run lm-evaluation-harness tasks on an lmforge model",
        description="lm-evaluation-harness with lmforge as the model backend (needs "
        "`pip install lm-eval`; tasks that download data need the network).",
        epilog=EPILOG,
    )
    _model_args(h)
    h.add_argument("--tasks", required=True, help="comma-separated harness task names")
    h.add_argument("--include-path", help="folder of extra task YAMLs")
    h.add_argument("--num-fewshot", type=int)
    h.add_argument("--limit", type=float)
    h.add_argument("--seed", type=int, default=1234)
    h.add_argument("--no-bos", action="store_true", help="do not prepend BOS to contexts")
    h.add_argument("--out")
    h.set_defaults(func=cmd_harness)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `tasks`, `perplexity`, `contamination`, `judge` and `harness` to the main CLI."""
    for add in (_add_tasks, _add_perplexity, _add_contamination, _add_judge, _add_harness):
        add(subparsers)
