"""Pipeline configuration: YAML files, dotted overrides, validation before any work starts.

A pipeline file has a `run:` section (name, output root, seed, device), an optional `stages:`
list (which stages to run, in order) and one section per stage, named after it. Each stage
section is validated by that stage's pydantic model (see `lmforge.stages.base.define_stage`);
unknown keys, wrong types and impossible values are reported together, each with its dotted
key, the file it came from and a "did you mean" hint for typos.

Overrides use dotted keys and YAML values: `pretrain.max_steps=200`,
`pretrain.model.n_layers=6`, `run.device=cpu`, `stages=[data,tokenizer]`.
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from .errors import ConfigError

Tracker = Literal["tensorboard", "wandb", "mlflow"]  # each installed by the lmforge extra of its name


def missing_trackers(names: list[str]) -> list[str]:
    """The trackers in `names` whose package is not importable."""
    return [n for n in names if importlib.util.find_spec(n) is None]


def tracker_install_hint(missing: list[str]) -> str:
    return (
        f"{', '.join(missing)} requested but not installed; install with "
        f"pip install 'lmforge[{','.join(missing)}]' or remove it from run.trackers"
    )


class RunSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("tiny", pattern=r"^[A-Za-z0-9._-]+$", description="run directory name")
    root: str = Field("runs", description="folder that holds run directories")
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    max_hours: float | None = Field(
        None,
        gt=0,
        description="refuse a training stage whose estimated time (FLOPs / measured matmul rate, "
        "logged as 'estimated time') exceeds this many hours; unset: no limit",
    )
    trackers: list[Tracker] = Field(
        default_factory=list,
        description="where metrics go besides metrics.jsonl: tensorboard, wandb (offline unless "
        "WANDB_MODE is set), mlflow (file store under run.root/mlruns unless MLFLOW_TRACKING_URI is set)",
    )

    @field_validator("trackers")
    @classmethod
    def _installed(cls, v: list[str]) -> list[str]:
        missing = missing_trackers(v)
        if missing:
            raise ValueError(tracker_install_hint(missing))
        return list(dict.fromkeys(v))

    @field_validator("name")
    @classmethod
    def _one_component(cls, v: str) -> str:
        """The name is one path component that cannot climb out of `root`: the pattern already
        excludes "/" and "\\"; names made only of dots ("..") are refused here."""
        if set(v) == {"."}:
            raise ValueError(f"{v!r} is not a run name (it would point outside run.root)")
        return v

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name


def split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG] [KEY=VALUE ...]` of a command line -> (config or None, overrides)."""
    config, overrides = None, []
    for it in items:
        if "=" in it:
            overrides.append(it)
        elif config is None:
            config = it
        else:
            raise ConfigError(f"unexpected argument {it!r}: give one CONFIG and KEY=VALUE overrides")
    return config, overrides


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(
            f"override {item!r} is not of the form key.path=value (e.g. pretrain.max_steps=200)"
        )
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # not YAML (or hostile YAML): a string
        value = raw
    if _too_big(value):
        raise ConfigError(f"override {key}: the value expands to more than {MAX_YAML_VALUES:,} values")
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return data


MAX_YAML_VALUES = 100_000  # a real config has hundreds; a YAML "billion laughs" has billions


def _too_big(data: Any, limit: int = MAX_YAML_VALUES) -> bool:
    """Whether `data` holds more than `limit` values once YAML aliases are expanded. Aliases
    make the parsed object a DAG whose expansion can be exponential (9 levels of 9 aliases
    = 387M strings); validating that would hang, so count with an early exit instead."""
    stack, seen = [data], 0
    while stack:
        x = stack.pop()
        seen += 1
        if seen > limit:
            return True
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return False


def parse_yaml(text: str, where: str, error: type[Exception] = ConfigError) -> Any:
    """`yaml.safe_load` with every failure as `error` naming `where` (and line:column when
    known): syntax errors, nesting deeper than the parser's recursion limit, integers over
    Python's 4300-digit limit, alias bombs. safe_load never constructs Python objects."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise error(f"{where}{at}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    except RecursionError:
        raise error(f"{where}: invalid YAML (nested too deeply)") from None
    except ValueError as e:  # e.g. int('9' * 5000)
        raise error(f"{where}: invalid YAML ({e})") from None
    if _too_big(data):
        raise error(
            f"{where}: the YAML expands to more than {MAX_YAML_VALUES:,} values (aliases?); "
            f"a config never needs that many"
        )
    return data


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = parse_yaml(p.read_text(encoding="utf-8"), str(p))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a UTF-8 text file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (run:, data:, ...)")
    return data


def _known_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at `loc` (for typo suggestions)."""
    cur: Any = model
    for part in loc[:-1]:
        fields = getattr(cur, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        cur = ann
    return list(getattr(cur, "model_fields", {}) or [])


def format_validation_error(err: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(str(x) for x in e["loc"])
        key = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(loc[-1], _known_fields(model, loc), n=1)
            msg = "unknown key" + (f"; did you mean {'.'.join(loc[:-1] + (hint[0],))!r}?" if hint else "")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
                msg += f" (got {e['input']!r})"
        lines.append(f"  {key}: {msg}")
    return f"{source}: invalid config\n" + "\n".join(lines)


def pipeline_model(stage_configs: dict[str, type[BaseModel]]) -> type[BaseModel]:
    fields: dict[str, Any] = {
        "run": (RunSettings, Field(default_factory=RunSettings)),
        "stages": (list[str] | None, None),
    }
    for name, cls in stage_configs.items():
        fields[name] = (cls, Field(default_factory=cls))
    return create_model("PipelineConfig", __config__=ConfigDict(extra="forbid"), **fields)


def validate(data: dict, model: type[BaseModel], source: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, model, source)) from None
