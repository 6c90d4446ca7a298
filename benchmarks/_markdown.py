"""A Markdown table of benchmark records: the one table printer new scripts share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

#: ``(header, key or getter, format spec)``: a getter takes the record.
Column = tuple[str, str | Callable[[dict], Any], str]


def table(records: Sequence[dict], columns: Sequence[Column]) -> str:
    """Rows of ``records`` under ``columns``; a missing or ``None`` value is ``-``.

    Numbers take the column's format spec (``".1f"``), anything else ``str``;
    a record with an ``"error"`` shows ``error`` in its first empty cell.
    """
    lines = [
        "| " + " | ".join(c[0] for c in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for r in records:
        cells, error_to_show = [], "error" in r
        for _, key, spec in columns:
            value = key(r) if callable(key) else r.get(key)
            if value is None:
                cells.append("error" if error_to_show else "-")
                error_to_show = False
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                cells.append(format(value, spec))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
