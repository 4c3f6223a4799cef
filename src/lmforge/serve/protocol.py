"""OpenAI-compatible request bodies (pydantic) and the response shapes the server returns.

Only what lmforge can honour is accepted: fields it cannot (tools, a `json_schema`
response_format, echo with logprobs...) are refused with a 400 naming the field rather than silently
ignored; unknown fields are ignored, as OpenAI's own server does for forward compatibility.
Honoured beyond sampling: `logprobs` (chat: `true` + `top_logprobs` 0-20; completions: 0-20
alternatives), `logit_bias` ({token id: -100..100}) and `response_format: {"type":
"json_object"}` (JSON mode by constrained decoding, json_mode.py). lmforge extensions: `top_k`,
`repetition_penalty`, `ignore_eos` and `rag` (retrieval: `true` or `{"k": 4}`), passed by the
OpenAI Python client through `extra_body`.

Log-probabilities are those of the model's distribution after `logit_bias` and penalties,
before temperature, top-k and top-p (the distribution the token was drawn from at
temperature 1 without truncation: what RL and evaluation clients need).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, Union, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .engine import GenParams
from .request import MAX_BIAS, TokenLogprob

MAX_N = 8


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch's generator accepts
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream_options: dict | None = None
    user: str | None = None
    # lmforge extensions
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float = Field(1.0, ge=1e-4, le=10)  # smaller: float32 logits overflow
    ignore_eos: bool = False
    rag: Union[bool, dict, None] = None
    logprobs: Union[bool, int, None] = None
    logit_bias: dict[str, float] | None = None
    response_format: dict | None = None
    # refused: asked for, but not provided by lmforge
    tools: list | None = None
    functions: list | None = None
    best_of: int | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > 4 or any(not s for s in v):
            raise ValueError("stop takes at most 4 non-empty strings")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if not v:
            return None
        if len(v) > MAX_BIAS:
            raise ValueError(f"logit_bias takes at most {MAX_BIAS} entries")
        for k, x in v.items():
            if not k.strip().isdigit():
                raise ValueError(f"logit_bias keys are token ids (integers as strings), got {k!r}")
            if not -100 <= x <= 100:
                raise ValueError(f"logit_bias[{k}]={x} is out of range: values are in [-100, 100]")
        return v

    @model_validator(mode="after")
    def _refuse(self):
        kind = (self.response_format or {}).get("type", "text")
        if kind not in ("text", "json_object"):
            raise ValueError(
                f"response_format type {kind!r} is not supported by lmforge serve "
                "('text' or 'json_object'; JSON schemas are not enforced)"
            )
        if self.tools or self.functions:
            raise ValueError("tools / function calling are not supported by lmforge serve")
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported; use n")
        if isinstance(self.rag, dict):
            k = self.rag.get("k", 4)
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 20:
                raise ValueError("rag.k must be an integer in [1, 20]")
        return self

    def gen_params(self, max_tokens: int | None) -> GenParams:
        return GenParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k or None,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=tuple(self.stop or ()),
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            logit_bias={int(k): x for k, x in self.logit_bias.items()} if self.logit_bias else None,
            logprobs=self.logprobs_n,
            json_object=(self.response_format or {}).get("type") == "json_object",
        )

    @property
    def logprobs_n(self) -> int | None:
        """None: no log-probabilities; n: the chosen token's and n alternatives per token."""
        raise NotImplementedError

    @property
    def rag_k(self) -> int | None:
        if not self.rag:
            return None
        return self.rag.get("k", 4) if isinstance(self.rag, dict) else 4

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextPart]]

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Req):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def logprobs_n(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Req):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions
    echo: bool = False
    suffix: str | None = None

    @property
    def logprobs_n(self) -> int | None:
        return None if self.logprobs is None or self.logprobs is False else int(self.logprobs)

    @model_validator(mode="after")
    def _prompts(self):
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported")
        n = self.logprobs_n
        if n is not None and not 0 <= n <= 20:
            raise ValueError("logprobs takes an integer in [0, 20] (alternatives per token)")
        if n is not None and self.echo:
            raise ValueError("echo with logprobs (log-probabilities of the prompt) is not supported")
        p = self.prompt
        if isinstance(p, list) and not p:
            raise ValueError("prompt must not be an empty list")
        if isinstance(p, list) and isinstance(p[0], list) and any(not x for x in p):
            raise ValueError("prompt token lists must not be empty")
        if len(self.prompt_list) * self.n > MAX_N:
            raise ValueError(f"at most {MAX_N} completions per request (prompts x n)")
        return self

    @property
    def prompt_list(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return cast("list[str | list[int]]", list(p))  # a list of strings or of token lists


# ----------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# ----------------------------------------------------------------------------- log-probabilities
def _token(decode, tid: int) -> dict:
    text = decode([tid])
    return {"token": text, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: list[TokenLogprob] | None, decode) -> dict | None:
    """OpenAI's chat `choices[].logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if entries is None:
        return None
    content = [
        {
            **_token(decode, e.token_id),
            "logprob": e.logprob,
            "top_logprobs": [{**_token(decode, i), "logprob": lp} for i, lp in e.top],
        }
        for e in entries
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[TokenLogprob] | None, decode, offset: int) -> dict | None:
    """OpenAI's legacy completions `choices[].logprobs` (tokens, token_logprobs, top_logprobs,
    text_offset); `offset` = characters of text before the first token."""
    if entries is None:
        return None
    tokens = [decode([e.token_id]) for e in entries]
    starts = []
    for t in tokens:
        starts.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{decode([i]): lp for i, lp in e.top} for e in entries],
        "text_offset": starts,
    }
