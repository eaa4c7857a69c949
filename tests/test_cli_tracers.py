"""The tracer commands (`mechedit trace`, `patch`, `lens`, `locate`) on a tiny random Llama: each passes its
options to the library as given, writes result.json with its documented keys plus the HTML figure, reports bad
input in one line with exit status 2, and `trace --data` traces a file's records and writes the summary.

PNG export needs Chrome; the ``no_browser`` fixture hides any installed one so that these tests stay fast and
check the documented fallback (the PNG is skipped with a note)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import mechedit
import mechedit.locating as locate_lib
from mechedit.cli import app
from mechedit.data import EditRecord, write_counterfact
from mechedit.locating import LocateConfig
from mechedit.tracing import causal as causal_lib
from mechedit.tracing import lens as lens_lib
from mechedit.tracing import patching as patching_lib
from mechedit.tracing import summary as summary_lib
from mechedit.tracing.causal import CausalTraceConfig
from mechedit.tracing.common import encode_target, prepare_prompt
from mechedit.tracing.patching import PatchingConfig
from mechedit.tracing.summary import read_trace_facts

PROMPT = "Voupeis Draexmir was born in the city of"
SUBJECT = "Voupeis Draexmir"
# subjects and templates to build data files from (any text works with the byte-level tokenizer)
NAMES = ("Voupeis Draexmir", "Lodum Fideth", "Dalo Frenwick", "Mira Kestel", "Tobar Quill", "Essa Morrow",
         "Kel Danvers", "Ruan Pettik", "Solvei Brand", "Ottar Vane", "Pim Aldous", "Ysolde Crane")
TEMPLATES = ("{} was born in the city of", "{} works as a", "The mother tongue of {} is", "{} lives in")


@pytest.fixture(scope="module")
def model_dir(tiny_dir) -> str:
    return str(tiny_dir("llama"))


@pytest.fixture(scope="module")
def model(model_dir) -> mechedit.LoadedModel:
    return mechedit.load(model_dir)


@pytest.fixture(autouse=True)
def no_browser(monkeypatch):
    monkeypatch.setattr("mechedit.viz.export.find_browser", lambda: None)


def run(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def spy(monkeypatch, module, name: str) -> list[tuple[tuple, dict]]:
    """Record every call of ``module.name`` (which still runs)."""
    calls: list[tuple[tuple, dict]] = []
    real = getattr(module, name)

    def fn(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, fn)
    return calls


def one_line_error(res, *needles: str) -> None:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for needle in needles:
        assert needle in lines[0]


def written(out, keys: set[str]) -> dict:
    d = json.loads((out / "result.json").read_text())
    assert keys <= set(d), keys - set(d)
    assert (out / "result.html").stat().st_size > 1000
    assert not (out / "result.png").exists()  # no browser here: skipped ...
    return d


# -- options reach the library as given -------------------------------------------------------------------------


def test_trace_passes_options_and_writes_result(monkeypatch, model_dir, tmp_path):
    calls = spy(monkeypatch, causal_lib, "causal_trace")
    out = tmp_path / "trace"
    res = run("trace", "--model", model_dir, "--prompt", PROMPT, "--subject", SUBJECT, "--target", "Paris",
              "--samples", "2", "--noise", "0.5", "--window", "2", "--kinds", "mlp, attn", "--seed", "3",
              "--batch-size", "17", "--out", str(out))
    assert res.exit_code == 0, res.output
    (m, prompt, subject, target, cfg), kwargs = calls[0]
    assert (m.path.as_posix(), prompt, subject, target) == (model_dir, PROMPT, SUBJECT, "Paris")
    assert cfg == CausalTraceConfig(samples=2, noise=0.5, window=2, kinds=("mlp", "attn"), seed=3, batch_size=17)
    assert callable(kwargs["progress"])
    assert "mlp    effect peaks at layer" in res.stdout
    d = written(out, {"tokens", "subject_range", "answer", "low_score", "high_score", "scores"})
    start, end = d["subject_range"]
    assert "".join(d["tokens"][start:end]).strip() == SUBJECT
    assert set(d["scores"]) == {"mlp", "attn"}
    assert len(d["scores"]["mlp"]) == m.n_layers and len(d["scores"]["mlp"][0]) == len(d["tokens"])  # [layer][pos]
    assert "result.png skipped" in res.stderr


def test_patch_passes_options_and_writes_result(monkeypatch, model_dir, tmp_path):
    calls = spy(monkeypatch, patching_lib, "activation_patching")
    out = tmp_path / "patch"
    res = run("patch", "--model", model_dir, "--prompt", PROMPT, "--subject", SUBJECT, "--target", "Paris",
              "--components", "resid_pre,mlp_post", "--direction", "noise", "--metric", "prob", "--samples", "2",
              "--noise", "0.7", "--seed", "1", "--top-k", "4", "--batch-size", "33", "--out", str(out))
    assert res.exit_code == 0, res.output
    (m, clean, corrupted), kwargs = calls[0]
    assert (clean, corrupted) == (PROMPT, None)
    assert {k: v for k, v in kwargs.items() if k not in ("config", "progress")} == dict(
        subject=SUBJECT, target="Paris", foil=None, components=("resid_pre", "mlp_post"))
    assert kwargs["config"] == PatchingConfig(components=("resid_pre", "mlp_post"), direction="noise", metric="prob",
                                              batch_size=33, top_k=4, samples=2, noise=0.7, seed=1)
    assert "resid_pre      peaks at blocks." in res.stdout
    d = written(out, {"tokens", "subject_range", "answer", "clean_metric", "corrupted_metric", "scores", "values"})
    assert len(d["scores"]["resid_pre"]) == m.n_layers and len(d["scores"]["resid_pre"][0]) == len(d["tokens"])
    assert len(d["scores"]["mlp_post"][0]) == m.d_mlp  # [layer][neuron]
    assert d["subject_range"] == list(prepare_prompt(m, PROMPT, SUBJECT).subject_range)


def test_patch_with_a_corrupted_prompt_and_foil(monkeypatch, model_dir, tmp_path):
    calls = spy(monkeypatch, patching_lib, "activation_patching")
    # the prompt patched into itself: clean and corrupted score the same, so every normalised score is NaN
    res = run("patch", "--model", model_dir, "--prompt", PROMPT, "--corrupted-prompt", PROMPT, "--foil", "Rome",
              "--components", "attn_out", "--out", str(tmp_path / "p"))
    assert res.exit_code == 0, res.output
    (_, clean, corrupted), kwargs = calls[0]
    assert (clean, corrupted, kwargs["subject"], kwargs["foil"]) == (PROMPT, PROMPT, None, "Rome")
    assert "no finite scores" in res.stdout
    d = written(tmp_path / "p", {"tokens", "scores"})
    assert d["subject_range"] is None and d["scores"]["attn_out"][0][0] is None  # NaN is written as null


def test_lens_passes_options_and_writes_result(monkeypatch, model_dir, tmp_path):
    calls = spy(monkeypatch, lens_lib, "logit_lens")
    out = tmp_path / "lens"
    res = run("lens", "--model", model_dir, "--prompt", PROMPT, "--subject", SUBJECT, "--target", "Paris",
              "--top-k", "3", "--out", str(out))
    assert res.exit_code == 0, res.output
    (m, prompt, target, top_k), kwargs = calls[0]
    assert (prompt, target, top_k, kwargs) == (PROMPT, "Paris", 3, {"subject": SUBJECT})
    assert "at the last token the answer is" in res.stdout and "embeddings" in res.stdout
    d = written(out, {"tokens", "subject_range", "answer", "answer_token_prob", "answer_rank", "top_tokens",
                      "answer_prob"})
    assert len(d["answer_rank"]) == m.n_layers + 1 and len(d["answer_rank"][0]) == len(d["tokens"])  # [depth][pos]
    assert len(d["top_tokens"][0][0]) == 3


def test_locate_passes_options_and_writes_result(monkeypatch, model_dir, tmp_path):
    calls = spy(monkeypatch, locate_lib, "locate")
    out = tmp_path / "locate"
    res = run("locate", "--model", model_dir, "--prompt", PROMPT, "--subject", SUBJECT, "--target", "Paris",
              "--window", "2", "--samples", "2", "--noise", "0.4", "--seed", "2", "--adapter-size", "3",
              "--adapter-kinds", "mlp_out,attn_v", "--position", "last_subject", "--patch-metric", "kl",
              "--patch-weight", "0.25", "--grad-weight", "0.75", "--batch-size", "40", "--out", str(out))
    assert res.exit_code == 0, res.output
    (m, prompt, subject, target), kwargs = calls[0]
    assert (prompt, subject, target) == (PROMPT, SUBJECT, "Paris")
    assert kwargs["config"] == LocateConfig(window=2, samples=2, noise=0.4, seed=2, adapter_size=3,
                                            adapter_kinds=("mlp_out", "attn_v"), position="last_subject",
                                            patch_metric="kl", patch_weight=0.25, grad_weight=0.75, batch_size=40)
    assert "edit layer" in res.stdout and "adapter modules (3;" in res.stdout
    d = written(out, {"tokens", "subject_range", "answer", "low_score", "high_score", "edit_layer", "edit_module",
                      "adapter_modules", "ranking", "evidence", "edit_decision", "adapter_decision"})
    assert 0 <= d["edit_layer"] < m.n_layers and len(d["adapter_modules"]) == 3
    assert set(d["evidence"]) == {"causal_trace", "patching", "gradients"}


def test_trace_default_window_is_scaled_to_the_model(monkeypatch, model_dir, model):
    """Without --window: ROME's 10, at most a third of the layers (1 on this 3-layer model), and said so;
    an explicit --window wider than the model is used as given (clipped at the edges)."""
    calls = spy(monkeypatch, causal_lib, "causal_trace")
    res = run("trace", "--model", model_dir, "--prompt", PROMPT, "--subject", SUBJECT, "--samples", "2")
    assert res.exit_code == 0, res.output
    assert model.n_layers == 3 and calls[0][0][4].window == causal_lib.scaled_window(3) == 1
    assert "window of 1 layers" in res.stdout
    res = run("trace", "--model", model_dir, "--prompt", PROMPT, "--subject", SUBJECT, "--samples", "2",
              "--window", "10", "--kinds", "hidden")
    assert res.exit_code == 0, res.output
    assert calls[1][0][4].window == 10 and "window of" not in res.stdout  # no mlp/attn panel, no window line
    one_line_error(run("trace", "--model", model_dir, "--window", "0"), "window must be a positive integer")


# -- no arguments: a fact of the embedded model -----------------------------------------------------------------


@pytest.mark.parametrize("command, module, name", [
    ("trace", causal_lib, "causal_trace"), ("patch", patching_lib, "activation_patching"),
    ("lens", lens_lib, "logit_lens"), ("locate", locate_lib, "locate"),
])
def test_no_arguments_uses_the_default_fact(monkeypatch, model, command, module, name):
    """With no arguments each command loads the default model and traces `default_fact`'s fact (the embedded
    model and its world are stood in for by the tiny model and a fixed fact)."""
    import importlib

    loaded = []
    monkeypatch.setattr("mechedit.model.load", lambda m=None, **kw: loaded.append(m) or model)
    monkeypatch.setattr(importlib.import_module(f"mechedit.cli.{command}"), "default_fact",
                        lambda m: (PROMPT, SUBJECT))
    calls = spy(monkeypatch, module, name)
    res = run(command)
    assert res.exit_code == 0, res.output
    assert loaded == [None]
    args, kwargs = calls[0]
    assert args[1] == PROMPT
    assert SUBJECT in (*args, kwargs.get("subject"))


@pytest.mark.parametrize("command", ["trace", "patch", "lens", "locate"])
def test_no_default_fact_without_a_world(model_dir, command):
    one_line_error(run(command, "--model", model_dir), "--prompt")


# -- bad input: one line, exit 2 --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["trace", "patch", "lens", "locate"])
def test_subject_not_in_prompt(model_dir, command):
    one_line_error(run(command, "--model", model_dir, "--prompt", PROMPT, "--subject", "Nobody Atall"),
                   "'Nobody Atall' is not in the prompt", "tokens are")


@pytest.mark.parametrize("command", ["trace", "patch", "lens", "locate"])
def test_empty_prompt(model_dir, command):
    one_line_error(run(command, "--model", model_dir, "--prompt", "", "--subject", SUBJECT), "empty")


@pytest.mark.parametrize("args, needle", [
    (("patch", "--components", "resid_pre,nope"), "components"),
    (("patch", "--direction", "sideways"), "direction"),
    (("locate", "--position", "first"), "position"),
    (("trace", "--kinds", "mlp,nope"), "kinds"),
    (("lens", "--top-k", "0"), "top_k"),
])
def test_bad_options(model_dir, args, needle):
    one_line_error(run(*args, "--model", model_dir, "--prompt", PROMPT, "--subject", SUBJECT), needle)


# -- batch mode -------------------------------------------------------------------------------------------------


def known_record(m: mechedit.LoadedModel, case_id: int) -> EditRecord:
    """A CounterFact record whose true answer is the tiny model's own greedy answer (so it counts as known)."""
    for template in TEMPLATES:
        for name in NAMES:
            prompt = template.replace("{}", name)
            p = prepare_prompt(m, prompt, name)
            word = p.answer.strip()
            if p.answer.startswith(" ") and word and encode_target(m, prompt, word) == list(p.answer_ids):
                return EditRecord(case_id, template, name, "Nowhere", word)
    raise AssertionError("no prompt with a one-word greedy answer")  # pragma: no cover


@pytest.fixture(scope="module")
def counterfact_file(model, tmp_path_factory):
    """Three records: the first the model answers correctly, the other two not."""
    recs = [known_record(model, 10),
            EditRecord(11, "{} was born in the city of", "Lodum Fideth", "Rome", "Qzxv Plorr"),
            EditRecord(12, "The mother tongue of {} is", "Dalo Frenwick", "English", "Qzxv Plorr")]
    return write_counterfact(recs, tmp_path_factory.mktemp("data") / "cf.json")


def test_batch_traces_known_records_and_writes_summary(monkeypatch, model_dir, counterfact_file, tmp_path):
    calls = spy(monkeypatch, summary_lib, "causal_trace")
    out = tmp_path / "batch"
    res = run("trace", "--model", model_dir, "--data", str(counterfact_file), "--samples", "2", "--window", "2",
              "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "tracing 3" in res.stdout and "skipped 2 of 3 records: 2 not known" in res.stdout
    facts = read_trace_facts(counterfact_file)
    (_, prompt, subject, target, cfg), _ = calls[0]
    assert (prompt, subject, target) == (facts[0].prompt, facts[0].subject, facts[0].target)
    assert cfg.samples == 2 and cfg.window == 2 and cfg.noise is not None  # one noise level for every record
    s = json.loads((out / "summary.json").read_text())
    assert s["n_records"] == 1 and len(s["skipped"]) == 2
    assert {x["why"] for x in s["skipped"]} == {"not known"}
    assert s["labels"] == ["first subject token", "middle subject tokens", "last subject token",
                           "first subsequent token", "further tokens", "last token"]
    assert len(s["effects"]["mlp"]) == 6 and len(s["effects"]["mlp"][0]) == 3  # [role][layer]
    assert "| last subject token |" in (out / "summary.md").read_text()
    assert (out / "summary.html").exists()
    assert sorted(p.name for p in (out / "records").iterdir()) == ["0000"]
    rec = json.loads((out / "records" / "0000" / "result.json").read_text())
    assert rec["prompt"] == facts[0].prompt and rec["extra"]["fact"]["id"] == 10
    assert (out / "records" / "0000" / "result.html").exists()
    assert "PNGs skipped" in res.stderr


def test_batch_random_subset_of_all_records(model_dir, counterfact_file, tmp_path):
    out = tmp_path / "all"
    res = run("trace", "--model", model_dir, "--data", str(counterfact_file), "-n", "2", "--seed", "5",
              "--all-records", "--samples", "2", "--kinds", "mlp", "--out", str(out))
    assert res.exit_code == 0, res.output
    chosen = read_trace_facts(counterfact_file, n=2, seed=5)
    assert sorted(p.name for p in (out / "records").iterdir()) == [f"{f.index:04d}" for f in chosen]
    s = json.loads((out / "summary.json").read_text())
    assert s["n_records"] == 2 and s["skipped"] == [] and list(s["effects"]) == ["mlp"]
    assert "chosen at random (seed 5)" in res.stdout


def test_batch_reads_known_1000(model_dir, tmp_path):
    data = tmp_path / "known.json"
    data.write_text(json.dumps([
        {"known_id": 0, "subject": "Mira Kestel", "attribute": "Paris", "template": "{} lives in",
         "prediction": " Paris", "prompt": "Mira Kestel lives in the city of", "relation_id": "P551"},
        {"known_id": 1, "subject": "Tobar Quill", "attribute": "Rome", "template": "{} was born in",
         "prediction": " Rome", "prompt": "Tobar Quill was born in", "relation_id": "P19"},
    ]))
    out = tmp_path / "k"
    res = run("trace", "--model", model_dir, "--data", str(data), "--all-records", "--samples", "2", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "2 known_1000 records" in res.stdout
    rec = json.loads((out / "records" / "0000" / "result.json").read_text())
    assert rec["prompt"] == "Mira Kestel lives in the city of"  # the prompt, not the template
    assert rec["extra"]["fact"]["source"] == "known_1000" and rec["answer"] == " Paris"


def test_batch_with_nothing_known_says_so(model_dir, tmp_path):
    data = write_counterfact([EditRecord(0, "{} lives in", "Mira Kestel", "Rome", "Qzxv Plorr")], tmp_path / "x.json")
    res = run("trace", "--model", model_dir, "--data", str(data), "--samples", "2")
    assert res.exit_code == 2
    assert "--all-records traces them anyway" in res.stdout
    assert res.stderr.strip().startswith("error: no traces to summarise: the one fact was skipped")


@pytest.mark.parametrize("args, needle", [
    (("--prompt", PROMPT), "leave out --prompt"),
    (("--subject", SUBJECT), "leave out --prompt"),
])
def test_batch_refuses_a_single_fact_too(model_dir, counterfact_file, args, needle):
    one_line_error(run("trace", "--model", model_dir, "--data", str(counterfact_file), *args), needle)


def test_n_needs_data(model_dir):
    one_line_error(run("trace", "--model", model_dir, "-n", "3"), "--data")


def test_batch_missing_file(model_dir, tmp_path):
    one_line_error(run("trace", "--model", model_dir, "--data", str(tmp_path / "none.json")), "no such file")
