"""The OpenAI-compatible server, driven by the official `openai` client and raw HTTP on loopback:
endpoints, streaming, API key, validation errors, 503 when full, disconnects, /health, RAG mode."""

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from lmforge.serve.engine import Engine  # noqa: E402
from lmforge.serve.server import ServerThread, create_app  # noqa: E402
from tests.factories import make_tiny_model  # noqa: E402

KEY = "test-key"


class SlowModel:
    """Wraps the model: every forward sleeps `delay` s after waiting for `gate` (tests hold
    requests in flight this way instead of relying on timing)."""

    def __init__(self, model):
        self.inner, self.delay, self.gate = model, 0.0, threading.Event()
        self.gate.set()

    def __call__(self, *a, **k):
        self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        return self.inner(*a, **k)

    def eval(self):
        return self


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir):
    engine = Engine.from_pretrained(model_dir, max_batch=2, max_queue=2, fast_path=False).start()
    slow = SlowModel(engine.model)
    engine.model = slow
    with ServerThread(create_app(engine, api_key=KEY, max_body_bytes=200_000)) as url:
        yield url, engine, slow
    engine.close()


@pytest.fixture
def client(server):
    url, engine, slow = server
    slow.delay = 0.0
    slow.gate.set()
    yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    wait_idle(engine)


def wait_idle(engine, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = engine.stats()
        if st["running"] == 0 and st["waiting"] == 0:
            return st
        time.sleep(0.01)
    raise AssertionError(f"slots leaked: {engine.stats()}")


def post(url, path, body, key=KEY, **kw):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(url + path, content=data, headers=headers, timeout=30, **kw)


def test_models_and_health(server, client):
    url, engine, _ = server
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    h = httpx.get(url + "/health").json()  # no key needed
    assert h["status"] == "ok" and h["model"] == "tiny" and h["max_batch"] == 2 and h["running"] == 0


def test_chat_completion_with_openai_client(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=8,
        temperature=0,
    )
    assert r.object == "chat.completion" and r.model == "tiny"
    ch = r.choices[0]
    assert ch.message.role == "assistant" and ch.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 5
    # deterministic at temperature 0, and the same with a seed
    again = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=8,
        temperature=0,
    )
    assert again.choices[0].message.content == ch.message.content
    s1 = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, seed=5, n=2
    )
    s2 = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, seed=5, n=2
    )
    assert [c.message.content for c in s1.choices] == [c.message.content for c in s2.choices]
    assert len(s1.choices) == 2


def test_chat_streaming_equals_non_streaming(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Tell me"}], max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.finish_reason]
    assert chunks[-1].usage.completion_tokens >= 1


def test_completions_endpoint(client):
    r = client.completions.create(model="tiny", prompt="The function", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 6
    r2 = client.completions.create(
        model="tiny", prompt=["The function", "A socket"], max_tokens=4, temperature=0, echo=True
    )
    assert [c.index for c in r2.choices] == [0, 1]
    assert r2.choices[0].text.startswith("The function") and r2.choices[1].text.startswith("A socket")
    toks = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert toks.usage.prompt_tokens == 3
    stream = list(
        client.completions.create(
            model="tiny", prompt="The function", max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in stream) == r.choices[0].text


def test_api_key_required(server):
    url = server[0]
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = post(url, "/v1/chat/completions", {"model": "tiny", "messages": []}, key=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "body,status,needle",
    [
        ("{not json", 400, "malformed JSON"),
        ("[1, 2]", 400, ""),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": -3},
            400,
            "max_tokens",
        ),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            400,
            "max_tokens",
        ),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 5},
            400,
            "temperature",
        ),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            400,
            "temperature",
        ),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 99}, 400, "n"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, 400, "stop"),
        (
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function"}],
            },
            400,
            "tools",
        ),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        ({"model": "tiny", "messages": [{"role": "user"}]}, 400, "messages.0.content"),
        ({"model": "tiny", "messages": []}, 400, "messages"),
        ({"model": "tiny"}, 400, "messages: field required"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000},
            400,
            "context",
        ),
        ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 5000}]}, 400, "context"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "rag": True},
            400,
            "retrieval is not enabled",
        ),
    ],
)
def test_bad_requests_get_clear_4xx(server, client, body, status, needle):
    url = server[0]
    r = post(url, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"]
    assert err["type"]


def test_completion_validation_and_limits(server, client):
    url = server[0]
    r = post(url, "/v1/completions", {"model": "tiny", "prompt": [], "max_tokens": 2})
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    r = post(url, "/v1/completions", {"model": "tiny", "prompt": [[]]})
    assert r.status_code == 400
    r = post(url, "/v1/completions", {"model": "tiny", "prompt": [999999], "max_tokens": 2})
    assert r.status_code == 400 and "out of range" in r.json()["error"]["message"]
    big = "x" * 300_000
    r = post(url, "/v1/completions", {"model": "tiny", "prompt": big})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    assert httpx.get(url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404


def test_queue_full_gives_503_then_recovers(server, client):
    url, engine, slow = server
    slow.gate.clear()  # hold everything in flight
    results = []

    def one():
        r = post(
            url, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 3, "ignore_eos": True}
        )
        results.append(r.status_code)

    threads = [threading.Thread(target=one) for _ in range(4)]  # 2 running + 2 queued fill it
    for t in threads:
        t.start()
    deadline = time.time() + 10
    while engine.stats()["running"] + engine.stats()["waiting"] < 4 and time.time() < deadline:
        time.sleep(0.01)
    r = post(url, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 3})
    assert r.status_code == 503 and r.headers.get("retry-after") == "1"
    assert r.json()["error"]["code"] == "queue_full"
    with pytest.raises(openai.InternalServerError):  # what the client raises for a 503
        client.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert httpx.get(url + "/health").status_code == 200  # health answers while busy
    slow.gate.set()
    for t in threads:
        t.join(30)
    assert results == [200] * 4
    wait_idle(engine)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices


def test_client_disconnect_mid_stream_frees_the_slot(server, client):
    url, engine, slow = server
    slow.delay = 0.02  # 200 tokens would take >= 4 s
    before = engine.stats()["cancelled"]
    with httpx.stream(
        "POST",
        url + "/v1/chat/completions",
        timeout=30,
        headers={"Authorization": f"Bearer {KEY}"},
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "go"}],
            "stream": True,
            "max_tokens": 200,
            "ignore_eos": True,
        },
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(line.startswith("data: ") for line in got)
    t0 = time.time()
    st = wait_idle(engine, timeout=3.0)
    assert time.time() - t0 < 3.0
    assert st["cancelled"] == before + 1


def test_client_disconnect_while_waiting_for_a_whole_answer(server, client):
    url, engine, slow = server
    slow.delay = 0.02
    before = engine.stats()["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            url + "/v1/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=0.5,
            json={"model": "tiny", "prompt": "go", "max_tokens": 200, "ignore_eos": True},
        )
    st = wait_idle(engine, timeout=3.0)
    assert st["cancelled"] == before + 1


def test_rag_mode_returns_citations(model_dir, tmp_path):
    from lmforge.serve.rag.embed import HashEmbedder
    from lmforge.serve.rag.index import build_index
    from lmforge.serve.rag.query import Retriever

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "zorbia.txt").write_text("The capital of Zorbia is Quentinville, on the river Mox.")
    (docs / "fruit.txt").write_text("Bananas grow in clusters called hands.")
    emb = HashEmbedder(256)
    build_index(tmp_path / "idx", [str(docs)], embedder=emb)
    engine = Engine.from_pretrained(model_dir, max_batch=1).start()
    try:
        with ServerThread(create_app(engine, retriever=Retriever(tmp_path / "idx", embedder=emb))) as url:
            c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            r = c.chat.completions.create(
                model="tiny",
                max_tokens=4,
                temperature=0,
                extra_body={"rag": {"k": 1}},
                messages=[{"role": "user", "content": "What is the capital of Zorbia?"}],
            )
            cites = r.model_extra["citations"]
            assert len(cites) == 1 and cites[0]["source"].endswith("zorbia.txt")
            assert r.usage.prompt_tokens > 30  # the source text went into the prompt
            chunks = list(
                c.chat.completions.create(
                    model="tiny",
                    max_tokens=4,
                    stream=True,
                    extra_body={"rag": True},
                    messages=[{"role": "user", "content": "bananas?"}],
                )
            )
            assert chunks[0].model_extra["citations"][0]["source"].endswith("fruit.txt")
            assert httpx.get(url + "/health").json()["rag"] is True
    finally:
        engine.close()


def test_subcommands_plug_into_the_main_parser():
    """`lmforge.serve.cli.add_parser` adds chat/serve/rag to lmforge's own parser without clashes."""
    import argparse

    from lmforge.cli import build_parser
    from lmforge.serve.cli import add_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "serve" not in sub.choices:  # not wired by the integrator yet
        add_parser(sub)
    a = parser.parse_args(["serve", "some/model", "--port", "0", "--max-queue", "3"])
    assert a.func.__name__ == "cmd_serve" and a.host == "127.0.0.1" and a.max_queue == 3
    a = parser.parse_args(["rag", "query", "idx", "question?", "--k", "2"])
    assert a.func.__name__ == "cmd_rag_query" and a.max_tokens == 64
    a = parser.parse_args(["chat", "m", "--system", "s"])
    assert a.func.__name__ == "cmd_chat"


# ----------------------------------------------------------------------------- logprobs, logit_bias
def _reference_logprobs(engine, prompt_ids, out_ids):
    import torch

    with torch.no_grad():
        lp = engine.model(torch.tensor([prompt_ids + out_ids]))[0].float().log_softmax(-1)
    return [float(lp[len(prompt_ids) - 1 + t, tok]) for t, tok in enumerate(out_ids)]


def test_chat_logprobs_with_openai_client(server, client):
    _, engine, _ = server
    msgs = [{"role": "user", "content": "Tell me"}]
    kw = dict(model="tiny", messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token  # greedy: the best
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert t.bytes == list(t.token.encode())
    prompt = engine.encode_chat(msgs)
    out = client.completions.create(  # the same tokens through /v1/completions, as ids
        model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=0, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].logprobs.token_logprobs == pytest.approx([t.logprob for t in content], abs=1e-5)
    stream = list(client.chat.completions.create(**kw, stream=True, extra_body={"ignore_eos": True}))
    streamed = [
        t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content
    ]
    assert [(t.token, round(t.logprob, 5)) for t in streamed] == [
        (t.token, round(t.logprob, 5)) for t in content
    ]
    plain = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_equal_the_models_log_softmax(server, client):
    _, engine, _ = server
    prompt = engine.encode("The function")
    r = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=5, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    assert all(len(d) == 2 for d in lp.top_logprobs)
    from lmforge.serve.engine import GenParams

    out_ids = engine.complete(prompt, GenParams(max_tokens=5, temperature=0, ignore_eos=True)).token_ids
    assert lp.tokens == [engine.tok.decode([t]) for t in out_ids]
    assert lp.token_logprobs == pytest.approx(_reference_logprobs(engine, prompt, out_ids), abs=1e-4)
    stream = list(
        client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=5,
            temperature=0,
            logprobs=2,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    toks = [t for c in stream if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offs = [o for c in stream if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert toks == lp.tokens and offs == lp.text_offset


def test_logit_bias_with_openai_client(server, client):
    _, engine, _ = server
    r = client.completions.create(
        model="tiny",
        prompt="The function",
        max_tokens=4,
        temperature=0,
        logit_bias={"77": 100},
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == engine.tok.decode([77] * 4, skip_special=True)
    base = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=1, temperature=0, logprobs=0)
    first = base.choices[0].logprobs.tokens[0]
    tid = engine.tok.encode(first)
    banned = client.completions.create(
        model="tiny",
        prompt=[5, 6, 7],
        max_tokens=1,
        temperature=0,
        logprobs=0,
        logit_bias={str(tid[0]): -100} if len(tid) == 1 else {},
    )
    if len(tid) == 1:
        assert banned.choices[0].logprobs.tokens[0] != first


@pytest.mark.parametrize(
    "extra,needle",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 1000}}, "logit_bias"),
        ({"logit_bias": {"999999": 1}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"repetition_penalty": 5e-324}, "repetition_penalty"),
    ],
)
def test_unsupported_or_invalid_parameters_are_refused_not_ignored(server, client, extra, needle):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **extra}
    r = post(server[0], "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"] or r.json()["error"]["param"] == needle
    r = post(server[0], "/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 2, "echo": True})
    assert r.status_code == 400 and "echo" in r.json()["error"]["message"]


def test_tiny_top_p_is_greedy_and_spares_the_other_streams(server, client):
    """Found by schemathesis: top_p=1e-50 became 0 in float32 and the NaN distribution failed
    every request decoding in the same batch. Now it means greedy, and streams beside it finish."""
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Tell me"}], max_tokens=8)
    greedy = client.chat.completions.create(**kw, temperature=0).choices[0].message.content
    results = {}

    def stream(name, **extra):
        chunks = list(client.chat.completions.create(**kw, stream=True, **extra))
        results[name] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    threads = [
        threading.Thread(target=stream, args=("witness",), kwargs={"temperature": 0}),
        threading.Thread(target=stream, args=("tiny_p",), kwargs={"top_p": 1e-50}),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {"witness": greedy, "tiny_p": greedy}


def test_json_mode_with_openai_client(client):
    import json

    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Reply in JSON"}],
        max_tokens=150,
        temperature=0,
        response_format={"type": "json_object"},
    )
    ch = r.choices[0]
    if ch.finish_reason == "stop":
        assert isinstance(json.loads(ch.message.content), dict)
    else:
        assert ch.finish_reason == "length" and ch.message.content.startswith("{")
