"""Plain-text output for the operators' commands: UTC times and aligned tables (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime


def utc_minute(moment: datetime | None) -> str:
    """Return a UTC time to the minute (`2026-01-31 09:05Z`), or '-' for never."""
    return f"{moment:%Y-%m-%d %H:%MZ}" if moment is not None else "-"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Return the header and rows as lines, each column as wide as its widest cell."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]
