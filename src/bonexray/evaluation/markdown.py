"""Markdown helpers shared by the report sections of ``report.md`` (numbers, CIs, tables)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["fmt", "fmt_ci", "cell", "table"]


def fmt(x: Any) -> str:
    """A value as shown in the report: 3 decimals for floats, "n/a" for None, NaN or infinity."""
    if x is None:
        return "n/a"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return f"{float(x):.3f}" if math.isfinite(float(x)) else "n/a"
    return str(x)


def fmt_ci(point: Any, ci: Any) -> str:
    """``point [lo, hi]``; the point alone when there is no interval, "n/a" when there is no point."""
    if point is None:
        return "n/a"
    if not ci or ci[0] is None or ci[1] is None:
        return fmt(point)
    return f"{fmt(point)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def cell(x: Any) -> str:
    """Markdown table cell: pipes and newlines would break the table."""
    return str(x).replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "l") -> list[str]:
    """A GitHub-flavoured markdown table as lines: numbers right-aligned, the first column left-aligned
    unless ``align`` is not ``"l"``."""
    sep = ["---" if i == 0 and align == "l" else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return lines
