"""The unit every reader yields and every data step consumes: text, its source, its metadata.

Its own module so that the readers and the built-in corpus (which `readers` serves as the
``"builtin"`` spec) can both use it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Document:
    """One unit of text plus where it came from (``source``) and free-form metadata."""

    text: str
    source: str
    meta: dict = field(default_factory=dict)
