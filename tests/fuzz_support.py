"""Shared pieces of the hypothesis fuzz tests (`tests/test_fuzz_*.py`).

The property every target must keep: for any input, either a documented error (an
`LMForgeError` subclass with a message) or correct output -- never another exception, a hang or
a record that disappears without being counted. In the normal suite each target tries a small,
fixed (derandomised) number of examples so the whole set stays under a minute;
``LMFORGE_FUZZ_SCALE=N`` multiplies the budgets and draws fresh random examples
(`benchmarks/fuzz_long.py` runs them that way).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings

from lmforge.errors import LMForgeError

SCALE = float(os.environ.get("LMFORGE_FUZZ_SCALE", "1"))


def fuzz(examples: int, deadline_ms: int = 20_000) -> settings:
    """Bounded settings: `examples` x SCALE examples; a generous per-example deadline (a hang
    is caught, a slow shared CI machine is not); no example database written into the repo."""
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=deadline_ms,
        derandomize=SCALE == 1,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
            HealthCheck.filter_too_much,
        ],
    )


def documented(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, LMForgeError | None]:
    """(result, None), or (None, error) for a documented error, which must carry a message;
    any other exception propagates and fails the test."""
    try:
        return fn(*args, **kwargs), None
    except LMForgeError as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"
        return None, e
