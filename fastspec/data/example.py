"""The record every loader returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fastspec.errors import UserError


class DataError(UserError):
    """A user-facing problem with a data file (missing, corrupt, wrong columns)."""


@dataclass(frozen=True)
class Example:
    """One summarization pair. ``reference`` is None for unlabeled text."""

    id: str
    source: str
    reference: Optional[str] = None
