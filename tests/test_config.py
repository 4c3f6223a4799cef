"""Config validation: every mistake is reported before work starts, naming the key."""

import pytest

from lmforge.config import apply_overrides, parse_override
from lmforge.errors import ConfigError
from lmforge.pipeline import load_config


def test_default_config_loads():
    cfg = load_config(None)
    assert cfg.run.name == "tiny"
    assert cfg.pretrain.model.d_model % cfg.pretrain.model.n_heads == 0


def test_override_sets_nested_values_with_yaml_types():
    cfg = load_config(
        "tiny",
        ["pretrain.max_steps=7", "pretrain.model.n_layers=3", "run.name=x1", "data.inputs=[a.txt, b.jsonl]"],
    )
    assert cfg.pretrain.max_steps == 7 and cfg.pretrain.model.n_layers == 3
    assert cfg.run.name == "x1" and cfg.data.inputs == ["a.txt", "b.jsonl"]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("pretrain.max_step=3", "pretrain.max_step: unknown key; did you mean 'pretrain.max_steps'"),
        ("pretrain.lr=abc", "pretrain.lr"),
        ("pretrain.lr=-1", "pretrain.lr"),
        ("pretrain.model.n_heads=5", "n_heads (5) must divide d_model"),
        ("pretrain.model.n_kv_heads=4", "n_kv_heads (4) must divide n_heads"),
        ("run.device=tpu", "run.device"),
        ("nosuchstage.x=1", "nosuchstage: unknown key"),
    ],
)
def test_bad_values_are_named(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert needle in str(e.value)
    assert "tiny.yaml" in str(e.value)


def test_several_errors_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["pretrain.lr=abc", "tokenizer.vocab_size=3"])
    msg = str(e.value)
    assert "pretrain.lr" in msg and "tokenizer.vocab_size" in msg


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("pretrain.max_steps")
    with pytest.raises(ConfigError, match="empty key segment"):
        parse_override("pretrain..x=1")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"run": {"name": "a"}}, ["run.name.x=1"])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+:\d+: invalid YAML"):
        load_config(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(notmap)
    with pytest.raises(ConfigError, match="neither a YAML file nor a shipped pipeline"):
        load_config("no-such-pipeline")


def test_unknown_stage_in_stage_list():
    with pytest.raises(ConfigError, match="unknown stage 'pretrian'"):
        load_config("tiny", ["stages=[data, pretrian]"])
