"""Make the viewer in this folder work offline, without committing plotly.js to git.

    python viz/build.py                                    # copy plotly.min.js here from the installed plotly
    python viz/build.py --standalone report.html           # one self-contained file: page, CSS, JS, plotly
    python viz/build.py --standalone report.html --result out/trace/result.json   # ... with a result inside

``index.html`` loads ``plotly.min.js`` from its own folder. That file (about 4.8 MB) is not kept in git: it is
exactly the copy that ships inside the Python ``plotly`` package mechedit already depends on, so this script
copies it (``viz/.gitignore`` ignores it). A ``--standalone`` page inlines everything and opens from anywhere,
offline; with ``--result`` it shows that result when opened (a report to send round).
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent


def plotly_js() -> Path:
    """The minified plotly.js inside the installed Python plotly package."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.exists():
        raise SystemExit(f"no plotly.min.js in the installed plotly package ({path}); reinstall plotly")
    return path


def copy_plotly(dest_dir: Path = HERE) -> Path:
    """Copy plotly.min.js next to the viewer (skipped when the copy is already the same size and not older)."""
    src, dest = plotly_js(), dest_dir / "plotly.min.js"
    st = src.stat()
    if not (dest.exists() and dest.stat().st_size == st.st_size and dest.stat().st_mtime >= st.st_mtime):
        shutil.copy2(src, dest)
    return dest


def _script(text: str) -> str:
    """Text safe inside <script>...</script>: no "</script" that would close the element early (in JS and JSON
    it can only stand in a string, where "<\\/" means the same)."""
    return re.sub(r"</(script)", r"<\\/\1", text, flags=re.IGNORECASE)


def standalone(out: Path, result: Path | None = None) -> Path:
    """One HTML file holding the viewer, its CSS, plotly.js and (optionally) a result to show on opening."""
    page = (HERE / "index.html").read_text()
    page = page.replace('<link rel="stylesheet" href="viewer.css">\n', "")
    page = page.replace('<script src="plotly.min.js"></script>\n', "")
    page = page.replace('<script src="viewer.js"></script>\n', "")
    page = page.replace("<!--mechedit:inline-css-->", "<style>\n" + (HERE / "viewer.css").read_text() + "</style>")
    js = (f"<script>{_script(plotly_js().read_text())}</script>\n"
          f"<script>{_script((HERE / 'viewer.js').read_text())}</script>")
    page = page.replace("<!--mechedit:inline-js-->", js)
    if result is not None:
        text = result.read_text()
        json.loads(text.replace("NaN", "null").replace("-Infinity", "null").replace("Infinity", "null"))  # is JSON
        page = page.replace("<!--mechedit:embedded-result-->",
                            f'<script type="application/json" id="mechedit-result" '
                            f'data-name="{html.escape(result.name)}">{_script(text)}</script>')
    out.write_text(page)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--standalone", type=Path, metavar="OUT.html",
                    help="write one self-contained page instead of copying plotly.min.js here")
    ap.add_argument("--result", type=Path, metavar="result.json", help="with --standalone: show this result")
    args = ap.parse_args()
    if args.result is not None and args.standalone is None:
        ap.error("--result goes with --standalone")
    if args.standalone is not None:
        print(f"wrote {standalone(args.standalone, args.result)}")
    else:
        print(f"copied {plotly_js()} -> {copy_plotly()}")


if __name__ == "__main__":
    main()
