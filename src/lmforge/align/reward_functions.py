"""Reward functions for on-policy RL (GRPO, PPO): verifiable checks, format checks, a reward
model, and any Python callable named in the config.

The protocol is TRL's, so existing reward functions drop in::

    def my_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]: ...

called with keyword arguments only; a function receives just the ones its signature names (or
all of them with `**kwargs`): `prompts` (the last user message), `completions` (decoded text,
special tokens removed), `answers` (the reference answer or None), `messages` (the prompt as
chat messages) and `completion_ids` (token ids).

A config names reward functions as strings (`rl.grpo.rewards=[exact_match, 0.5*format]`):

- `exact_match`  1 when the completion's final number equals the reference's (GSM8K style:
  the number after `####`, else the last number in the text; `1,234`, `$5`, `-3`, `2.50` parse);
- `format`       1 when the completion matches `format_pattern` (a regex; default: a final
  answer written as `#### N` or `answer is N`);
- `reward_model` the scalar score of a reward model folder (PPO's usual reward);
- `module.path:function` or `path/to/file.py:function`: a user function. Naming it in the
  config is what imports it: the module's top-level code runs, as with any Python import, so
  only name code you trust.

A `W*name` prefix weights a term; the total reward is the weighted sum.

**Failures never crash a run.** A function that raises, returns the wrong number of values, or
returns None / NaN / inf for a sample marks that sample *failed* (a batch call that raises is
retried one sample at a time to find which). Failed samples get NaN here; the RL loop drops
them from the update (GRPO drops the whole group when fewer than two of its samples are left)
and counts them per function, with the first error message of each function logged once.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

RewardFn = Callable[..., Sequence[Any]]

DEFAULT_FORMAT_PATTERN = r"(?i)(####|answer is)\s*-?\$?\d"
_FINAL = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_SPEC = re.compile(r"^\s*(?:(?P<w>[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*\*\s*)?(?P<name>\S.*?)\s*$")


# ----------------------------------------------------------------------------- built-in checks
def extract_number(text: str) -> float | None:
    """The final numeric answer of `text`: the number after the last `####`, else the last
    number anywhere (thousands separators and a leading `$` allowed); None when there is none."""
    if not isinstance(text, str):
        return None
    finals = _FINAL.findall(text)
    raw = finals[-1] if finals else (_NUMBER.findall(text) or [None])[-1]
    if raw is None:
        return None
    raw = raw.replace(",", "")
    try:
        return float(raw)
    except ValueError:
        return None


def numbers_equal(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def exact_match(completions: Sequence[str], answers: Sequence[str | None], **_: Any) -> list[float | None]:
    """1.0 when the completion's final number equals the reference answer's, else 0.0.
    A sample without a usable reference is None (a data problem: counted as a failure)."""
    out: list[float | None] = []
    for c, a in zip(completions, answers):
        ref = extract_number(str(a)) if a is not None else None
        if ref is None:
            out.append(None)
            continue
        pred = extract_number(c)
        out.append(1.0 if pred is not None and numbers_equal(pred, ref) else 0.0)
    return out


class FormatReward:
    """1.0 when the completion matches the regex `pattern` (re.search), else 0.0."""

    def __init__(self, pattern: str = DEFAULT_FORMAT_PATTERN):
        try:
            self.regex = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"format_pattern {pattern!r} is not a valid regular expression ({e})") from None
        self.__name__ = "format"

    def __call__(self, completions: Sequence[str], **_: Any) -> list[float]:
        return [1.0 if self.regex.search(c) else 0.0 for c in completions]


# ----------------------------------------------------------------------------- user functions
def import_callable(spec: str, key: str = "rewards") -> RewardFn:
    """`package.module:function` or `path/to/file.py:function` -> the callable (imports it)."""
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise ConfigError(
            f"{key}: {spec!r} is not a known reward ({', '.join(BUILTIN)}) nor 'module:function'"
        )
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise ConfigError(f"{key}: {spec!r}: file {path} not found")
            name = f"lmforge_user_reward_{abs(hash(str(path.resolve())))}"
            module = sys.modules.get(name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(name, path)
                if loader_spec is None or loader_spec.loader is None:
                    raise ConfigError(f"{key}: {spec!r}: {path} is not a Python file")
                module = importlib.util.module_from_spec(loader_spec)
                loader_spec.loader.exec_module(module)
                sys.modules[name] = module
        else:
            module = importlib.import_module(mod_name)
    except ConfigError:
        raise
    except Exception as e:  # an import error in user code is the user's to fix
        raise ConfigError(
            f"{key}: cannot import {mod_name!r} for reward {spec!r} ({type(e).__name__}: {e}); "
            f"is it on PYTHONPATH?"
        ) from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ConfigError(f"{key}: {mod_name!r} has no callable {attr!r}")
    return fn


def _accepted(fn: Callable) -> set[str] | None:
    """Keyword names `fn` accepts; None = anything (it takes **kwargs or has no signature)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }


# ----------------------------------------------------------------------------- the reward set
@dataclass
class RewardTerm:
    name: str
    fn: RewardFn
    weight: float = 1.0


@dataclass
class RewardResult:
    total: list[float]  # weighted sum; NaN for failed samples
    terms: dict[str, list[float]]  # per function; NaN where it failed
    failures: dict[str, int]  # failed samples per function
    errors: dict[str, str] = field(default_factory=dict)  # first error message per function

    @property
    def failed(self) -> list[bool]:
        return [not math.isfinite(t) for t in self.total]


class RewardSet:
    """Weighted reward functions applied to a batch of samples, isolating failures."""

    def __init__(self, terms: list[RewardTerm]):
        if not terms:
            raise ConfigError("rewards: at least one reward function is needed")
        names = [t.name for t in terms]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"rewards: {sorted(dup)} listed twice; give each term once (use a weight)")
        self.terms = terms

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        answers: Sequence[str | None],
        messages: Sequence[list[dict]] | None = None,
        completion_ids: Sequence[list[int]] | None = None,
    ) -> RewardResult:
        n = len(completions)
        kwargs = {
            "prompts": list(prompts),
            "completions": list(completions),
            "answers": list(answers),
            "messages": list(messages) if messages is not None else [None] * n,
            "completion_ids": list(completion_ids) if completion_ids is not None else [None] * n,
        }
        terms, failures, errors = {}, {}, {}
        total = [0.0] * n
        for term in self.terms:
            vals, err = _call_isolated(term.fn, kwargs, n)
            terms[term.name] = vals
            failures[term.name] = sum(not math.isfinite(v) for v in vals)
            if err:
                errors[term.name] = err
            total = [t + term.weight * v for t, v in zip(total, vals)]
        return RewardResult(total, terms, failures, errors)


def _clean(values: Any, n: int) -> tuple[list[float], str | None]:
    try:
        vals = list(values)
    except TypeError:
        return [math.nan] * n, f"returned {type(values).__name__}, expected a list of {n} numbers"
    if len(vals) != n:
        return [math.nan] * n, f"returned {len(vals)} values for {n} samples"
    out, err = [], None
    for v in vals:
        try:
            f = float(v) if v is not None else math.nan
        except (TypeError, ValueError):
            f, err = math.nan, f"returned a {type(v).__name__}, not a number"
        if not math.isfinite(f):
            err = err or f"returned {v!r}"
            f = math.nan
        out.append(f)
    return out, err


def _call_isolated(fn: RewardFn, kwargs: dict, n: int) -> tuple[list[float], str | None]:
    """Call `fn` on the batch; if it raises, call it per sample so one bad sample costs only itself."""
    ok = _accepted(fn)
    kw = kwargs if ok is None else {k: v for k, v in kwargs.items() if k in ok}
    try:
        return _clean(fn(**kw), n)
    except Exception as e:  # noqa: BLE001  (user code: any exception is a failed sample)
        first: str | None = f"raised {type(e).__name__}: {e}"
    if n == 1:
        return [math.nan], first
    out = []
    for i in range(n):
        one = {k: v[i : i + 1] for k, v in kw.items()}
        try:
            vals, err = _clean(fn(**one), 1)
        except Exception as e:  # noqa: BLE001
            vals, err = [math.nan], f"raised {type(e).__name__}: {e}"
        first = first or err
        out += vals
    return out, first


# ----------------------------------------------------------------------------- building
BUILTIN = ("exact_match", "format", "reward_model")


def parse_spec(spec: str, key: str) -> tuple[float, str]:
    m = _SPEC.match(spec) if isinstance(spec, str) else None
    if not m:
        raise ConfigError(f"{key}: {spec!r} is not a reward spec (e.g. exact_match, 0.5*format, pkg.mod:fn)")
    return float(m["w"]) if m["w"] else 1.0, m["name"]


def build_rewards(
    specs: Sequence[str],
    *,
    key: str = "rewards",
    format_pattern: str = DEFAULT_FORMAT_PATTERN,
    reward_model: Callable[[], RewardFn] | None = None,
    extra: dict[str, RewardFn] | None = None,
) -> RewardSet:
    """A `RewardSet` from config specs. `reward_model` is a factory called only when a spec
    names `reward_model` (loading a model is expensive); `extra` maps names to callables
    (the Python API's way to pass functions without a module path)."""
    terms = []
    for i, spec in enumerate(specs):
        weight, name = parse_spec(spec, f"{key}[{i}]")
        if extra and name in extra:
            fn = extra[name]
        elif name == "exact_match":
            fn = exact_match
        elif name == "format":
            fn = FormatReward(format_pattern)
        elif name == "reward_model":
            if reward_model is None:
                raise ConfigError(
                    f"{key}[{i}]: reward_model needs a reward model folder (reward_model=PATH or "
                    f"this run's reward stage)"
                )
            fn = reward_model()
        else:
            fn = import_callable(name, f"{key}[{i}]")
            name = name.rpartition(":")[2]  # metrics say `rewards/fn`, not the whole path
        terms.append(RewardTerm(name, fn, weight))
    return RewardSet(terms)


# ----------------------------------------------------------------------------- reward model
class RewardModelScorer:
    """The `reward_model` reward: a trained reward model's scalar score of (prompt messages +
    the completion as the assistant turn), through the reward stage's `RewardScorer`
    (`lmforge.align.reward`): the same rendering as in reward-model training."""

    def __init__(self, folder: str | Path, device, batch_size: int = 16):
        from .reward import RewardScorer

        self.scorer = RewardScorer.from_dir(folder, device, batch_size=batch_size)
        self.__name__ = "reward_model"

    def __call__(
        self, completions: Sequence[str], messages: Sequence[list[dict] | None], **_: Any
    ) -> list[float]:
        convs = [list(m or []) + [{"role": "assistant", "content": c}] for c, m in zip(completions, messages)]
        return self.scorer.score(convs).tolist()
