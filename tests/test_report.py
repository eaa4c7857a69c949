"""HTML reports: `mechedit report --edit DIR`, `mechedit edit --report`, `mechedit report --study DIR`.

One ROME edit of the embedded model is made in the module (``mechedit edit --out DIR --report`` through Typer's
CliRunner), evaluated with a small :class:`~mechedit.evaluation.EvalConfig`; the pages are then checked as text
(what they say must agree with the saved edit) and opened in headless Chromium (the DevTools-pipe client of
``test_browser.py``): no script errors, and every figure on the page has drawn its SVG. Screenshots are saved
under pytest's tmp dir and their paths printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mechedit.cli import app
from mechedit.editing import EditHandle
from mechedit.report import write_edit_report, write_study_report
from mechedit.report.edit import TRACE_FILE
from mechedit.tracing import CausalTraceConfig, CausalTraceResult
from mechedit.viz.export import find_browser

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def edit_dir(tmp_path_factory, embedded) -> Path:
    """`mechedit edit --out DIR --report` on the embedded model (its default ROME request), then evaluated."""
    from mechedit.evaluation import EvalConfig, evaluate

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("edit") / "out"
    res = invoke("edit", "--out", d, "--report", "--no-evaluate")  # evaluated below, smaller
    assert res.exit_code == 0, res.output
    assert f"wrote {d / 'report.html'}" in res.output
    handle = EditHandle.load(d / "edit")
    result = evaluate(embedded, handle, config=EvalConfig(n_world_facts=10, n_filler=3, generation=False))
    result.save(d / "evaluation.json")
    return d


@pytest.fixture(scope="module")
def page(edit_dir, embedded) -> Path:
    """The report rewritten with evaluation.json present (the trace read back from the edit directory)."""
    before = embedded.fingerprint()
    path = write_edit_report(edit_dir, edit_dir / "full.html", model=embedded)
    assert embedded.fingerprint() == before  # the saved handle was applied for the generations and restored
    return path


def sections(text: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([^"]+)">(.*?)</section>', text, flags=re.S))


def test_edit_report_is_offline_and_complete(edit_dir, page):
    text = page.read_text()
    assert text.count("plotly.js v") == 1  # plotly.js inlined exactly once (its banner)
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=\"http", text)  # nothing fetched from outside
    assert list(sections(text)) == ["the-fact", "causal-trace-unedited-model", "locate-decision-and-evidence",
                                    "the-edit", "before-after-answers", "evaluation", "free-generations"]
    # figures: the trace heatmaps, ROME's layer choice, its v-optimisation losses, the evaluation
    names = re.findall(r'class="figure report-figure" data-name="([^"]+)"', text)
    assert names == ["causal-trace", "layer-choice", "evidence-v_losses", "evaluation"]
    assert f'data-figures="{len(names)}"' in text
    # the first report (written by `edit --report`, before evaluation.json existed) has no evaluation section
    assert "evaluation" not in sections((edit_dir / "report.html").read_text())


def test_edit_report_agrees_with_the_saved_edit(edit_dir, page, embedded):
    handle = EditHandle.load(edit_dir / "edit")
    record = handle.records()[0]
    s = sections(page.read_text())
    assert f"<mark>{record.subject}</mark>" in s["the-fact"]
    # ROME's change is rank one, on the one module it reports
    (name,) = handle.deltas
    assert name == handle.evidence["module"] + ".weight"
    row = re.search(rf"<tr><td>{re.escape(name)}</td>(.*?)</tr>", s["the-edit"]).group(1)
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", row)
    delta_norm = float(handle.deltas[name].norm())
    assert float(cells[1]) == pytest.approx(delta_norm, rel=1e-3)
    assert cells[-1] == "1"  # rank(Δ)
    assert f"<td>layer</td><td class=\"num\">{handle.evidence['layer']}</td>" in s["locate-decision-and-evidence"]
    # the trace was made (and saved) on the unedited model, for the edit's prompt and old answer
    trace = CausalTraceResult.load(edit_dir / TRACE_FILE)
    assert trace.model_fingerprint == handle.model_fingerprint == embedded.fingerprint()
    assert (trace.prompt, trace.answer.strip()) == (record.prompt, record.target_true)
    assert "read from causal_trace.json" in s["causal-trace-unedited-model"]
    # free generations: the greedy first word matches report.json's before/after answers for the edit prompt
    saved = json.loads((edit_dir / "report.json").read_text())["answers"][0]
    gen = re.search(rf"<tr><td>{re.escape(record.prompt)}</td><td>([^<]*)</td><td>([^<]*)</td>",
                    s["free-generations"].replace("&#x27;", "'"))
    assert gen.group(1).startswith(saved["before"]) and gen.group(2).startswith(saved["after"])
    assert saved["after"].strip() == record.target_new  # the edit took, so the edited column differs
    assert gen.group(1) != gen.group(2)


def test_edit_report_traces_when_no_trace_is_saved(edit_dir, embedded, tmp_path):
    """A copy of the edit without causal_trace.json: the fact is traced now, and the trace saved."""
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(edit_dir / "edit", d / "edit")
    page = write_edit_report(d, model=embedded, trace_samples=2, trace_window=3, generate=["Once upon a time"])
    text = page.read_text()
    assert "traced now (2 noise samples, window 3), saved to causal_trace.json" in text
    assert CausalTraceResult.load(d / TRACE_FILE).config == CausalTraceConfig(samples=2, window=3)
    # no report.json: before/after answers computed from the handle, one row per prompt of the request
    record = EditHandle.load(d / "edit").records()[0]
    n = 1 + len(record.paraphrases) + len(record.neighborhood)
    assert sections(text)["before-after-answers"].count("<tr class=") == n
    assert "Once upon a time" in sections(text)["free-generations"]


def test_many_changed_parameters_are_drawn_not_listed(edit_dir, embedded, tmp_path):
    """A handle that changes every parameter (as full fine-tuning does): the relative change per parameter is
    a bar chart, the table is folded, and no rank is computed; each row's norms are the delta's and weight's."""
    import shutil

    from mechedit.model import canonical_param_name

    g = torch.Generator().manual_seed(0)
    params = {canonical_param_name(n): p for n, p in embedded.hf_model.named_parameters()}
    deltas = {n: 1e-3 * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
    handle = EditHandle("ft", deltas, {"lr": 1e-3}, EditHandle.load(edit_dir / "edit").requests, embedded.name,
                        embedded.fingerprint(), {"losses": [3.0, 1.0, 0.5]})
    d = tmp_path / "ft"
    handle.save(d / "edit")
    shutil.copy(edit_dir / TRACE_FILE, d / TRACE_FILE)
    text = write_edit_report(d, model=embedded).read_text()
    names = re.findall(r'class="figure report-figure" data-name="([^"]+)"', text)
    assert names == ["causal-trace", "evidence-losses", "deltas"]
    edit_html = sections(text)["the-edit"]
    assert f"<summary>all {len(deltas)} parameters</summary>" in edit_html and "rank(Δ)" not in edit_html
    name = next(iter(deltas))
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", re.search(rf"<tr><td>{re.escape(name)}</td>(.*?)</tr>",
                                                           edit_html).group(1))
    assert float(cells[1]) == pytest.approx(float(deltas[name].norm()), rel=1e-3)
    assert float(cells[2]) == pytest.approx(float(params[name].detach().norm()), rel=1e-3)


def test_every_result_type_is_known_to_the_study_page():
    """Each JsonResult subclass with a format, wherever it is defined in mechedit, is drawn by the study page."""
    from mechedit.report.study import result_types

    src = Path(__file__).resolve().parents[1] / "src" / "mechedit"
    defined = {m for f in src.rglob("*.py") for m in re.findall(r"^class (\w+)\(JsonResult\)", f.read_text(), re.M)}
    known = {cls.__name__ for cls in result_types().values()}
    assert defined - known <= {"SiteScores"}  # a base class without a format of its own
    assert "CausalTraceResult" in known and "TraceSummary" in known


def test_report_errors_are_one_line(tmp_path, edit_dir, tiny_dir):
    res = runner.invoke(app, ["report", "--edit", str(tmp_path)])
    assert res.exit_code == 2 and "is not an edit output" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["report", "--edit", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "is not a directory" in res.output
    res = runner.invoke(app, ["report"])
    assert res.exit_code == 2 and "exactly one of --edit DIR or --study DIR" in res.output
    res = runner.invoke(app, ["report", "--study", str(tmp_path)])
    assert res.exit_code == 2 and "has no results to show" in res.output
    res = runner.invoke(app, ["edit", "--report"])
    assert res.exit_code == 2 and "pass --out too" in res.output
    # another model than the one the edit was made for: refused, nothing written
    out = tmp_path / "other.html"
    res = runner.invoke(app, ["report", "--edit", str(edit_dir), "--model", str(tiny_dir("llama")), "--out", str(out)])
    assert res.exit_code == 2 and "fingerprint" in res.output and not out.exists()


def tiny_png(path: Path, width: int = 3, height: int = 2) -> Path:
    """A valid RGB PNG of one colour (no imaging library needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\0" + b"\x20\x80\xc0" * width for _ in range(height))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory, edit_dir) -> Path:
    """A study's results directory: README, a markdown table, a mechedit result, plain JSON rows, a figure."""
    d = tmp_path_factory.mktemp("study") / "results"
    (d / "sub").mkdir(parents=True)
    (d / "README.md").write_text("# A study\n\nCommand:\n\n    python analyses/x.py\n\n<script>alert(1)</script>\n")
    (d / "table.md").write_text("| method | success |\n|---|---:|\n| rome | 1.00 |\n| ft | 0.50 |\n")
    CausalTraceResult.load(edit_dir / TRACE_FILE).save(d / "sub" / "trace.json")
    (d / "rows.json").write_text(json.dumps({"n": 2, "rows": [{"method": "rome", "locality": 0.99},
                                                             {"method": "ft", "locality": 0.13}],
                                             "nested": {"a": [1, 2]}}))
    (d / "broken.json").write_text("{not json")
    tiny_png(d / "figure.png")
    return d


def test_study_report(study_dir):
    page = write_study_report(study_dir)
    assert page == study_dir / "report.html"
    text = page.read_text()
    names = [m for m in re.findall(r'<section id="([^"]+)"><h2>([^<]+)</h2>', text)]
    assert [h for _, h in names] == ["README.md", "table.md", "figure.png", "broken.json", "rows.json",
                                     "sub/trace.json"]
    s = {h: sections(text)[a] for a, h in names}
    assert "<h1>A study</h1>" in s["README.md"] and "<script>alert" not in text  # raw HTML escaped
    assert "<td>rome</td>" in s["table.md"] and "<td>ft</td><td class=\"num\">0.13</td>" in s["rows.json"]
    assert "not JSON" in s["broken.json"]
    assert 'data-name="sub/trace.json"' in s["sub/trace.json"] and "mechedit.causal_trace/1" in s["sub/trace.json"]
    assert "data:image/png;base64," in s["figure.png"]
    # written again, the page does not show itself
    assert "report.html" not in [h for _, h in re.findall(r'<section id="([^"]+)"><h2>([^<]+)</h2>',
                                                           write_study_report(study_dir).read_text())]


# -- in the browser ------------------------------------------------------------------------------------------------


FIGURES_DRAWN = """new Promise((resolve) => {
  const t0 = Date.now();
  const figs = () => [...document.querySelectorAll('.report-figure')];
  (function poll() {
    const done = figs().every((f) => f.querySelector('.js-plotly-plot svg.main-svg'));
    if (done || Date.now() - t0 > 30000) {
      requestAnimationFrame(() => requestAnimationFrame(() => resolve({
        expected: Number(document.body.dataset.figures),
        figures: figs().map((f) => ({name: f.dataset.name, svgs: f.querySelectorAll('svg.main-svg').length,
          heatmaps: f.querySelectorAll('g.hm image').length,
          bars: f.querySelectorAll('g.trace.bars g.point path').length,
          lines: f.querySelectorAll('g.trace.scatter path.js-line').length})),
        images: [...document.querySelectorAll('img')].map((i) => i.naturalWidth),
        sections: document.querySelectorAll('section').length,
      })));
    } else setTimeout(poll, 50);
  })();
})"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from test_browser import Chromium

    path = find_browser()
    if path is None:
        pytest.skip("no Chrome/Chromium found (Debian: apt-get install chromium); set BROWSER_PATH to use another")
    b = Chromium(path, tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


@pytest.mark.slow
def test_edit_report_draws_in_chromium(browser, page, edit_dir, tmp_path):
    out, errors = browser.open(page.as_uri(), FIGURES_DRAWN)
    print(f"screenshot: {browser.screenshot(tmp_path / 'edit-report.png')}")
    assert errors == [], errors
    figs = {f["name"]: f for f in out["figures"]}
    assert len(out["figures"]) == out["expected"] == 4
    assert all(f["svgs"] >= 1 for f in out["figures"]), out
    trace = CausalTraceResult.load(edit_dir / TRACE_FILE)
    assert figs["causal-trace"]["heatmaps"] == len(trace.scores)  # one heatmap per traced kind
    ev = EditHandle.load(edit_dir / "edit").evidence  # layer="auto": the averaged trace's effect per layer
    n_layers = len(ev["averaged_trace"]["effects"])
    assert figs["layer-choice"]["bars"] == n_layers
    assert figs["evidence-v_losses"]["lines"] >= 1
    assert figs["evaluation"]["bars"] > 0


@pytest.mark.slow
def test_study_report_draws_in_chromium(browser, study_dir, tmp_path):
    page = write_study_report(study_dir, tmp_path / "study.html")
    out, errors = browser.open(page.as_uri(), FIGURES_DRAWN)
    print(f"screenshot: {browser.screenshot(tmp_path / 'study-report.png')}")
    assert errors == [], errors
    assert out["expected"] == len(out["figures"]) == 1 and out["figures"][0]["heatmaps"] >= 1, out
    assert out["images"] == [3]  # the PNG decoded (3 px wide)
    assert out["sections"] == 6
