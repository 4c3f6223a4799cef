"""Pipeline stages. Importing this package registers every stage with `lmforge.pipeline`."""

from . import data, tokenizer, pretrain, eval, sample  # noqa: F401  (registration side effects)
