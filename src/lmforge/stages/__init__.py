"""The pipeline's stages, in the order `lmforge run` runs them: one literal tuple.

Each stage module defines its stage with `define_stage` (see `stages/base.py`); nothing is
registered by importing a module, so this tuple alone decides what the pipeline is and in
which order it runs. The policy stages among them (`runs.POLICY_STAGES`) keep their relative
order here; a test checks it.
"""

from .align import align_stage
from .base import Stage, StageContext, define_stage
from .cpt import cpt_stage
from .data import data_stage
from .eval import eval_stage
from .pretrain import pretrain_stage
from .report import report_stage
from .reward import reward_stage
from .rl import rl_stage
from .sample import sample_stage
from .sft import sft_stage
from .tokenizer import tokenizer_stage

STAGES: tuple[Stage, ...] = (
    data_stage,
    tokenizer_stage,
    pretrain_stage,
    cpt_stage,
    sft_stage,
    reward_stage,
    align_stage,
    rl_stage,
    eval_stage,
    sample_stage,
    report_stage,
)

__all__ = ["STAGES", "Stage", "StageContext", "define_stage"]
