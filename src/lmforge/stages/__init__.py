"""Pipeline stages. Importing this package registers every stage with `lmforge.pipeline`."""

from . import data, tokenizer, pretrain, sft, align, rl, eval, sample, report  # noqa: F401  (registration side effects)
