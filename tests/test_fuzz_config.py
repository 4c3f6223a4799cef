"""Fuzzing pipeline config files and dotted overrides (`lmforge.pipeline.load_config`).

Property: a `ConfigError` with a message, or a validated config whose sections are the pipeline's
stages; never a pydantic/yaml exception, a traceback or a hang (YAML alias bombs included)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from lmforge.errors import ConfigError
from lmforge.pipeline import REGISTRY, load_config
from tests.fuzz_support import documented, fuzz

STAGES = sorted(REGISTRY)
KEYS = [
    "run",
    "stages",
    *STAGES,
    "name",
    "seed",
    "device",
    "max_steps",
    "lr",
    "model",
    "d_model",
    "n_layers",
    "inputs",
    "vocab_size",
    "batch_size",
    "seq_len",
    "method",
    "lora",
    "r",
    "typo_key",
    "dtype",
    "threads",
]

scalars = st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text(max_size=12)
values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(KEYS), c, max_size=3),
    max_leaves=10,
)
documents = st.dictionaries(st.sampled_from(KEYS), values, max_size=4)

ALIAS_BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    + "data: {inputs: *i}\n"
)


def _load(text: str, overrides=()):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        return documented(load_config, path, list(overrides))


def _check(cfg, err):
    if err is not None:
        assert isinstance(err, ConfigError), type(err)
        return
    for name in STAGES:
        assert hasattr(cfg, name)
    assert cfg.run.name and "/" not in cfg.run.name and ".." != cfg.run.name


@fuzz(60)
@given(documents)
def test_structured_yaml(doc):
    _check(*_load(yaml.safe_dump(doc, allow_unicode=True)))


@fuzz(40)
@given(st.text(max_size=120))
@example("run: {name: ../../etc}\n")
@example("run:\n  name: [1, 2\n")
@example("!!python/object/apply:os.system ['echo pwned']\n")
@example("[" * 3000)
@example("x: " + "9" * 5000)
@example(ALIAS_BOMB)
def test_raw_text(text):
    _check(*_load(text))


override_keys = st.lists(st.sampled_from(KEYS + ["", " ", "a..b"]), min_size=1, max_size=4).map(".".join)


@fuzz(60)
@given(
    st.lists(
        st.one_of(
            st.tuples(override_keys, st.text(max_size=15)).map(lambda kv: f"{kv[0]}={kv[1]}"),
            st.text(max_size=20),
        ),
        max_size=4,
    )
)
@example(["pretrain.max_steps=[" * 10])
@example(["run.name=.."])
@example(["run=3", "run.seed=1"])
@example(["stages=[data, nosuch]"])
def test_overrides(overrides):
    _check(*_load("", overrides))
