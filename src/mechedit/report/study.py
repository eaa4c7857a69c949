"""The summary page of a study's results directory: ``mechedit report --study DIR``.

A study (``analyses/*.py``) writes a results directory of JSON results, markdown tables and PNG figures. This
page puts all of them in one self-contained HTML file, in this order: ``README.md`` (the study's own account,
with its command) first, then folder by folder (subfolders included) the markdown files, the PNG figures and
the JSON results, each sorted by name:

* ``*.md``: rendered as markdown (tables included);
* ``*.json``: a mechedit result (its ``format`` names a known result type) is loaded and drawn with its own
  ``.plot()``, its ``.to_frame()`` rows folded below; any other JSON is shown as a table (a list of flat
  objects), a key/value table (an object's plain fields) and the rest folded as text;
* ``*.png``: inlined as an image.

A JSON file that cannot be read is shown as a one-line note on the page instead of stopping the report.

>>> from mechedit.report import write_study_report
>>> write_study_report("docs/results/causal-trace-smollm2")          # doctest: +SKIP
PosixPath('docs/results/causal-trace-smollm2/report.html')
"""

from __future__ import annotations

import json
from pathlib import Path

from mechedit.errors import DataFormatError, InputError
from mechedit.report.html import Page, details, esc, frame_table, json_block, key_values, markdown, png, table

REPORT_FILE = "report.html"
SUFFIXES = (".md", ".json", ".png")


def result_types() -> dict[str, type]:
    """Every saved-result type mechedit defines, by its ``format`` tag (``mechedit.causal_trace/1`` → class).

    The modules that define one (a ``class X(JsonResult)`` line in their source) are imported first, so a new
    result type is drawn here without being listed anywhere."""
    import importlib
    import re

    import mechedit
    from mechedit.results import JsonResult

    root = Path(mechedit.__file__).parent
    for f in sorted(root.rglob("*.py")):
        if re.search(r"^class \w+\(JsonResult\)", f.read_text(encoding="utf-8"), flags=re.M):
            parts = f.relative_to(root.parent).with_suffix("").parts
            importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    found, todo = {}, list(JsonResult.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if getattr(cls, "FORMAT", ""):
            found.setdefault(cls.FORMAT, cls)
    return found


def study_files(directory: Path, exclude: Path | None = None) -> list[Path]:
    """The files the page shows: README.md first, then folder by folder the markdown, the PNG figures and the
    JSON results, each sorted by name (hidden files skipped)."""
    files = [p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(directory).parts)
             and (exclude is None or p.resolve() != exclude.resolve())]
    order = {".md": 0, ".png": 1, ".json": 2}  # in each folder: text, then figures, then the raw results

    def key(p: Path):
        rel = p.relative_to(directory)
        return rel != Path("README.md"), str(rel.parent), order[p.suffix.lower()], rel.name

    return sorted(files, key=key)


def _json_parts(page: Page, path: Path, types: dict[str, type], name: str) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return [f'<p class="note bad">not JSON: {esc(e)}</p>']
    fmt = data.get("format") if isinstance(data, dict) else None
    if isinstance(fmt, str) and fmt in types:
        try:
            result = types[fmt].load(path)
        except DataFormatError as e:
            return [f'<p class="note bad">{esc(e)}</p>']
        return [f'<p class="note">{esc(fmt)}</p>', page.figure(result.plot(), name),
                details("rows (to_frame)", frame_table(result.to_frame()))]
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        return [table(data)]
    if isinstance(data, dict):
        plain = {k: v for k, v in data.items() if v is None or isinstance(v, (str, int, float, bool))}
        rows = {k: v for k, v in data.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)
                and all(not isinstance(x, (dict, list)) for r in v for x in r.values())}
        parts = [key_values(plain)] if plain else []
        parts += [f"<h3>{esc(k)}</h3>" + table(v) for k, v in rows.items()]
        rest = {k: v for k, v in data.items() if k not in plain and k not in rows}
        if rest:
            parts.append(details(f"the rest ({', '.join(rest)})", json_block(rest)))
        return parts
    return [json_block(data)]


def write_study_report(directory: str | Path, out: str | Path | None = None) -> Path:
    """Write one HTML page showing every result, table and figure of the study's results ``directory``.

    Args:
        directory: the study's results directory (e.g. ``docs/results/<study>/``).
        out: the page to write (default ``directory/report.html``; an existing one is not shown in itself).
    Returns:
        The path of the page written.
    """
    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"{d} is not a directory; pass a study's results directory")
    target = Path(out) if out is not None else d / REPORT_FILE
    files = study_files(d, exclude=target)
    if not files:
        raise InputError(f"{d} has no results to show (no *.json, *.md or *.png files)")
    types = result_types()
    page = Page(f"Study: {d.resolve().name}", subtitle=f"{len(files)} file(s) from <code>{esc(d)}</code>")
    for path in files:
        rel = str(path.relative_to(d))
        suffix = path.suffix.lower()
        if suffix == ".md":
            page.section(rel, markdown(path.read_text(encoding="utf-8")))
        elif suffix == ".png":
            page.section(rel, png(path, rel))
        else:
            page.section(rel, *_json_parts(page, path, types, rel))
    return page.write(target)
