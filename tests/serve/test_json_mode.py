"""JSON mode: the prefix recogniser against Python's `json` parser, and constrained decoding in
the engine (a finished answer always parses)."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmforge.serve.engine import Engine, GenParams
from lmforge.serve.json_mode import JsonPrefix
from tests.factories import make_tiny_model
from tests.fuzz_support import fuzz

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text()
)
values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=8,
)
objects = st.dictionaries(st.text(max_size=5), values, max_size=4)


@fuzz(200)
@given(objects, st.booleans(), st.booleans())
def test_every_prefix_of_a_json_object_is_accepted(obj, indent, ascii_only):
    text = json.dumps(obj, indent=1 if indent else None, ensure_ascii=ascii_only)  # depth <= 8: < 24 spaces
    st_ = JsonPrefix()
    for i, c in enumerate(text):
        assert st_.feed(c), (text, i)
        assert st_.done == (i == len(text) - 1)
    assert not st_.accepts("x") and not st_.accepts(",")


@fuzz(300)
@given(st.text(alphabet='{}[]":,-+.0123456789eEtrufalsn \\/ub', max_size=30))
def test_what_it_accepts_and_closes_parses(text):
    """Soundness: accepted and closed text is one JSON object; accepted text is a prefix of one
    (closing the open containers after a completed value gives valid JSON, checked by json)."""
    st_ = JsonPrefix()
    if not st_.feed(text):
        return
    if st_.done:
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    "bad",
    [
        "[1]",
        '"x"',
        '{"a" 1}',
        '{"a":01}',
        '{"a":1,}',
        "{,}",
        '{"a":tru e}',
        '{"a":"\x01"}',
        '{"a":"\\x"}',
        "{'a':1}",
    ],
)
def test_invalid_json_is_refused(bad):
    st_ = JsonPrefix()
    assert not (st_.feed(bad) and st_.done)
    try:
        parsed = json.loads(bad)
    except json.JSONDecodeError:
        parsed = None
    assert not isinstance(parsed, dict)


def test_whitespace_runs_are_capped():
    st_ = JsonPrefix()
    assert st_.feed("{" + " " * 24)
    assert not st_.accepts(" ") and not JsonPrefix().accepts(" {")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = Engine.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("m") / "tiny"), max_batch=4)
    with eng:
        yield eng


def test_engine_json_mode_answers_parse(engine):
    ps = [
        GenParams(max_tokens=120, json_object=True, temperature=t, seed=s)
        for t, s in ((0, None), (1.0, 1), (0.7, 2))
    ]
    outs = engine.generate(["The function", "A socket", "{"], ps)
    for o in outs:
        assert o.finish_reason in ("stop", "length")
        st_ = JsonPrefix()
        assert st_.feed(o.text), o.text  # a prefix of a JSON object at any rate
        if o.finish_reason == "stop":
            assert isinstance(json.loads(o.text), dict) and st_.done
    assert any(o.finish_reason == "stop" for o in outs), [o.text for o in outs]
    free = engine.complete("The function", GenParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert not JsonPrefix().feed(free.text)  # the constraint is what makes it JSON
