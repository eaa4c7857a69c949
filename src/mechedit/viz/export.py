"""Writing figures to disk: interactive HTML (self-contained, works offline) and static PNG.

PNG export goes through kaleido, which drives a headless Chrome/Chromium (Debian: ``apt-get install
chromium``). Without one, :func:`write_png` raises :class:`~mechedit.errors.MecheditError` saying so; callers
that write several outputs report the skipped PNGs instead of failing the whole run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mechedit.errors import MecheditError

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    """Path of a Chrome/Chromium kaleido can drive (``$BROWSER_PATH`` first), or None."""
    env = os.environ.get("BROWSER_PATH")
    if env and Path(env).exists():
        return env
    for name in _BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def write_html(fig, path: str | Path, title: str | None = None) -> Path:
    """A self-contained HTML page (plotly.js inlined, so it opens offline)."""
    path = Path(path)
    fig.write_html(path, include_plotlyjs="inline", full_html=True, config={"responsive": True},
                   div_id=path.stem)
    if title:
        text = path.read_text()
        path.write_text(text.replace("<head>", f"<head><title>{title}</title>", 1))
    return path


def write_png(fig, path: str | Path, scale: float = 2.0) -> Path:
    """A static PNG of the figure (needs Chrome/Chromium for kaleido)."""
    browser = find_browser()
    if browser is None:
        raise MecheditError("PNG export needs Chrome or Chromium (Debian: apt-get install chromium); "
                            "the HTML figures were written")
    os.environ.setdefault("BROWSER_PATH", browser)
    path = Path(path)
    fig.write_image(path, format="png", scale=scale)
    return path


def write_figures(figures: dict[str, object], out_dir: str | Path) -> tuple[list[Path], list[str]]:
    """Write each named figure as ``NAME.html`` and ``NAME.png`` into ``out_dir``; returns (written paths,
    notes about PNGs that could not be written)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, notes = [], []
    for name, fig in figures.items():
        written.append(write_html(fig, out_dir / f"{name}.html", title=name))
        try:
            written.append(write_png(fig, out_dir / f"{name}.png"))
        except MecheditError as e:
            notes.append(f"{name}.png skipped: {e}")
    return written, notes
