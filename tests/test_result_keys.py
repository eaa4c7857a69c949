"""The keys the issue promises in every ``result.json`` that ``--out DIR`` writes: ``tokens``, ``subject_range``
as [start, end), ``answer``, ``low_score``, ``high_score`` and ``scores`` (nested lists per kind), for each
tracer command, with what low/high mean for each (causal trace: corrupted/clean p; patching: the corrupted/clean
metric; logit lens: p(answer) at the first/last depth)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import mechedit
from mechedit.cli import app
from mechedit.tracing import LogitLensResult, PatchingResult

PROMPT = "Voupeis Draexmir was born in the city of"
SUBJECT = "Voupeis Draexmir"
COMMON = ("--prompt", PROMPT, "--subject", SUBJECT)
PROMISED = {"tokens", "subject_range", "answer", "low_score", "high_score", "scores"}
COMMANDS = {
    "trace": ("--samples", "2", "--window", "1"),
    "patch": ("--samples", "2", "--components", "resid_pre,z"),
    "lens": (),
    "locate": ("--samples", "2", "--window", "1"),
}


@pytest.fixture(autouse=True)
def no_browser(monkeypatch):  # PNGs are skipped: these tests read result.json only
    monkeypatch.setattr("mechedit.viz.export.find_browser", lambda: None)


@pytest.fixture(scope="module")
def model_dir(tiny_dir) -> str:
    return str(tiny_dir("llama"))


@pytest.mark.parametrize("command", ["trace", "patch", "lens", "locate"])
def test_result_json_has_the_promised_keys(model_dir, tmp_path, command):
    res = CliRunner().invoke(app, [command, "--model", model_dir, *COMMON, *COMMANDS[command], "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    d = json.loads((tmp_path / "result.json").read_text())
    assert PROMISED <= set(d), PROMISED - set(d)
    m = mechedit.load(model_dir)
    start, end = d["subject_range"]
    assert 0 <= start < end <= len(d["tokens"]) and "".join(d["tokens"][start:end]).strip() == SUBJECT
    assert all(isinstance(d[k], float) for k in ("low_score", "high_score"))
    for kind, s in d["scores"].items():
        assert len(s) == m.n_layers + (command == "lens"), kind  # [layer] (lens: [depth], embeddings first)
        if kind != "z":
            assert len(s[0]) == len(d["tokens"]), kind  # [..][position]


def test_patching_and_lens_low_high_read_back(model_dir, tmp_path):
    """The derived keys agree with the fields they come from, and loading ignores them."""
    for command in ("patch", "lens"):
        out = tmp_path / command
        res = CliRunner().invoke(app, [command, "--model", model_dir, *COMMON, *COMMANDS[command], "--out", str(out)])
        assert res.exit_code == 0, res.output
        d = json.loads((out / "result.json").read_text())
        if command == "patch":
            r = PatchingResult.load(out / "result.json")
            assert (d["low_score"], d["high_score"]) == (d["corrupted_metric"], d["clean_metric"])
            assert (r.low_score, r.high_score) == (r.corrupted_metric, r.clean_metric)
        else:
            r = LogitLensResult.load(out / "result.json")
            assert (d["low_score"], d["high_score"]) == (d["answer_prob"][0], d["answer_prob"][-1])
            assert d["scores"]["answer_token_prob"] == d["answer_token_prob"]
        assert r.to_json_dict() == {k: v for k, v in d.items() if k != "format"}


def test_locate_scores_read_back(model_dir, tmp_path):
    """Locate's ``scores`` are its evidence causal trace's grid; loading ignores them and writes them again."""
    from mechedit.locating import LocateResult

    args = ["locate", "--model", model_dir, *COMMON, *COMMANDS["locate"], "--out", str(tmp_path)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    d = json.loads((tmp_path / "result.json").read_text())
    trace = d["evidence"]["causal_trace"]
    assert d["scores"] == trace["scores"] and "mlp" in d["scores"]  # locate traces the kinds its rule reads
    assert (d["low_score"], d["high_score"]) == (trace["low_score"], trace["high_score"])
    r = LocateResult.load(tmp_path / "result.json")
    assert r.to_json_dict() == {k: v for k, v in d.items() if k != "format"}
