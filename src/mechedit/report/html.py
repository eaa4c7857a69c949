"""One self-contained HTML page built from sections: text, tables, plotly figures, PNG images, markdown.

Everything the page needs is inside the file, so it opens offline from disk: plotly.js is inlined once in the
``<head>`` (only when the page has a figure), each figure is a ``<div>`` plus the small script that draws it,
PNG images are ``data:`` URIs and the CSS is inline. Text is HTML-escaped everywhere; only markdown (converted
by markdown-it with raw HTML disabled) becomes markup.

Every figure's ``<div>`` has the class ``report-figure`` and ``data-name`` (its section's anchor), so a test
or a reader can count what should be drawn.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1b1f24;
       background: #fafafa; }
main { max-width: 1240px; margin: 0 auto; padding: 1.2em 2em 4em; }
header { border-bottom: 1px solid #d0d7de; margin-bottom: 1em; }
h1 { font-size: 1.5em; margin: 0.4em 0; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #e4e7eb; }
h3 { font-size: 1.05em; margin-top: 1.2em; }
nav a { margin-right: 1em; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; background: white; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f3f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.9em; }
pre { background: #f3f4f6; padding: 0.6em; overflow-x: auto; white-space: pre-wrap; }
.note { color: #57606a; font-size: 0.9em; }
.good { background: #dafbe1; } .bad { background: #ffebe9; }
.figure { background: white; border: 1px solid #e4e7eb; margin: 0.6em 0; overflow-x: auto; }
img.figure { max-width: 100%; }
mark { background: #fff3b0; }
details > summary { cursor: pointer; color: #0969da; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A cell's text: floats with ``digits`` significant digits, everything else as ``str``."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


def table(rows: list[dict], columns: list[str] | None = None, classes: dict[int, str] | None = None) -> str:
    """An HTML table of ``rows`` (dicts); numbers right-aligned. ``classes`` maps a row index to a CSS class
    (``good``/``bad``)."""
    if not rows:
        return '<p class="note">(no rows)</p>'
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for i, r in enumerate(rows):
        cells = []
        for c in columns:
            v = r.get(c, "")
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            cells.append(f'<td class="num">{esc(fmt(v))}</td>' if num else f"<td>{esc(fmt(v))}</td>")
        cls = f' class="{classes[i]}"' if classes and i in classes else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def frame_table(df, max_rows: int = 200) -> str:
    """A pandas DataFrame as a table (the first ``max_rows`` rows, and a note saying how many were left out)."""
    rows = df.head(max_rows).to_dict(orient="records")
    note = (f'<p class="note">first {max_rows} of {len(df)} rows</p>' if len(df) > max_rows else "")
    return table([{str(k): _plain(v) for k, v in r.items()} for r in rows], [str(c) for c in df.columns]) + note


def _plain(v: Any) -> Any:
    """numpy scalars to Python ones (so floats are formatted as floats)."""
    item = getattr(v, "item", None)
    return item() if callable(item) and not isinstance(v, (list, tuple, dict, str)) else v


def key_values(d: dict) -> str:
    """A two-column table of a flat dict."""
    return table([{"name": k, "value": v} for k, v in d.items()], ["name", "value"])


def markdown(text: str) -> str:
    """Markdown (CommonMark + tables) to HTML; raw HTML in the text is escaped, not passed through."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def details(summary: str, body_html: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{body_html}</details>"


def json_block(value: Any, limit: int = 20000) -> str:
    text = json.dumps(value, indent=1, default=str)
    if len(text) > limit:
        text = text[:limit] + f"\n... ({len(text) - limit} more characters)"
    return f"<pre>{esc(text)}</pre>"


def png(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img class="figure" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


@dataclass
class Page:
    """An HTML page assembled section by section; :meth:`render` gives the whole document."""

    title: str
    subtitle: str = ""
    _sections: list[tuple[str, str, str]] = field(default_factory=list)  # (anchor, heading, body html)
    _n_figures: int = 0

    def section(self, heading: str, *parts: str) -> None:
        anchor = re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-") or "section"
        taken = {a for a, _, _ in self._sections}
        base, i = anchor, 2
        while anchor in taken:
            anchor, i = f"{base}-{i}", i + 1
        self._sections.append((anchor, heading, "".join(parts)))

    def figure(self, fig, name: str) -> str:
        """The HTML of one plotly figure (drawn by the plotly.js inlined once in the head)."""
        self._n_figures += 1
        div_id = f"fig-{self._n_figures}"
        inner = fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                            config={"responsive": True, "displaylogo": False})
        # (plotly writes "<" in the figure's JSON as \u003c, so text holding "</script>" cannot end it early)
        return f'<div class="figure report-figure" data-name="{esc(name)}">{inner}</div>'

    @property
    def n_figures(self) -> int:
        return self._n_figures

    def render(self) -> str:
        head_js = ""
        if self._n_figures:
            from plotly.offline import get_plotlyjs

            head_js = ("<script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>\n"
                       f"<script>{get_plotlyjs()}</script>")
        nav = " ".join(f'<a href="#{a}">{esc(h)}</a>' for a, h, _ in self._sections)
        body = "\n".join(f'<section id="{a}"><h2>{esc(h)}</h2>\n{b}</section>' for a, h, b in self._sections)
        sub = f'<p class="note">{self.subtitle}</p>' if self.subtitle else ""
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{esc(self.title)}</title><style>{_CSS}</style>\n{head_js}</head>\n"
                f'<body data-figures="{self._n_figures}"><main><header><h1>{esc(self.title)}</h1>{sub}'
                f"<nav>{nav}</nav></header>\n{body}\n</main></body></html>\n")

    def write(self, path: str | Path) -> Path:
        """Write the page atomically (a temp file beside ``path``, then renamed)."""
        import os

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(self.render(), encoding="utf-8")
        os.replace(tmp, path)
        return path

