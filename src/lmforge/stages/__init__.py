"""Pipeline stages. Importing this package registers every stage with `lmforge.pipeline`.

The import order is the pipeline order (each module registers its stages as it is imported),
so the imports are not sorted alphabetically.
"""
# isort: skip_file

from . import data, tokenizer, pretrain, sft, align, rl, eval, sample, report  # noqa: F401  (registration order)
