"""Plain aligned text tables, for the readable reports of the core (`Inspection.summary`) and the CLI."""

from __future__ import annotations


def table(rows: list[list], header: list[str]) -> str:
    """A plain aligned text table: a header line, a dashed rule, one line per row (cells as str())."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
