"""The scaling package imports only downward: no import cycle among its modules (function-level
imports included), nothing from stages, pipeline or the main CLI (sweep used to borrow the CLI's
private helpers)."""

from __future__ import annotations

from tests.data.test_layering import check_package

# Known, and the only ones allowed: `scaling sweep` trains its points by running the pipeline, and
# `scaling flops CONFIG` builds the model a pipeline config describes. Both are command-level
# code living in the package; a new upward import fails here.
ALLOWED_UPWARD = {"lmforge.scaling.cli": ["lmforge.pipeline"], "lmforge.scaling.sweep": ["lmforge.pipeline"]}


def test_scaling_has_no_cycles_and_nothing_else_from_above():
    check_package("lmforge.scaling", ALLOWED_UPWARD)
