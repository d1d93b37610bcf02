"""Plain-text tables for the terminal and Markdown reports."""

from __future__ import annotations


def format_table(records: list[dict], *, markdown: bool = False, floats: str = "{:.3f}") -> str:
    """Render a list of same-keyed dicts as aligned columns (or a Markdown table)."""
    if not records:
        return "(empty)"
    columns = list(records[0])
    cells = [[_fmt(r.get(c, ""), floats) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
    else:
        lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(value: object, floats: str) -> str:
    return floats.format(value) if isinstance(value, float) else str(value)
