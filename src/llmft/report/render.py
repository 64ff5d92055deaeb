"""How the report shows things: tables and code as HTML in report.html and Markdown in report.md (the same cell
text in both), figures as PNGs with alternative text, numbers short enough for a cell.

    from llmft.report import render
    display(render.kv_table({"kept": 990}, ["prepare.json", "count"]))
"""

from __future__ import annotations

import html
import io
from collections.abc import Iterable
from typing import Any


class Table:
    """Rows shown as an HTML table in report.html and as a Markdown table in report.md (same cell text)."""

    def __init__(self, rows: Iterable[Iterable[Any]], header: Iterable[str], text_columns: int = 1, wrap: bool = False):
        self.header = list(header)
        self.rows = [["" if v is None else str(v) for v in row] for row in rows]
        self.text_columns = len(self.header) if wrap else text_columns  # left-aligned; the rest are numbers
        self.wrap = wrap  # long texts (predictions): wrap inside the cell, keep the answer's own line breaks

    def _repr_html_(self) -> str:
        def cells(tag: str, values: list[str]) -> str:
            return "".join(
                f'<{tag} class="{"text" if i < self.text_columns else "num"}">{html.escape(v)}</{tag}>'
                for i, v in enumerate(values)
            )

        body = "".join(f"<tr>{cells('td', row)}</tr>" for row in self.rows)
        css = "report wrap" if self.wrap else "report"
        return f'<table class="{css}"><thead><tr>{cells("th", self.header)}</tr></thead><tbody>{body}</tbody></table>'

    def _repr_markdown_(self) -> str:
        def cell(v: str) -> str:
            return html.escape(v, quote=False).replace("|", "\\|").replace("\n", "<br>") or " "

        lines = ["| " + " | ".join(map(cell, self.header)) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(map(cell, row)) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return self._repr_markdown_()


class Code:
    """A code block: <pre> in columns in report.html, a fenced block in report.md."""

    def __init__(self, text: str, lang: str = "", columns: int = 1):
        self.text, self.lang, self.columns = text, lang, columns

    def _repr_html_(self) -> str:
        return f'<pre class="code" style="column-count: {self.columns}">{html.escape(self.text)}</pre>'

    def _repr_markdown_(self) -> str:
        return f"```{self.lang}\n{self.text}\n```\n"


def show(fig, alt: str) -> None:
    """Display a matplotlib figure as a PNG with alternative text (report.html and report.md carry it)."""
    import matplotlib.pyplot as plt
    from IPython.display import Image, display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    display(Image(buf.getvalue(), metadata={"alt": alt}))


def fmt(value: Any, digits: int = 4) -> str:
    """A number short enough for a table cell: 4 significant digits, thousands separators for integers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}g}" if abs(value) < 1e5 else f"{value:,.0f}"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level, keys joined by dots ({"val": {"loss": 2}} -> {"val.loss": 2}): one table row each."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def kv_table(values: dict, header: list[str]) -> Table:
    """One row per key: name, then the value formatted by `fmt`."""
    return Table([[key, fmt(value)] for key, value in values.items()], header)
