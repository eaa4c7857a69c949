"""The HTML report of one edit: what ``mechedit report --edit DIR`` and ``mechedit edit --report`` write.

``DIR`` is the ``--out`` of ``mechedit edit``: ``edit/`` (the saved :class:`~mechedit.editing.EditHandle`),
``report.json`` (the request and the before/after answers the command printed) and, when the edit was evaluated,
``evaluation.json``. The page shows, top to bottom:

1. the fact (prompt with the subject marked, old and new answer, paraphrases, neighbours);
2. the causal trace of the fact on the *unedited* model (``DIR/causal_trace.json`` when it is there and was made
   for this model and prompt; otherwise traced now and saved there, so the next report is quick);
3. the locate decision and its evidence (ROME: the chosen layer and the MLP trace scores it was chosen from;
   other methods: the modules and whatever their handle records, training curves drawn);
4. the edit: method, hyperparameters, and per changed parameter the norm of the change, the norm of the weight,
   their ratio and the change's rank;
5. before/after answers on the edit prompt, its paraphrases and the neighbours;
6. the evaluation table and figure (when ``evaluation.json`` is there);
7. free greedy generations, unedited beside edited (the saved handle applied to the loaded model and restored).

>>> from mechedit.report import write_edit_report
>>> write_edit_report("runs/edit1")                      # doctest: +SKIP
PosixPath('runs/edit1/report.html')
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mechedit.errors import DataFormatError, InputError, MecheditError
from mechedit.report.html import Page, details, esc, frame_table, json_block, key_values, table

HANDLE_DIR = "edit"  # where `mechedit edit --out DIR` saves the handle
ANSWERS_FILE = "report.json"  # its request + before/after answers
EVALUATION_FILE = "evaluation.json"  # mechedit.evaluation's result, when the edit was evaluated
TRACE_FILE = "causal_trace.json"  # the unedited model's causal trace of the fact (written by the report)
REPORT_FILE = "report.html"

MAX_NEW_TOKENS = 24  # free generations: greedy tokens after each prompt
MAX_RANK_NUMEL = 4_000_000  # the rank column is computed for changes of at most this many entries ...
MAX_RANK_PARAMS = 32  # ... and only when at most this many parameters changed (full fine-tuning: skipped)
MAX_DELTA_ROWS = 16  # more changed parameters than this: a bar chart, with the table folded below it

Progress = Callable[[str], None]


@dataclass
class EditOutput:
    """What ``mechedit edit --out DIR`` left in ``DIR`` (read by :meth:`read`)."""

    directory: Path
    handle: object  # EditHandle (not applied)
    answers: list[dict] | None  # report.json's rows: kind, prompt, before, after, before_probs, after_probs
    evaluation: Path | None  # evaluation.json, when present

    @classmethod
    def read(cls, directory: str | Path) -> "EditOutput":
        """Read ``directory``; one clear :class:`~mechedit.errors.InputError` when it is not an edit output.
        A saved handle directory itself (``edit.json`` inside) is accepted too."""
        from mechedit.editing.handle import META_FILE, EditHandle

        d = Path(directory)
        if not d.is_dir():
            raise InputError(f"{d} is not a directory; pass the --out directory of `mechedit edit`")
        if (d / HANDLE_DIR / META_FILE).is_file():
            handle_dir = d / HANDLE_DIR
        elif (d / META_FILE).is_file():
            handle_dir = d
        else:
            raise InputError(f"{d} is not an edit output: it has no {HANDLE_DIR}/{META_FILE} (pass the --out "
                             "directory of `mechedit edit`)")
        handle = EditHandle.load(handle_dir)
        answers = None
        if (d / ANSWERS_FILE).is_file():
            try:
                saved = json.loads((d / ANSWERS_FILE).read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataFormatError(f"{d / ANSWERS_FILE} is not JSON ({e})") from None
            rows = saved.get("answers") if isinstance(saved, dict) else None
            if not isinstance(rows, list) or not all(isinstance(r, dict) and "prompt" in r for r in rows):
                raise DataFormatError(f"{d / ANSWERS_FILE} has no list of answers (is it from `mechedit edit`?)")
            answers = rows
        evaluation = d / EVALUATION_FILE if (d / EVALUATION_FILE).is_file() else None
        return cls(d, handle, answers, evaluation)


# -- gathering what the page shows ---------------------------------------------------------------------------


def fact_trace(model, record, directory: Path, samples: int = 10, window: int | None = None,
               progress: Progress | None = None):
    """The unedited model's causal trace of ``record`` and where it came from: the saved ``causal_trace.json``
    when it matches (this model's fingerprint, this prompt, subject and old answer), else a new trace, saved
    there. A new trace uses ``samples`` noise samples and a window of ``window`` layers (default: a fifth of the
    layers, as ``mechedit trace``)."""
    from mechedit.tracing import CausalTraceConfig, CausalTraceResult, causal_trace
    from mechedit.tracing.causal import scaled_window

    path = directory / TRACE_FILE
    fp = model.fingerprint()
    if path.is_file():
        saved = CausalTraceResult.load(path)
        same_answer = not record.target_true or saved.answer.strip() == record.target_true.strip()
        if (saved.model_fingerprint == fp and saved.prompt == record.prompt and saved.subject == record.subject
                and same_answer):
            return saved, f"read from {path.name}"
    if progress:
        progress("tracing the fact on the unedited model")
    result = causal_trace(model, record.prompt, record.subject, record.target_true or None,
                          config=CausalTraceConfig(samples=samples,
                                                   window=scaled_window(model.n_layers) if window is None else window))
    note = ""
    if not path.exists() or path.is_file():
        result.save(path)
        note = f", saved to {path.name}"
    c = result.config
    return result, f"traced now ({c.samples} noise samples, window {c.window}){note}"


def greedy(model, prompts: Sequence[str], max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Each prompt's greedy continuation (special tokens dropped)."""
    tok = model.tokenizer
    pad = next((t for t in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) if t is not None), 0)
    model.check_kv_cache()  # generation reuses each step's keys and values
    out = []
    for p in prompts:
        ids = torch.tensor([model.encode(p)], device=model.device)  # (1, T)
        n = min(max_new_tokens, model.n_ctx - ids.shape[1])  # stay inside the model's context
        if n < 1:
            out.append("")
            continue
        with torch.no_grad():
            gen = model.hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=n, pad_token_id=pad)
        out.append(tok.decode(gen[0, ids.shape[1]:].tolist(), skip_special_tokens=True))
    return out


def generation_prompts(record, extra: Sequence[str] = ()) -> list[str]:
    """The edit prompt, up to two paraphrases, the bare subject ("<subject> is"), one neighbour, then ``extra``."""
    prompts = [record.prompt, *record.paraphrases[:2], f"{record.subject} is",
               *(p for p, _ in record.neighborhood[:1]), *extra]
    return list(dict.fromkeys(p for p in prompts if p.strip()))


def delta_rows(model, handle) -> list[dict]:
    """Per changed parameter: shape, ‖Δ‖ (Frobenius), ‖W‖ of the unedited weight, their ratio, max |Δ| and the
    rank of Δ (2-D changes, when there are few enough and they are small enough)."""
    from mechedit.model import resolve_module

    with_rank = len(handle.deltas) <= MAX_RANK_PARAMS
    rows = []
    for name, d in handle.deltas.items():
        path, _, attr = name.rpartition(".")
        w = getattr(resolve_module(model.hf_model, path), attr)
        d32 = d.detach().float().cpu()
        dn, wn = float(d32.norm()), float(w.detach().float().norm())
        row = {"parameter": name, "shape": "×".join(map(str, d.shape)), "‖Δ‖": dn, "‖W‖": wn,
               "‖Δ‖/‖W‖": dn / wn if wn else float("nan"), "max |Δ|": float(d32.abs().max()) if d.numel() else 0.0}
        if with_rank and d.dim() == 2 and d.numel() <= MAX_RANK_NUMEL:
            row["rank(Δ)"] = int(torch.linalg.matrix_rank(d32))
        rows.append(row)
    return rows


def compute_answers(model, handle, record) -> list[dict]:
    """report.json's rows, computed (for an edit directory without report.json)."""
    from mechedit.answering import answers

    prompts = [record.prompt, *record.paraphrases, *(p for p, _ in record.neighborhood)]
    kinds = ["edit"] + ["paraphrase"] * len(record.paraphrases) + ["neighbour"] * len(record.neighborhood)
    targets = (record.target_new, record.target_true or "")
    before = answers(model, prompts, targets)
    with handle.apply(model):
        after = answers(model, [handle.prompt(p) for p in prompts], targets)
    return [{"kind": k, "prompt": b.prompt, "before": b.top, "after": a.top, "before_probs": b.target_probs,
             "after_probs": a.target_probs} for k, b, a in zip(kinds, before, after)]


# -- the page's sections -------------------------------------------------------------------------------------


def _marked_prompt(record) -> str:
    before, _, after = record.template.partition("{}")
    return f"{esc(before)}<mark>{esc(record.subject)}</mark>{esc(after)}"


def _fact_section(page: Page, record, handle) -> None:
    rows = [{"what": "prompt", "text": record.prompt}, {"what": "subject", "text": record.subject},
            {"what": "answer now (target_true)", "text": record.target_true or "(not given)"},
            {"what": "new answer (target_new)", "text": record.target_new}]
    rows += [{"what": "paraphrase", "text": p} for p in record.paraphrases]
    rows += [{"what": "neighbour (must not change)", "text": f"{p} → {a}"} for p, a in record.neighborhood]
    if record.relation_id:
        rows.append({"what": "relation", "text": record.relation_id})
    more = f" (+{len(handle.requests) - 1} more request(s) in this edit)" if len(handle.requests) > 1 else ""
    page.section("The fact", f'<p class="mono">{_marked_prompt(record)} → <b>{esc(record.target_new)}</b> '
                             f'<span class="note">(was {esc(record.target_true or "?")}){esc(more)}</span></p>',
                 table(rows, ["what", "text"]))


def _trace_section(page: Page, trace, source: str) -> None:
    peaks = []
    last = trace.subject_range[1] - 1  # the last subject token: where ROME reads its key
    for kind, s in trace.scores.items():
        layer, pos, score = trace.peak(kind)
        at_last = int(s[:, last].argmax())
        peaks.append({"kind": kind, "peak layer": layer, "peak token": f"{trace.tokens[pos]!r} (position {pos})",
                      "peak effect": score - trace.low_score, "peak layer at the last subject token": at_last,
                      "its effect": float(s[at_last, last]) - trace.low_score})
    page.section("Causal trace (unedited model)",
                 f'<p class="note">{esc(source)}. Clean p({esc(trace.answer)!s}) = {trace.high_score:.4f}, '
                 f"with the subject corrupted {trace.low_score:.4f}; "
                 "effect = p(answer) with the state restored − the corrupted p.</p>",
                 page.figure(trace.plot(), "causal-trace"), table(peaks))


def _is_series(name: str, v) -> bool:
    """A training curve: a list named ``*loss*`` of numbers or of dicts of numbers (one per step), at least two
    long. (Other lists of numbers, such as token positions, are not curves.)"""
    if "loss" not in name or not isinstance(v, list) or len(v) < 2:
        return False
    num = (int, float)
    return (all(isinstance(x, num) and not isinstance(x, bool) for x in v)
            or all(isinstance(x, dict) and x and all(isinstance(y, num) and not isinstance(y, bool)
                                                     for y in x.values()) for x in v))


def _is_rows(v) -> bool:
    """A small table: a list of flat dicts (e.g. MEMIT's per-layer notes)."""
    return (isinstance(v, list) and 0 < len(v) <= 200
            and all(isinstance(x, dict) and all(y is None or isinstance(y, (str, int, float, bool))
                                                for y in x.values()) for x in v))


def _series_figure(name: str, v: list):
    import plotly.graph_objects as go

    fig = go.Figure()
    if isinstance(v[0], dict):
        for key in v[0]:
            fig.add_trace(go.Scatter(y=[x.get(key) for x in v], mode="lines+markers", name=key))
    else:
        fig.add_trace(go.Scatter(y=v, mode="lines+markers", name=name))
    fig.update_layout(title=name, xaxis_title="step", height=320, width=720, margin=dict(t=40, b=40))
    return fig


def _layer_scores_figure(ev: dict, chosen):
    """ROME's layer choice, the chosen layer highlighted: this fact's MLP trace score at the key token per layer
    (``layer="fact"``), or the MLP effect at the last subject token averaged over known facts (``"auto"``)."""
    import plotly.graph_objects as go

    averaged = "trace" not in ev
    t = ev["averaged_trace"] if averaged else ev["trace"]
    scores = t["effects"] if averaged else t["scores"]
    name = "average indirect effect" if averaged else "p(answer) restored"
    colours = ["#2da44e" if i == chosen else "#8c959f" for i in range(len(scores))]
    fig = go.Figure(go.Bar(x=list(range(len(scores))), y=scores, marker_color=colours, name=name,
                           hovertemplate="layer %{x}<br>%{y:.4f}<extra></extra>"))
    if averaged:
        title = (f"{t.get('kind', 'mlp')} effect at the last subject token, averaged over {t.get('n_facts', '?')} "
                 f"known facts (window {t.get('window', '?')}): chosen layer {chosen}")
        y_title = "average indirect effect"
    else:
        for y, label in ((t.get("low_score"), "corrupted"), (t.get("high_score"), "clean")):
            if isinstance(y, (int, float)):
                fig.add_hline(y=y, line_dash="dash", annotation_text=f"{label} {y:.3f}")
        title = (f"{t.get('kind', 'mlp')} trace at {t.get('token', 'the key token')!r} "
                 f"(window {t.get('window', '?')}): chosen layer {chosen}")
        y_title = f"p({t.get('answer', 'answer')})"
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title=y_title, height=340, width=720,
                      margin=dict(t=50, b=40))
    return fig


_DECISION_KEYS = ("layer", "layers", "layer_choice", "module", "modules", "trained_modules", "feedforward_modules",
                  "selection", "key_position", "key_token")


def _locate_section(page: Page, handle) -> None:
    ev = handle.evidence or {}
    decision = {k: ev[k] for k in _DECISION_KEYS if k in ev}
    parts = [key_values(decision) if decision else
             '<p class="note">This method records no layer or module choice.</p>']
    trace, averaged = ev.get("trace"), ev.get("averaged_trace")
    if (isinstance(trace, dict) and isinstance(trace.get("scores"), list) and trace["scores"]) or (
            isinstance(averaged, dict) and isinstance(averaged.get("effects"), list) and averaged["effects"]):
        parts.append(page.figure(_layer_scores_figure(ev, ev.get("layer")), "layer-choice"))
    scalars = {k: v for k, v in ev.items() if k not in decision and k not in ("trace", "averaged_trace")
               and (v is None or isinstance(v, (str, int, float, bool)))}
    if scalars:
        parts.append("<h3>Other evidence</h3>" + key_values(scalars))
    shown = set(decision) | set(scalars)
    chosen_by = ev.get("locate")  # restricted methods with modules="auto": locate's adapter decision
    if isinstance(chosen_by, dict) and isinstance(chosen_by.get("rule"), str):
        numbers = chosen_by.get("numbers") if isinstance(chosen_by.get("numbers"), dict) else {}
        flat = {k: v for k, v in numbers.items() if v is None or isinstance(v, (str, int, float, bool))}
        parts.append(f"<h3>How locate chose the modules</h3><p>{esc(chosen_by['rule'])}</p>"
                     + (key_values(flat) if flat else "")
                     + details("locate's decision as saved", json_block(chosen_by)))
        shown.add("locate")
    for k, v in ev.items():
        if k not in shown and _is_series(k, v):
            parts.append(page.figure(_series_figure(k, v), f"evidence-{k}"))
            shown.add(k)
        elif k not in shown and _is_rows(v):
            parts.append(f"<h3>{esc(k)}</h3>" + table(v))
            shown.add(k)
    rest = {k: v for k, v in ev.items() if k not in shown}
    if rest:
        parts.append(details(f"the rest of the evidence ({', '.join(rest)})", json_block(rest)))
    page.section("Locate decision and evidence", *parts)


def _delta_figure(deltas: list[dict]):
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=[r["parameter"] for r in deltas], y=[r["‖Δ‖/‖W‖"] for r in deltas],
                           customdata=[r["‖Δ‖"] for r in deltas],
                           hovertemplate="%{x}<br>‖Δ‖/‖W‖ = %{y:.4g}<br>‖Δ‖ = %{customdata:.4g}<extra></extra>"))
    fig.update_layout(title="relative change per parameter (‖Δ‖/‖W‖)", yaxis_title="‖Δ‖/‖W‖", height=420,
                      width=max(720, 14 * len(deltas)), margin=dict(t=50, b=160), xaxis_tickangle=-60)
    return fig


def _edit_section(page: Page, handle, deltas: list[dict]) -> None:
    parts = [f"<p>Method <b>{esc(handle.method)}</b> on model <code>{esc(handle.model_name)}</code> "
             f"(fingerprint <code>{esc(handle.model_fingerprint)}</code>).</p>"]
    if handle.context:
        parts.append(f"<p>In-context edit: every prompt is preceded by</p><pre>{esc(handle.context)}</pre>")
    if deltas:
        cols = ["parameter", "shape", "‖Δ‖", "‖W‖", "‖Δ‖/‖W‖", "max |Δ|"] + (
            ["rank(Δ)"] if any("rank(Δ)" in r for r in deltas) else [])
        total = sum(r["‖Δ‖"] ** 2 for r in deltas) ** 0.5
        parts.append(f"<h3>Change per parameter</h3><p>{len(deltas)} parameter(s) changed; ‖Δ‖ over all of "
                     f"them {total:.4g}.</p>")
        if len(deltas) <= MAX_DELTA_ROWS:
            parts.append(table(deltas, cols))
        else:  # full fine-tuning and the like: the relative change per parameter as bars, the table folded
            parts.append(page.figure(_delta_figure(deltas), "deltas"))
            parts.append(details(f"all {len(deltas)} parameters", table(deltas, cols)))
    if handle.adapter is not None:
        parts.append(details("adapter configuration (peft)", json_block(handle.adapter["config"])))
    parts.append("<h3>Hyperparameters</h3>" + key_values(handle.hparams))
    page.section("The edit", *parts)


def _answers_section(page: Page, rows: list[dict], record) -> None:
    new, true = record.target_new, record.target_true or ""
    out, classes = [], {}
    for i, r in enumerate(rows):
        bp, ap = r.get("before_probs") or {}, r.get("after_probs") or {}
        row = {"kind": r.get("kind", ""), "prompt": r["prompt"], "before": r.get("before", ""),
               "after": r.get("after", ""), f"p({new}) before": bp.get(new), f"p({new}) after": ap.get(new)}
        if true:
            row[f"p({true}) before"], row[f"p({true}) after"] = bp.get(true), ap.get(true)
        out.append(row)
        after = str(r.get("after", "")).strip()
        if r.get("kind") in ("edit", "paraphrase"):
            classes[i] = "good" if after == new.strip() else "bad"
        elif r.get("kind") == "neighbour":
            classes[i] = "good" if after == str(r.get("before", "")).strip() else "bad"
    page.section("Before / after answers",
                 '<p class="note">Greedy next token and first-token probabilities of the old and new answers. '
                 "Green: the edit prompt or a paraphrase now gives the new answer, or a neighbour kept its "
                 "answer; red: not.</p>", table(out, classes=classes))


def _evaluation_section(page: Page, path: Path) -> None:
    from mechedit.evaluation import EvalResult

    result = EvalResult.load(path)
    parts = [f'<p class="note">{esc(path.name)}: {len(result.records)} request(s), {len(result.edits)} '
             "edit(s); mean with its 95% interval (lo, hi), and the unedited model's mean.</p>"]
    parts.append(frame_table(result.summary_frame()))
    parts.append(page.figure(result.plot(), "evaluation"))
    parts.append(details("every row", frame_table(result.to_frame())))
    page.section("Evaluation", *parts)


def _generations_section(page: Page, prompts: list[str], before: list[str], after: list[str], handle) -> None:
    rows = [{"prompt": p, "unedited": b, "edited": a, "changed": "yes" if a != b else ""}
            for p, b, a in zip(prompts, before, after)]
    note = (f"Greedy, up to {MAX_NEW_TOKENS} new tokens. " +
            ("The edited model saw each prompt after the in-context edit's context. " if handle.context else ""))
    page.section("Free generations", f'<p class="note">{esc(note)}</p>',
                 table(rows, ["prompt", "unedited", "edited", "changed"]))


# -- the whole page ----------------------------------------------------------------------------------------------


def write_edit_report(directory: str | Path, out: str | Path | None = None, *, model=None,
                      generate: Sequence[str] = (), trace_samples: int = 10, trace_window: int | None = None,
                      progress: Progress | None = None) -> Path:
    """Write the HTML report of the edit saved in ``directory`` (the ``--out`` of ``mechedit edit``).

    Args:
        directory: the edit output (``edit/``, ``report.json``, maybe ``evaluation.json``).
        out: the page to write (default ``directory/report.html``).
        model: the *unedited* model the edit was made for, as a :class:`~mechedit.model.LoadedModel` or a name
            for :func:`mechedit.load`; default: the handle's own ``model_name``. A different or already edited
            model is refused (fingerprint), with nothing written.
        generate: extra prompts for the free generations.
        trace_samples, trace_window: noise samples and restored window when the fact has to be traced (window
            default: a fifth of the layers, :func:`~mechedit.tracing.causal.scaled_window`).
        progress: called with a short message before each slow step.
    Returns:
        The path of the page written.
    """
    from mechedit.model import LoadedModel, load

    edit = EditOutput.read(directory)
    handle = edit.handle
    if not handle.requests:
        raise DataFormatError(f"{directory}: the saved edit has no request")
    record = handle.records()[0]
    if progress:
        progress("loading the model")
    m = model if isinstance(model, LoadedModel) else load(model if model is not None else handle.model_name)
    if m.fingerprint() != handle.model_fingerprint:
        raise MecheditError(f"the edit in {directory} was made for model {handle.model_name!r} (fingerprint "
                            f"{handle.model_fingerprint}); {m.name!r} has fingerprint {m.fingerprint()}: a different "
                            "model, or one already edited")

    trace, trace_source = fact_trace(m, record, edit.directory, trace_samples, trace_window, progress)
    deltas = delta_rows(m, handle)
    rows = edit.answers if edit.answers is not None else compute_answers(m, handle, record)
    prompts = generation_prompts(record, generate)
    if progress:
        progress("generating with the unedited and the edited model")
    before = greedy(m, prompts)
    with handle.apply(m):
        after = greedy(m, [handle.prompt(p) for p in prompts])

    page = Page(f"Edit report: {record.prompt} → {record.target_new}",
                subtitle=f"{esc(handle.method)} edit of <code>{esc(handle.model_name)}</code>, from "
                         f"<code>{esc(edit.directory)}</code>")
    _fact_section(page, record, handle)
    _trace_section(page, trace, trace_source)
    _locate_section(page, handle)
    _edit_section(page, handle, deltas)
    _answers_section(page, rows, record)
    if edit.evaluation is not None:
        _evaluation_section(page, edit.evaluation)
    _generations_section(page, prompts, before, after, handle)
    return page.write(Path(out) if out is not None else edit.directory / REPORT_FILE)
