"""lm-evaluation-harness adapter: run any harness task on an lmforge checkpoint.

`LMForgeLM` is a harness `TemplateLM` registered under the name ``lmforge``; the harness does the
prompting, few-shot sampling and metrics, lmforge does the scoring (`loglik.Scorer`: batched by
length, deduplicated, vocabulary projection only where needed) and generation (KV cache)::

    lmforge harness --model runs/tiny/pretrain/model --tasks arc_easy --limit 100
    lmforge harness --model DIR --tasks my_task --include-path ./my_tasks   # local YAML tasks

or from Python (importing this module registers the model)::

    import lmforge.eval.harness, lm_eval
    lm_eval.simple_evaluate(model="lmforge", model_args="pretrained=runs/tiny/pretrain/model",
                            tasks=["hellaswag"])

Tokenisation follows the harness's `TemplateLM` rules (trailing context spaces move to the
continuation; an empty context is replaced by the prefix token); ``add_bos_token`` (default true:
lmforge models are trained with BOS at document starts) prepends BOS to every context.
Requires the optional dependency ``lm-eval`` (``pip install lm-eval``).
"""

from __future__ import annotations

from pathlib import Path

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the optional dependency
    from ..errors import LMForgeError

    raise LMForgeError(
        "the lm-evaluation-harness adapter needs the `lm-eval` package: pip install lm-eval"
    ) from e

from ..serve.loading import load_model_and_tokenizer
from ..tokenizer import LMTokenizer
from .generative import generate_texts
from .loglik import Scorer


def _bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes", "on")


@register_model("lmforge")
class LMForgeLM(TemplateLM):
    """A harness LM over an lmforge model folder (or a loaded `Transformer` + `LMTokenizer`)."""

    backend = "causal"

    def __init__(
        self,
        pretrained=None,
        tokenizer=None,
        device: str = "cpu",
        batch_size=None,
        batch_tokens: int | str = 8192,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        add_bos_token=True,
        dtype: str | None = None,
        **kwargs,
    ):
        super().__init__()
        if pretrained is None:
            raise ValueError("lmforge: pass pretrained=MODEL_FOLDER (model_args='pretrained=...')")
        if isinstance(pretrained, (str, Path)):
            model, tok = load_model_and_tokenizer(pretrained, tokenizer, device=device, dtype=dtype)
        else:
            model = pretrained
            tok = (
                tokenizer
                if isinstance(tokenizer, LMTokenizer) or tokenizer is None
                else LMTokenizer.load(tokenizer)
            )
            if tok is None:
                raise ValueError("lmforge: pass tokenizer= with a model object")
        self.model, self.tok = model.eval(), tok
        bs = None if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
        self.scorer = Scorer(
            model,
            tok,
            max_len=int(max_length) if max_length else None,
            batch_tokens=int(batch_tokens),
            max_batch=bs or 128,
            add_bos=_bool(add_bos_token),
        )
        self.add_bos = self.scorer.add_bos
        self._max_gen_toks = int(max_gen_toks)
        self.gen_batch_size = bs or 16

    # ------------------------------------------------------------------ harness plumbing
    @property
    def eot_token_id(self) -> int | None:
        eos = self.tok.eos_id
        return eos if eos is not None else self.tok.bos_id

    @property
    def prefix_token_id(self) -> int | None:
        return self.scorer.prefix_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return "lmforge"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tok.encode(string)
        if self.add_bos and add_special_tokens is not False:
            ids = [self.tok.bos_id, *ids]
        return ids

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(tokens)

    # ------------------------------------------------------------------ requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        res = self.scorer.score([(list(c), list(x)) for _, c, x in requests])
        for (key, _, _), ans in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, ans)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        out = self.scorer.loglikelihood_rolling(texts)
        for r, v in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (r.args[0],), v)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        kwargs_of: dict[str, dict] = {}
        for i, r in enumerate(requests):
            _, kw = r.args
            kw = dict(kw or {})
            key = repr(sorted(kw.items(), key=lambda kv: kv[0]))
            groups.setdefault(key, []).append(i)
            kwargs_of[key] = kw
        out = [""] * len(requests)
        eot = self.tok.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        for key, idx in groups.items():
            kw = kwargs_of[key]
            until = kw.get("until") or ([eot] if eot else [])
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            max_new = min(max_new, self.max_length - 1)
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
            texts, _ = generate_texts(
                self.model,
                self.tok,
                [requests[i].args[0] for i in idx],
                max_new_tokens=max_new,
                until=until,
                temperature=temperature,
                top_p=kw.get("top_p"),
                top_k=kw.get("top_k"),
                seed=int(kw.get("seed", 0) or 0),
                batch_size=self.gen_batch_size,
                add_bos=self.add_bos,
            )
            for i, t in zip(idx, texts):
                out[i] = t
                self.cache_hook.add_partial("generate_until", requests[i].args, t)
        return out


def run_harness(
    model: str | Path,
    tasks: list[str],
    *,
    tokenizer: str | None = None,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_tokens: int = 8192,
    device: str = "cpu",
    seed: int = 1234,
    add_bos: bool = True,
) -> dict:
    """`lm_eval.simple_evaluate` on an lmforge model folder; returns the harness's results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = LMForgeLM(
        pretrained=str(model),
        tokenizer=tokenizer,
        device=device,
        batch_tokens=batch_tokens,
        add_bos_token=add_bos,
    )
    tm = TaskManager(include_path=include_path) if include_path else TaskManager()
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=tm,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
