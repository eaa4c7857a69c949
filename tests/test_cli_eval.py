"""`mechedit eval` end to end on the embedded model: N records from a CounterFact-layout file, ROME one at a
time with restore, the table printed and evaluation.json / records.csv / evaluation.html written; bad input is one
line with exit status 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mechedit.cli import app
from mechedit.data import write_counterfact
from mechedit.evaluation import EvalResult
from mechedit.toy.export import world_records
from mechedit.toy.world import World

runner = CliRunner()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, embedded):
    path = tmp_path_factory.mktemp("cf") / "cf.json"
    write_counterfact(world_records(World.load(embedded.path / "world.json"), n=5, seed=1), path)
    return path


def test_eval_end_to_end(tmp_path, data_file):
    out = tmp_path / "out"
    res = runner.invoke(app, ["eval", "--method", "rome", "--data", str(data_file), "-n", "2", "--seed", "3",
                              "--no-generation", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "efficacy_success" in res.output and "locality" in res.output and "95% CI" in res.output
    result = EvalResult.load(out / "evaluation.json")
    assert result.method == "rome" and len(result.records) == 2 and len(result.edits) == 2  # one edit per record
    picked = {r["case_id"] for r in result.records}
    assert picked <= {r["case_id"] for r in json.loads(data_file.read_text())}
    assert all(r["efficacy_success"] == 1.0 for r in result.records)
    assert (out / "records.csv").is_file() and (out / "evaluation.html").is_file()
    assert not (out / "evaluation.partial.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--method", "nope", "-n", "2"], "unknown editing method"),
    (["-n", "0"], "positive"),
    (["-n", "100000"], "more records"),
])
def test_eval_bad_input_is_one_line(args, message):
    res = runner.invoke(app, ["eval", *args])
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output


def test_eval_empty_data_file(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    res = runner.invoke(app, ["eval", "--data", str(empty), "-n", "2"])
    assert res.exit_code == 2 and "holds no records" in res.output
