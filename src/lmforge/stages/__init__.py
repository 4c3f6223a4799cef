"""Pipeline stages. Importing this package registers every stage with `lmforge.pipeline`."""

from . import align, data, eval, pretrain, report, rl, sample, sft, tokenizer  # noqa: F401  (registration side effects)
