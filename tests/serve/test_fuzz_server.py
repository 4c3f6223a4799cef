"""Fuzzing the HTTP server's request bodies (`lmforge serve`), over real loopback HTTP.

Properties: every response is JSON (or an SSE stream for a valid streaming request); errors use
OpenAI's shape with a message and a 4xx status -- never a 500 for anything a client can send,
never a hang; the API key is never echoed; the server still answers /health afterwards."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz_support import fuzz

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from lmforge.serve.engine import Engine  # noqa: E402
from lmforge.serve.server import ServerThread, create_app  # noqa: E402
from tests.factories import make_tiny_model  # noqa: E402

KEY = "sk-fuzz-SECRET-0042"
OK: list[int] = []  # successful generations seen (the fuzzers must reach the engine, not only validation)
LIMIT = 20_000


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = make_tiny_model(
        tmp_path_factory.mktemp("fuzz") / "m", d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=24
    )
    engine = Engine.from_pretrained(folder, max_batch=4, max_queue=16, fast_path=False, name="tiny").start()
    with ServerThread(create_app(engine, api_key=KEY, max_body_bytes=LIMIT)) as url:
        with httpx.Client(
            base_url=url,
            timeout=60,
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        ) as c:
            yield c
    engine.close()


nums = st.one_of(
    st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(2**62, 2**80),
    st.integers(-(2**80), -(2**62)),
)
anything = st.recursive(
    st.none() | st.booleans() | nums | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6,
)
text = st.text(min_size=1, max_size=20)
valid_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "developer"]),
        "content": st.one_of(
            text,
            st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), min_size=1, max_size=2),
        ),
    }
)
# values float32 cannot hold (found by schemathesis: top_p=1e-50, repetition_penalty=5e-324 gave a
# NaN distribution that failed every request in the batch)
tiny = st.sampled_from([5e-324, 1e-50, 1e-45, 1.1e-38, 1e-5, 1e-4])
valid_common = {
    "max_tokens": st.integers(1, 6),
    "temperature": st.one_of(st.floats(0, 2), tiny),
    "top_p": st.one_of(st.floats(0.01, 1), tiny),
    "n": st.integers(1, 3),
    "stream": st.booleans(),
    "stop": st.lists(text, max_size=3),
    "seed": st.integers(0, 2**31),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "top_k": st.integers(0, 50),
    "repetition_penalty": st.one_of(st.floats(0.5, 2), tiny),
    "logit_bias": st.dictionaries(st.integers(0, 383).map(str), st.floats(-100, 100), max_size=3),
    "logprobs": st.one_of(st.booleans(), st.integers(0, 5)),
    "top_logprobs": st.integers(0, 5),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
    "echo": st.booleans(),
    "stream_options": st.just({"include_usage": True}),
    "max_completion_tokens": st.integers(1, 6),
}
hostile_value = st.one_of(nums, anything, st.sampled_from(["", "tiny", "user", [], {}, [[]], {"k": 0}]))
hostile_keys = st.sampled_from(
    [
        "model",
        "messages",
        "prompt",
        "logprobs",
        "tools",
        "functions",
        "rag",
        "suffix",
        "best_of",
        "user",
        *valid_common,
    ]
)


def _merge(base: dict, hostile: dict) -> dict:
    return {**base, **hostile}


valid_prompts = st.one_of(
    text, st.lists(text, min_size=1, max_size=2), st.lists(st.integers(0, 383), min_size=1, max_size=6)
)
# a valid request with up to two fields replaced by anything: requests reach the engine often,
# and every field is hit with hostile values too
chat_bodies = st.builds(
    _merge,
    st.fixed_dictionaries(
        {"model": st.just("tiny"), "messages": st.lists(valid_message, min_size=1, max_size=3)},
        optional=valid_common,
    ),
    st.dictionaries(hostile_keys, hostile_value, max_size=2),
)
completion_bodies = st.builds(
    _merge,
    st.fixed_dictionaries({"model": st.just("tiny"), "prompt": valid_prompts}, optional=valid_common),
    st.dictionaries(hostile_keys, hostile_value, max_size=2),
)


def _check(r: httpx.Response) -> None:
    assert KEY not in r.text
    assert r.status_code != 500 and r.status_code < 500 or r.status_code == 503, (r.status_code, r.text[:300])
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        return
    body = r.json()
    if r.status_code == 200:
        assert "choices" in body
        OK.append(1)
    else:
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def _post(client, path: str, body) -> None:
    r = client.post(path, content=json.dumps(body, allow_nan=True).encode())
    _check(r)


@fuzz(40)
@given(chat_bodies)
@example({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": 2**70, "max_tokens": 2})
@example({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": float("nan")})
@example(
    {"model": "tiny", "messages": [{"role": "system", "content": "0"}], "temperature": 5.756708255607572e-80}
)
@example({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 2})
@example({"model": "tiny", "messages": [{"role": "user", "content": "x " * 200}]})
def test_chat_bodies(client, body):
    _post(client, "/v1/chat/completions", body)


@fuzz(40)
@given(completion_bodies)
@example({"model": "tiny", "prompt": [10**6], "max_tokens": 2})
@example({"model": "tiny", "prompt": [[1, 2], []], "max_tokens": 2})
@example({"model": "tiny", "prompt": "hi", "seed": -(2**70), "max_tokens": 2})
def test_completion_bodies(client, body):
    _post(client, "/v1/completions", body)


@fuzz(40)
@given(
    st.one_of(
        st.binary(max_size=60),
        st.text(max_size=60).map(str.encode),
        st.sampled_from(
            [
                b"[" * 5000,
                b'{"model": "tiny", "prompt": ' + b"9" * 5000 + b"}",
                b"\xff\xfe",
                b'{"model": "tiny", "messages": [' + b"[" * 3000 + b"]}",
                b"null",
                b"1e999",
            ]
        ),
    ),
    st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
)
def test_raw_bodies(client, raw, path):
    _check(client.post(path, content=raw))


def test_fuzzers_reached_generation():
    assert len(OK) >= 5, "the fuzz bodies never got past validation; the strategies are too hostile"


def test_out_of_range_seed_names_the_field(client):
    # found by fuzzing: a seed beyond 64 bits reached torch and came back as "Overflow when
    # unpacking long long"; now the request model refuses it by name
    r = client.post(
        "/v1/completions", content=json.dumps({"model": "tiny", "prompt": "hi", "seed": 2**70}).encode()
    )
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("seed:")


def test_oversized_and_unauthenticated(client):
    r = client.post("/v1/completions", content=b"x" * (LIMIT + 1))
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = httpx.post(
        str(client.base_url) + "/v1/completions",
        json={"model": "tiny", "prompt": "hi"},
        headers={"Authorization": "Bearer sk-wrong"},
        timeout=30,
    )
    assert r.status_code == 401 and KEY not in r.text and "sk-wrong" not in r.text
    assert client.get("/health").json()["status"] == "ok"
