"""What a stage is, and what it is handed when it runs.

A stage is a function from artifacts on disk to artifacts on disk, defined with its pydantic
config model and the stages whose output it reads::

    @define_stage("tokenizer", TokenizerConfig, needs=("data",), help="train the BPE tokenizer")
    def tokenizer_stage(ctx: StageContext) -> dict: ...

`define_stage` turns the function into a `Stage` value and registers nothing: the pipeline's
stages and their order are the one literal tuple `lmforge.stages.STAGES`, so the order never
depends on which module happened to be imported first.

A stage gets everything it needs from its `StageContext` (its config, the run directory, the
folders of the stages it reads, the model it starts from) and never looks at the registry or
the runner; the runner (`lmforge.pipeline`) builds the context.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from rich import get_console, reconfigure
from rich.markup import escape

from ..artifacts import verify_stage
from ..errors import LMForgeError
from ..model.config import ModelConfig
from ..model.hf import from_hf_config, read_hf_config
from ..model.resources import TimeEstimate, check_time, estimate_training_time
from ..runs import POLICY_STAGES, StageRecord, policy_model_dir, read_manifest
from ..train.device import resolve_device

# rich's process-wide console, shared with the training progress bar: no syntax colouring of
# numbers and paths in log lines (assigning `console.highlight` would only add an unused attribute)
reconfigure(highlight=False, soft_wrap=True)
console = get_console()

StageFn = Callable[["StageContext"], "dict | None"]


@dataclass(frozen=True)
class Stage:
    name: str
    config_cls: type[BaseModel]
    fn: StageFn
    needs: tuple[str, ...] = ()
    help: str = ""
    flags: tuple[tuple[str, str, str], ...] = ()  # (cli flag, config key, help)
    distributed: bool = False  # runs on every torchrun rank (others run on rank 0 only)
    uses_model: bool = False  # reads the latest trained policy (its fingerprint is an input)

    @property
    def produces_model(self) -> bool:
        """Whether the stage's `model/` folder holds a policy that later stages start from."""
        return self.name in POLICY_STAGES

    def __call__(self, ctx: StageContext) -> dict | None:
        return self.fn(ctx)


def define_stage(
    name: str,
    config_cls: type[BaseModel],
    *,
    needs: tuple[str, ...] = (),
    help: str = "",
    flags: tuple[tuple[str, str, str], ...] = (),
    distributed: bool = False,
    uses_model: bool = False,
) -> Callable[[StageFn], Stage]:
    def wrap(fn: StageFn) -> Stage:
        return Stage(name, config_cls, fn, needs, help, flags, distributed, uses_model)

    return wrap


@contextmanager
def warnings_to_log(log: Callable[[str], None]) -> Iterator[None]:
    """While a stage runs, lmforge's own warnings (such as the one line saying a model runs
    through the generic `transformers` path) go through the stage's `log`: the console and the
    run's log.txt, where a user looking back at a run finds them. Other libraries' warnings are
    shown as usual."""

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.split(".")[0] == "lmforge":
            log(f"warning: {message}")
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():  # restores the filters and showwarning on the way out
        shown = warnings.showwarning
        # each stage's own lines, even when an earlier stage (or test) already warned from there
        warnings.filterwarnings("always", module="lmforge")
        warnings.showwarning = show
        yield


@dataclass
class StageContext:
    name: str
    cfg: Any  # this stage's config model
    pipeline: Any  # the whole PipelineConfig
    run_dir: Path
    dir: Path
    record: StageRecord
    log_file: Path
    order: tuple[str, ...] = ()  # the pipeline's stage names in order
    extra: dict = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.pipeline.run.seed

    @property
    def device(self) -> torch.device:
        return resolve_device(self.pipeline.run.device)

    @property
    def dtype(self) -> str:
        return self.pipeline.run.dtype

    def log(self, msg: str) -> None:
        if not self.record.write:  # non-zero torchrun ranks stay quiet
            return
        console.print(f"[dim]{self.name}[/dim] " + escape(msg))
        try:
            with open(self.log_file, "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {self.name}: {msg}\n")
        except OSError:  # a full or read-only disk: the console has the line; the next
            pass  # artifact write reports the fault with its path

    def estimate_time(
        self,
        mcfg: ModelConfig | Path,
        *,
        steps: int,
        tokens_per_step: float,
        seq_len: int,
        keys: str,
        devices: int = 1,
    ) -> TimeEstimate:
        """Before training: log the estimated time of `steps` optimizer steps of the model
        `mcfg` (a config, or a model folder whose config.json is read), keep it for the manifest
        (with the measured time next to it once the stage completes) and refuse it above
        `run.max_hours`, naming `keys` (the config keys that size it)."""
        if isinstance(mcfg, Path):
            mcfg = from_hf_config(read_hf_config(mcfg), str(mcfg / "config.json"))
        half = self.device.type == "cuda" and self.dtype in ("auto", "bfloat16", "float16")
        est = estimate_training_time(
            mcfg,
            steps=steps,
            tokens_per_step=tokens_per_step,
            seq_len=seq_len,
            device=self.device,
            dtype=torch.bfloat16 if half else torch.float32,
            devices=devices,
        )
        self.log(f"estimated time: {est.describe()}")
        check_time(est, self.pipeline.run.max_hours, self.name, keys)
        self.record.time_estimate = est.to_dict()
        return est

    def input_dir(self, stage: str) -> Path:
        """Output folder of a stage this one reads; it must have completed."""
        d = self.run_dir / stage
        m = read_manifest(d)
        if not m or m.get("status") != "complete":
            raise LMForgeError(
                f"stage {self.name!r} needs the output of {stage!r} in {d}, which is "
                f"missing or incomplete; run `lmforge {stage}` (or `lmforge run`) first"
            )
        verify_stage(d, m)
        return d

    def model_before(self, stage: str | None = None) -> Path:
        """The policy a stage starts from: the model folder of the last completed policy stage
        *before* `stage` (default: this one) in pipeline order. Models of later stages do not
        count, so a re-run of `align` starts from SFT even when an earlier `rl` model exists;
        for `eval` and `sample`, which come last, it is the run's latest model."""
        stage = stage or self.name
        order = list(self.order)
        prior = order[: order.index(stage)] if stage in order else order or list(POLICY_STAGES)
        found = policy_model_dir(self.run_dir, tuple(n for n in prior if n in POLICY_STAGES))
        if found is None:
            raise LMForgeError(
                f"{self.name}: no trained model in {self.run_dir} to start from; run `lmforge sft` "
                f"(or `lmforge run`) first, or pass --model PATH"
            )
        verify_stage(found.parent, read_manifest(found.parent))
        return found
