"""Browser tests: the figures open in headless Chromium without script errors and draw what they should.

Three kinds of page, each result type of a tiny random Llama:

- each result's ``.plot()`` written by :func:`mechedit.viz.export.write_html` (plotly.js inlined);
- the standalone viewer ``viz/index.html`` opening the saved ``result.json`` through ``?src=`` (served over
  http by a local server), through its file picker, and built ``--standalone`` with the result inside;
- the circuitsvis attention page (:mod:`mechedit.viz.attention`).

The browser is Debian's ``chromium`` driven over the Chrome DevTools protocol on a pipe
(``--remote-debugging-pipe``: JSON messages ending in NUL on file descriptors 3 and 4), one browser for the
module: no extra package, no port, and the protocol reports script exceptions, console errors and failed
loads, which a ``--dump-dom`` run would not. A page passes when none of those occurred and its figure has the
drawn SVG elements of its traces (heatmap images, bars, markers, cell text). A PNG screenshot of each page is
saved under pytest's tmp dir and its path printed (``pytest -s`` shows it).

Skipped when no Chromium is found (``make chromium`` installs it).
"""

from __future__ import annotations

import base64
import fcntl
import functools
import http.server
import importlib.util
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import mechedit
from mechedit.viz.export import find_browser, write_html

pytestmark = pytest.mark.slow  # a browser and a dozen pages: ~20-40 s on a busy 2-core machine

VIZ = Path(__file__).resolve().parents[1] / "viz"
PROMPT = "Voupeis Draexmir was born in the city of"
SUBJECT = "Voupeis Draexmir"


# -- a minimal DevTools-protocol client --------------------------------------------------------------------------


_ONTO_3_AND_4 = """import os, sys
r, w = int(sys.argv[1]), int(sys.argv[2])
os.dup2(r, 3)
os.dup2(w, 4)
os.close(r)
os.close(w)
os.execv(sys.argv[3], sys.argv[3:])"""


class Chromium:
    """Headless Chromium driven over ``--remote-debugging-pipe``: one tab, pages opened one after another."""

    def __init__(self, path: str, profile: Path) -> None:
        cmd_r, self._cmd_w = os.pipe()  # Chromium reads commands on fd 3 ...
        self._res_r, res_w = os.pipe()  # ... and writes replies and events on fd 4
        # the child's ends, moved to fds >= 10 (so neither is 3 or 4 already); a small Python wrapper puts them on
        # 3 and 4 and execs Chromium (no preexec_fn: that is unsafe in a process with threads)
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (cmd_r, res_w)]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ONTO_3_AND_4, *map(str, high), path, "--headless", "--no-sandbox",
             "--disable-gpu", "--remote-debugging-pipe", "--no-first-run", "--disable-extensions", "--mute-audio",
             "--hide-scrollbars", f"--user-data-dir={profile}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=high)
        for fd in (cmd_r, res_w, *high):
            os.close(fd)
        self._inbox: queue.Queue = queue.Queue()
        self._pending: list[dict] = []  # events read while waiting for a reply
        self._next_id = 0
        threading.Thread(target=self._read, daemon=True).start()
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=self.session)
        self.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 900, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=self.session)

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self._res_r, 1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for m in messages:
                self._inbox.put(json.loads(m))
        self._inbox.put(None)  # the browser closed the pipe

    def _next(self, deadline: float) -> dict:
        try:
            m = self._inbox.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError("no answer from Chromium in time") from None
        if m is None:
            raise RuntimeError("Chromium closed the DevTools pipe")
        return m

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60):
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._next(deadline)
            if m.get("id") == self._next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self._pending.append(m)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self._pending):
                if m.get("method") == method and m.get("sessionId") == self.session:
                    return self._pending.pop(i)
            self._pending.append(self._next(deadline))

    def open(self, url: str, probe: str, timeout: float = 60) -> tuple[dict, list[str]]:
        """Load ``url``, evaluate the JS expression ``probe`` (it may return a promise) and return its value with
        every script error, console error and failed load seen meanwhile."""
        self._pending.clear()
        nav = self.send("Page.navigate", {"url": url}, session=self.session)
        assert not nav.get("errorText"), f"{url}: {nav['errorText']}"
        self.wait_event("Page.loadEventFired", timeout)
        res = self.send("Runtime.evaluate", {"expression": probe, "awaitPromise": True, "returnByValue": True},
                        session=self.session, timeout=timeout)
        if "exceptionDetails" in res:
            raise AssertionError(f"{url}: the probe raised {res['exceptionDetails']}")
        self.send("Runtime.evaluate", {"expression": "1"}, session=self.session)  # flush queued events
        return res["result"].get("value"), self._errors()

    def _errors(self) -> list[str]:
        out = []
        for m in self._pending:
            p = m.get("params", {})
            if m.get("method") == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
            elif m.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console.error: " + " ".join(str(a.get("value", a.get("description")))
                                                        for a in p.get("args", [])))
            elif (m.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error"
                  and "favicon.ico" not in p["entry"].get("url", "")):
                out.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
        return out

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (up to 5000 px high)."""
        size = self.send("Page.getLayoutMetrics", session=self.session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": max(1, size["width"]), "height": min(max(1, size["height"]), 5000),
                "scale": 1}
        shot = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip},
                         session=self.session)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)


# what the pages report back: counts of drawn elements, and the viewer's state
_COUNTS = """(() => {
  const q = (s) => document.querySelectorAll(s).length;
  return {
    plots: q('.js-plotly-plot'), svgs: q('.js-plotly-plot svg.main-svg'),
    heatmaps: q('.js-plotly-plot g.hm image'), cell_text: q('.js-plotly-plot g.hm text'),
    bars: q('.js-plotly-plot g.trace.bars g.point path'), markers: q('.js-plotly-plot path.point'),
    state: document.body.dataset.state || null, status: (document.getElementById('status') || {}).textContent || null,
  };
})()"""


def _wait_then_count(condition: str, timeout_ms: int = 30000) -> str:
    """A probe: poll until ``condition`` (JS) holds or the time is up, let two frames draw, then count."""
    return f"""new Promise((resolve) => {{
  const t0 = Date.now();
  (function poll() {{
    if (({condition}) || Date.now() - t0 > {timeout_ms}) {{
      requestAnimationFrame(() => requestAnimationFrame(() => resolve({_COUNTS})));
    }} else setTimeout(poll, 50);
  }})();
}})"""


PLOT_DRAWN = _wait_then_count("document.querySelector('.js-plotly-plot svg.main-svg') !== null")
VIEWER_DONE = _wait_then_count("['ready', 'error'].includes(document.body.dataset.state)")


# -- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    path = find_browser()
    if path is None:
        pytest.skip("no Chrome/Chromium found (Debian: apt-get install chromium, or `make chromium`); "
                    "set BROWSER_PATH to use another")
    b = Chromium(path, tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def model(tiny_dir) -> mechedit.LoadedModel:
    return mechedit.load(tiny_dir("llama"))


@pytest.fixture(scope="module")
def results(model) -> dict:
    """One result of every type, small (tiny Llama, 2 noise samples)."""
    from mechedit.locating import LocateConfig, locate
    from mechedit.tracing import (
        CausalTraceConfig,
        PatchingConfig,
        activation_magnitudes,
        activation_patching,
        agreement,
        attribution_patching,
        causal_trace,
        gradient_norms,
        logit_lens,
    )
    from mechedit.tracing.summary import summarize_traces

    torch.manual_seed(0)
    ct_cfg = CausalTraceConfig(samples=2, window=1)
    trace = causal_trace(model, PROMPT, SUBJECT, config=ct_cfg)
    pc = PatchingConfig(components=("resid_pre", "z", "z_by_pos", "mlp_post"), samples=2)
    patching = activation_patching(model, PROMPT, subject=SUBJECT, config=pc)
    attribution = attribution_patching(model, PROMPT, subject=SUBJECT, config=pc)
    other = causal_trace(model, "Lodum Fideth works as a", "Lodum Fideth", config=ct_cfg)
    return {
        "causal_trace": trace,
        "patching": patching,
        "attribution": attribution,
        "agreement": agreement(attribution, patching),
        "logit_lens": logit_lens(model, PROMPT, subject=SUBJECT),
        "gradients": gradient_norms(model, PROMPT, subject=SUBJECT),
        # one baseline prompt: its "last" pool has one value, so the saved std is NaN (JSON that JS rejects)
        "magnitudes": activation_magnitudes(model, PROMPT, ["The weather today is"], subject=SUBJECT),
        "locate": locate(model, PROMPT, SUBJECT, config=LocateConfig(samples=2, window=1)),
        "trace_summary": summarize_traces([trace, other]),
    }


def expected(name: str, r) -> dict[str, int]:
    """The least each figure must draw: heatmap images, bars, markers, heatmap cell text."""
    if name == "causal_trace":
        return {"heatmaps": len(r.scores)}
    if name in ("patching", "attribution"):  # resid_pre, z, z_by_pos as heatmaps; mlp_post as top-k bars
        return {"heatmaps": 3, "bars": r.config.top_k}
    if name == "agreement":
        return {"markers": sum(len(v) for v in r.exact.values())}
    if name == "logit_lens":
        return {"heatmaps": 1, "cell_text": r.n_depths * len(r.tokens)}
    if name == "gradients":
        return {"heatmaps": len(r.sites), "bars": sum(len(v) for v in r.modules.values())}
    if name == "magnitudes":
        return {"heatmaps": len(r.norms), "bars": len(r.norms) * r.n_layers}
    if name == "locate":
        return {"heatmaps": 1, "bars": r.evidence.causal_trace.n_layers}
    if name == "trace_summary":
        return {"heatmaps": len(r.effects)}
    raise KeyError(name)


NAMES = ("causal_trace", "patching", "attribution", "agreement", "logit_lens", "gradients", "magnitudes", "locate",
         "trace_summary")


def viewer_files(dest: Path) -> Path:
    """The viewer (page, CSS, JS) and plotly.min.js copied by viz/build.py into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("index.html", "viewer.js", "viewer.css"):
        shutil.copy(VIZ / name, dest / name)
    build_module().copy_plotly(dest)
    return dest


@functools.cache
def build_module():
    spec = importlib.util.spec_from_file_location("viz_build", VIZ / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def served(tmp_path_factory, results):
    """The viewer and every saved result in one folder, served over http on 127.0.0.1: yields the base URL."""
    root = viewer_files(tmp_path_factory.mktemp("viewer"))
    for name, r in results.items():
        r.save(root / f"{name}.json")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def check_drawn(counts: dict, want: dict[str, int], where: str) -> None:
    assert counts["plots"] >= 1 and counts["svgs"] >= 1, f"{where}: no plotly figure drawn: {counts}"
    for key, least in want.items():
        assert counts[key] >= least, f"{where}: expected at least {least} {key}, drew {counts[key]}: {counts}"


def shoot(browser: Chromium, path: Path) -> None:
    print(f"screenshot: {browser.screenshot(path)}")


# -- the tests ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_plot_html_renders(browser, results, tmp_path, name):
    """Each result's .plot(), written by write_html (plotly.js inlined), draws without script errors."""
    page = write_html(results[name].plot(), tmp_path / f"{name}.html", title=name)
    counts, errors = browser.open(page.as_uri(), PLOT_DRAWN)
    shoot(browser, tmp_path / f"{name}.png")
    assert errors == [], errors
    check_drawn(counts, expected(name, results[name]), page.name)


@pytest.mark.parametrize("name", NAMES)
def test_viewer_draws_saved_result(browser, results, served, tmp_path, name):
    """viz/index.html?src=NAME.json fetches the saved result and draws it."""
    counts, errors = browser.open(f"{served}/index.html?src={name}.json", VIEWER_DONE)
    shoot(browser, tmp_path / f"viewer-{name}.png")
    assert errors == [], errors
    assert counts["state"] == "ready", counts["status"]
    assert results[name].FORMAT in counts["status"]
    check_drawn(counts, expected(name, results[name]), f"viewer with {name}.json")


def test_viewer_locate_draws_its_evidence(browser, results, served):
    """A locate result carries its three tracer results; the viewer draws them below the decisions."""
    counts, errors = browser.open(f"{served}/index.html?src=locate.json", VIEWER_DONE)
    assert errors == [] and counts["state"] == "ready", (errors, counts["status"])
    r = results["locate"]
    ev = r.evidence
    own = 1  # the combined-score heatmap
    assert counts["heatmaps"] >= own + len(ev.causal_trace.scores) + len(ev.patching.scores) + len(ev.gradients.sites)


def test_viewer_file_picker(browser, results, tmp_path):
    """Opened from a file (no server), the viewer reads a result chosen with its file picker."""
    root = viewer_files(tmp_path / "viewer")
    saved = results["causal_trace"].save(tmp_path / "result.json")
    counts, errors = browser.open((root / "index.html").as_uri(), _COUNTS)
    assert errors == [] and counts["state"] == "empty", (errors, counts)
    doc = browser.send("DOM.getDocument", session=browser.session)["root"]["nodeId"]
    node = browser.send("DOM.querySelector", {"nodeId": doc, "selector": "#file"}, session=browser.session)["nodeId"]
    browser.send("DOM.setFileInputFiles", {"files": [str(saved)], "nodeId": node}, session=browser.session)
    res = browser.send("Runtime.evaluate", {"expression": VIEWER_DONE, "awaitPromise": True, "returnByValue": True},
                       session=browser.session)
    counts = res["result"]["value"]
    assert counts["state"] == "ready", counts["status"]
    assert counts["status"].startswith("result.json: mechedit.causal_trace/1")
    check_drawn(counts, expected("causal_trace", results["causal_trace"]), "file picker")


def test_viewer_reports_bad_input(browser, served):
    """Not JSON, not a mechedit result, a missing file: one clear message each, no script error."""
    probe = """(async () => {
      const out = [];
      for (const text of ['{"nope', '{"format": "something.else/1"}', '[1, 2]']) {
        await window.mechedit.load(text, 'bad.json');
        out.push([document.body.dataset.state, document.getElementById('status').textContent]);
      }
      await window.mechedit.loadUrl('missing.json');
      out.push([document.body.dataset.state, document.getElementById('status').textContent]);
      return out;
    })()"""
    out, errors = browser.open(f"{served}/index.html", probe)
    assert [state for state, _ in out] == ["error"] * 4
    assert "not JSON" in out[0][1]
    assert "not a mechedit result" in out[1][1] and "mechedit.causal_trace/1" in out[1][1]
    assert "not a JSON object" in out[2][1]
    assert "missing.json" in out[3][1] and "404" in out[3][1]
    assert all("missing.json" in e for e in errors), errors  # the 404 itself is the only thing logged


def test_viewer_without_plotly_says_how_to_get_it(browser, tmp_path):
    root = tmp_path / "bare"
    root.mkdir()
    for name in ("index.html", "viewer.js", "viewer.css"):
        shutil.copy(VIZ / name, root / name)
    counts, errors = browser.open((root / "index.html").as_uri(), VIEWER_DONE)
    assert counts["state"] == "error" and "viz/build.py" in counts["status"], counts
    assert all("plotly.min.js" in e for e in errors), errors  # only the missing file


def test_standalone_viewer_with_embedded_result(browser, results, tmp_path):
    """build.py --standalone --result: one file, opened offline from disk, shows the result inside; the
    result holds a NaN (Python's JSON), which the viewer reads as a gap."""
    saved = results["magnitudes"].save(tmp_path / "magnitudes.json")
    assert "NaN" in saved.read_text()
    page = build_module().standalone(tmp_path / "report.html", saved)
    counts, errors = browser.open(page.as_uri(), VIEWER_DONE)
    shoot(browser, tmp_path / "standalone.png")
    assert errors == [], errors
    assert counts["state"] == "ready", counts["status"]
    check_drawn(counts, expected("magnitudes", results["magnitudes"]), "standalone page")


def test_attention_page_renders(browser, model, tmp_path):
    """The circuitsvis attention page (its JavaScript inlined) draws a head selector for every head, offline."""
    from mechedit.viz.attention import attention_page, attention_patterns

    page = tmp_path / "attention.html"
    page.write_text(attention_page(attention_patterns(model, PROMPT, [0, 2]), "layers 0 and 2"))
    assert "unpkg.com" not in page.read_text()  # nothing from a CDN
    probe = """new Promise((resolve) => {
      const t0 = Date.now();
      (function poll() {
        const root = document.querySelector('[id^="circuits-vis"]');
        const text = root ? root.innerText : '';
        if ((root && root.querySelector('canvas, svg, table') && text.includes('L2H3')) || Date.now() - t0 > 30000) {
          resolve({text, drawn: root ? root.querySelectorAll('canvas, svg, table, td').length : 0});
        } else setTimeout(poll, 50);
      })();
    })"""
    value, errors = browser.open(page.as_uri(), probe)
    shoot(browser, tmp_path / "attention.png")
    assert errors == [], errors
    assert value["drawn"] > 0
    for name in [f"L{layer}H{h}" for layer in (0, 2) for h in range(model.n_heads)]:
        assert name in value["text"]
