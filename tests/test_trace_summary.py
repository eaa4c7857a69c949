"""Averaging causal traces by token role (mechedit.tracing.summary): the roles, the averages checked by hand on
made-up traces, persistence, reading facts from CounterFact and known_1000 files, and tracing many facts."""

from __future__ import annotations

import json
import math

import pytest
import torch

import mechedit
from mechedit.data import EditRecord, write_counterfact
from mechedit.errors import DataFormatError, InputError
from mechedit.tracing import CausalTraceConfig, CausalTraceResult, live_hooks, noise_scale
from mechedit.tracing.summary import (
    ROLES, TraceFact, TraceSummary, read_trace_facts, role_positions, summarize_traces, trace_facts,
)


def fake_trace(tokens: int, subject_range: tuple[int, int], low: float, fill, kinds=("hidden", "mlp"),
               n_layers: int = 2, window: int = 10, fingerprint: str = "f") -> CausalTraceResult:
    """A trace whose score at (layer, position) is ``fill(kind, layer, position)``."""
    scores = {k: torch.tensor([[fill(k, layer, pos) for pos in range(tokens)] for layer in range(n_layers)])
              for k in kinds}
    return CausalTraceResult(
        prompt="p" * tokens, subject="s", tokens=[f"t{i}" for i in range(tokens)], subject_range=subject_range,
        answer=" a", answer_ids=[1], low_score=low, high_score=0.9, scores=scores,
        config=CausalTraceConfig(window=window, kinds=kinds), noise_scale=1.0, model_name="m",
        model_fingerprint=fingerprint)


# -- roles ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("subject_range, n, expected", [
    # BOS, 3 subject tokens, 3 after: every role
    ((1, 4), 7, dict(first_subject=[1], middle_subject=[2], last_subject=[3], first_after=[4], further=[5],
                     last=[6])),
    # one-token subject right before the last token: first = last subject; no middle, no subsequent tokens
    ((1, 2), 3, dict(first_subject=[1], middle_subject=[], last_subject=[1], first_after=[], further=[], last=[2])),
    # the subject ends the prompt: its last token is also the last token
    ((0, 2), 2, dict(first_subject=[0], middle_subject=[], last_subject=[1], first_after=[], further=[], last=[1])),
    # long subject, long tail
    ((2, 7), 12, dict(first_subject=[2], middle_subject=[3, 4, 5], last_subject=[6], first_after=[7],
                      further=[8, 9, 10], last=[11])),
])
def test_role_positions(subject_range, n, expected):
    assert role_positions(subject_range, n) == expected


# -- averages ---------------------------------------------------------------------------------------------------


def test_averages_by_role_by_hand():
    # score = position + 10·layer (+100 for mlp): each role's average is easy to write down
    fill = lambda k, layer, pos: pos + 10 * layer + (100 if k == "mlp" else 0)  # noqa: E731
    a = fake_trace(7, (1, 4), low=1.0, fill=fill)  # middle [2], first_after [4], further [5]
    b = fake_trace(5, (1, 2), low=3.0, fill=fill)  # no middle; first_after [2], further [3], last [4]
    s = summarize_traces([a, b])
    assert s.roles == list(ROLES) and s.n_records == 2 and s.counts == [2, 1, 2, 2, 2, 2]
    expected_positions = {  # role -> mean position per record (a, b)
        "first_subject": (1, 1), "middle_subject": (2, None), "last_subject": (3, 1), "first_after": (4, 2),
        "further": (5, 3), "last": (6, 4)}
    for i, role in enumerate(s.roles):
        pa, pb = expected_positions[role]
        for layer in range(2):
            for kind, extra in (("hidden", 0), ("mlp", 100)):
                if pb is None:
                    want_score, want_effect = pa + 10 * layer + extra, pa + 10 * layer + extra - 1.0
                else:
                    want_score = (pa + pb) / 2 + 10 * layer + extra
                    want_effect = ((pa - 1.0) + (pb - 3.0)) / 2 + 10 * layer + extra
                assert float(s.scores[kind][i, layer]) == pytest.approx(want_score)
                assert float(s.effects[kind][i, layer]) == pytest.approx(want_effect)
    assert s.low_score == pytest.approx(2.0) and s.high_score == pytest.approx(0.9)
    assert s.peak("mlp") == ("last token", 1, pytest.approx((5 + 1) / 2 + 110))


def test_middle_tokens_are_averaged_within_a_record_first():
    # record a has three middle tokens, record b one: b counts as much as a
    fill = lambda k, layer, pos: float(pos)  # noqa: E731
    a = fake_trace(8, (0, 5), low=0.0, fill=fill, kinds=("mlp",))  # middle 1, 2, 3 -> mean 2
    b = fake_trace(5, (0, 3), low=0.0, fill=fill, kinds=("mlp",))  # middle 1
    s = summarize_traces([a, b])
    assert float(s.effects["mlp"][s.roles.index("middle_subject"), 0]) == pytest.approx((2 + 1) / 2)


def test_role_nobody_has_is_nan_and_null_in_json(tmp_path):
    t = fake_trace(3, (1, 2), low=0.0, fill=lambda k, layer, pos: 0.5)
    s = summarize_traces([t], skipped=[{"index": 4, "why": "not known", "reason": "not known: ..."}])
    i = s.roles.index("middle_subject")
    assert s.counts[i] == 0 and math.isnan(float(s.effects["hidden"][i, 0]))
    path = s.save(tmp_path / "s.json")
    d = json.loads(path.read_text())  # strict JSON: null, not NaN
    assert d["effects"]["hidden"][i] == [None, None]
    back = TraceSummary.load(path)
    torch.testing.assert_close(back.effects["hidden"], s.effects["hidden"], equal_nan=True)
    assert back.skipped == s.skipped and back.counts == s.counts and back.records == s.records
    assert "1 × not known" in s.to_markdown() and "| middle subject tokens | 0 | – | – |" in s.to_markdown()


def test_frame_markdown_plot():
    s = summarize_traces([fake_trace(6, (1, 3), low=0.1, fill=lambda k, layer, pos: 0.1 * pos)])
    df = s.to_frame()
    assert len(df) == 2 * 6 * 2 and set(df["kind"]) == {"hidden", "mlp"}
    assert list(df.columns) == ["kind", "role", "label", "layer", "n_records", "score", "indirect_effect"]
    md = s.to_markdown()
    assert "## hidden" in md and "**+0.400**" in md  # the peak, in bold: last token (position 5)
    fig = s.plot()
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"]


@pytest.mark.parametrize("kinds", [("hidden", "mlp", "attn"), ("mlp", "attn"), ("hidden",)])
def test_plot_panel_titles_fit_their_panels(kinds):
    """Each panel's title is no wider than its panel (estimated at 0.6 em a character, plotly's default 16 px
    subplot-title font), so neighbouring titles cannot overlap; the shared words live in the figure title."""
    s = summarize_traces([fake_trace(6, (1, 3), low=0.1, fill=lambda k, layer, pos: 0.1 * pos, kinds=kinds)])
    fig = s.plot()
    plot_px = fig.layout.width - fig.layout.margin.l - fig.layout.margin.r if fig.layout.margin.l is not None \
        else fig.layout.width - 160  # plotly's default margins: 80 px each side
    titles = [a for a in fig.layout.annotations if a.text and not a.text.startswith("<")]
    assert len(titles) == len(kinds)
    for i, a in enumerate(titles, start=1):
        domain = fig.layout[f"xaxis{'' if i == 1 else i}"].domain
        assert len(a.text) * 0.6 * 16 <= (domain[1] - domain[0]) * plot_px, a.text
    assert "Average indirect effect" in fig.layout.title.text


def test_traces_that_cannot_be_averaged():
    t = fake_trace(4, (1, 2), low=0.0, fill=lambda k, layer, pos: 0.0)
    with pytest.raises(InputError, match="no traces"):
        summarize_traces([])
    with pytest.raises(InputError, match="same settings"):
        summarize_traces([t, fake_trace(4, (1, 2), low=0.0, fill=lambda k, layer, pos: 0.0, kinds=("mlp",))])
    with pytest.raises(InputError, match="same settings"):
        summarize_traces([t, fake_trace(4, (1, 2), low=0.0, fill=lambda k, layer, pos: 0.0, window=3)])
    with pytest.raises(InputError, match="other weights"):
        summarize_traces([t, fake_trace(4, (1, 2), low=0.0, fill=lambda k, layer, pos: 0.0, fingerprint="g")])
    with pytest.raises(InputError, match="not a CausalTraceResult"):
        summarize_traces([t, "trace"])


# -- reading facts ----------------------------------------------------------------------------------------------


def test_read_counterfact_and_known_and_subsets(tmp_path):
    cf = write_counterfact([EditRecord(i, "{} lives in", f"Name{i}", "Rome", "Paris" if i % 2 else None)
                            for i in range(6)], tmp_path / "cf.json")
    facts = read_trace_facts(cf)
    assert [f.index for f in facts] == list(range(6))
    assert facts[1] == TraceFact(1, 1, "Name1 lives in", "Name1", "Paris", "counterfact")
    assert facts[0].target is None
    some = read_trace_facts(cf, n=3, seed=7)
    assert len(some) == 3 and [f.index for f in some] == sorted(f.index for f in some)
    assert some == read_trace_facts(cf, n=3, seed=7)  # the seed decides
    assert {tuple(f.index for f in read_trace_facts(cf, n=3, seed=s)) for s in range(8)} != {(0, 1, 2)}
    assert read_trace_facts(cf, n=100) == facts
    known = tmp_path / "known.json"
    known.write_text(json.dumps([{"known_id": 5, "subject": "Vinson Massif", "attribute": "Antarctica",
                                  "template": "{} is located in the continent", "prediction": " of Antarctica",
                                  "prompt": "Vinson Massif is located in the continent of", "relation_id": "P30"}]))
    assert read_trace_facts(known) == [TraceFact(0, 5, "Vinson Massif is located in the continent of",
                                                 "Vinson Massif", "Antarctica", "known_1000")]
    with pytest.raises(InputError, match="positive integer"):
        read_trace_facts(cf, n=0)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataFormatError, match="non-empty"):
        read_trace_facts(tmp_path / "empty.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataFormatError, match="not a JSON"):
        read_trace_facts(tmp_path / "bad.json")


# -- tracing many facts -----------------------------------------------------------------------------------------


def test_trace_facts_skips_with_reasons(tiny_dir):
    m = mechedit.load(tiny_dir("llama"))
    facts = [TraceFact(0, "a", "Mira Kestel lives in", "Mira Kestel", None, "counterfact"),
             TraceFact(1, "b", "Mira Kestel lives in", "Mira Kestel", "Qzxv Plorr", "counterfact"),
             TraceFact(2, "c", "Mira Kestel lives in", "Tobar Quill", "Paris", "counterfact")]
    cfg = CausalTraceConfig(samples=2, kinds=("mlp",))
    done = list(trace_facts(m, facts, cfg))
    assert [d.result for d in done] == [None, None, None]
    assert [d.skip_record()["why"] for d in done] == ["no true answer", "not known", "unreadable"]
    assert "not in the prompt" in done[2].skipped
    traced = list(trace_facts(m, facts[:2], cfg, known_only=False, noise_subjects=["Mira Kestel", "Tobar Quill"]))
    assert all(d.skipped is None for d in traced)
    first, second = (d.result for d in traced)
    # one noise level for all: ROME's 3 × std of the noise subjects' embeddings
    assert first.config.noise == second.config.noise == noise_scale(m, ["Mira Kestel", "Tobar Quill"])
    assert second.answer.strip() == "Qzxv Plorr"  # the record's target, scored even though not known
    assert first.extra["fact"]["id"] == "a"
    assert live_hooks(m) == []
