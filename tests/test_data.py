"""Data formats: CounterFact (both layouts), known_1000, the embedded world's export and `mechedit toy export`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from mechedit.data import EditRecord, KnownFact, read_counterfact, read_known, write_counterfact
from mechedit.errors import DataFormatError, InputError, MecheditError
from mechedit.toy.export import world_records
from mechedit.toy.world import World

COUNTERFACT = SHARED_DATA / "counterfact.json"
KNOWN = SHARED_DATA / "known_1000.json"
needs_counterfact = pytest.mark.skipif(not COUNTERFACT.is_file(), reason=f"shared data absent: {COUNTERFACT}")
needs_known = pytest.mark.skipif(not KNOWN.is_file(), reason=f"shared data absent: {KNOWN}")

DARRIEUX = EditRecord(
    case_id=0, template="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English",
    target_true="French", paraphrases=("Where Danielle Darrieux is from, people speak the language of",),
    neighborhood=(("Michel Rocard is a native speaker of", "French"),), relation_id="P103",
)

EASYEDIT = {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
            "subject": "Danielle Darrieux", "ground_truth": "French",
            "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
            "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}

ROME = {"case_id": 0, "pararel_idx": 2796,
        "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                              "target_new": {"str": "English", "id": "Q1860"},
                              "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux"},
        "paraphrase_prompts": ["Where Danielle Darrieux is from, people speak the language of",
                               "Danielle Darrieux was born in"],
        "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Robert Schuman, a native"],
        "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"]}


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


# -- EditRecord -------------------------------------------------------------------------------------------------


def test_record_prompt_and_dict_round_trip():
    assert DARRIEUX.prompt == "The mother tongue of Danielle Darrieux is"
    d = DARRIEUX.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain JSON data
    assert EditRecord.from_dict(d) == DARRIEUX


def test_record_stores_tuples_and_is_hashable():
    r = EditRecord(1, "{} plays", "Ann Lee", "chess", paraphrases=["Ann Lee loves"],
                   neighborhood=[["Bob Day plays", "golf"]])
    assert r.paraphrases == ("Ann Lee loves",) and r.neighborhood == (("Bob Day plays", "golf"),)
    hash(r)


@pytest.mark.parametrize("kwargs, field", [
    ({"subject": ""}, "subject"),
    ({"subject": "  "}, "subject"),
    ({"target_new": ""}, "target_new"),
    ({"template": "The mother tongue of Danielle Darrieux is"}, "template"),
    ({"template": "{} and {} is"}, "template"),
    ({"paraphrases": "Danielle Darrieux speaks"}, "paraphrases"),
    ({"neighborhood": (("only a prompt",),)}, "neighborhood[0]"),
])
def test_record_validation_names_the_field(kwargs, field):
    base = DARRIEUX.to_dict() | kwargs
    with pytest.raises(InputError) as e:
        EditRecord(**base)
    assert f"field '{field}'" in str(e.value)


def test_from_dict_reports_missing_fields():
    with pytest.raises(DataFormatError, match="'subject'"):
        EditRecord.from_dict({k: v for k, v in DARRIEUX.to_dict().items() if k != "subject"})


# -- writing and reading ----------------------------------------------------------------------------------------


def test_write_read_round_trip(tmp_path):
    records = [
        DARRIEUX,
        EditRecord("x-1", "{} works as a", "Ann Lee", "pilot", None),  # no truth, paraphrase or neighbour
        EditRecord(2, "Bob {} likes {{braces}}", "Bob", "tea", "coffee", ("Bob drinks",)),  # subject occurs twice
    ]
    path = write_counterfact(records, tmp_path / "sub" / "cf.json")
    assert read_counterfact(path) == records
    assert not [p for p in path.parent.iterdir() if p.name != "cf.json"]  # no temp file left behind
    written = json.loads(path.read_text())
    assert set(written[1]) == set(EASYEDIT)  # exactly the shared layout when nothing extra is needed
    assert written[1]["rephrase_prompt"] == "" and written[1]["ground_truth"] is None
    assert written[2]["template"] == "Bob {} likes {{braces}}"  # kept because the first "Bob" is not the subject


def test_write_keeps_the_first_paraphrase_and_neighbour(tmp_path):
    rec = EditRecord(0, "{} is", "Ann", "x", "y", ("p1", "p2"), (("q1", "a1"), ("q2", "a2")))
    (back,) = read_counterfact(write_counterfact([rec], tmp_path / "cf.json"))
    assert back.paraphrases == ("p1",) and back.neighborhood == (("q1", "a1"),)


def test_rome_layout_reads_into_the_same_records(tmp_path):
    (easy,) = read_counterfact(_write_json(tmp_path / "easy.json", [EASYEDIT]))
    (rome,) = read_counterfact(_write_json(tmp_path / "rome.json", [ROME]))
    assert rome.paraphrases == tuple(ROME["paraphrase_prompts"])
    assert rome.neighborhood == tuple((p, "French") for p in ROME["neighborhood_prompts"])  # answers: target_true
    assert rome.relation_id == "P103"
    # Cut down to one paraphrase and one neighbour, the ROME record is the EasyEdit record.
    one = copy.deepcopy(ROME)
    one["paraphrase_prompts"] = one["paraphrase_prompts"][:1]
    one["neighborhood_prompts"] = one["neighborhood_prompts"][:1]
    (rome1,) = read_counterfact(_write_json(tmp_path / "rome1.json", [one]))
    assert rome1 == EditRecord(**(easy.to_dict() | {"relation_id": "P103"}))


def test_limit_and_indices(tmp_path):
    recs = [EditRecord(i, "{} is", f"S{i}", "x") for i in range(5)]
    path = write_counterfact(recs, tmp_path / "cf.json")
    assert read_counterfact(path, limit=2) == recs[:2]
    assert read_counterfact(path, indices=[4, 1]) == [recs[4], recs[1]]
    with pytest.raises(InputError, match="index 9"):
        read_counterfact(path, indices=[9])


# -- malformed input: every error names the record and the field ------------------------------------------------


def _del(*keys):
    def f(d):
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
    return f


def _set(value, *keys):
    def f(d):
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return f


@pytest.mark.parametrize("base, corrupt, field", [
    (EASYEDIT, _del("prompt"), "prompt"),
    (EASYEDIT, _del("subject"), "subject"),
    (EASYEDIT, _del("target_new"), "target_new"),
    (EASYEDIT, _del("case_id"), "case_id"),
    (EASYEDIT, _set("", "subject"), "subject"),
    (EASYEDIT, _set("", "target_new"), "target_new"),
    (EASYEDIT, _set(7, "target_new"), "target_new"),
    (EASYEDIT, _set(3.5, "case_id"), "case_id"),
    (EASYEDIT, _set("Marie Curie", "subject"), "subject"),  # not in the prompt
    (EASYEDIT, _set("The {} tongue of Danielle Darrieux is", "prompt"), "prompt"),  # two {} after substitution
    (EASYEDIT, _set(["a", 3], "rephrase_prompt"), "rephrase_prompt[1]"),
    (EASYEDIT, _set(["a", "b"], "locality_prompt"), "locality_ground_truth"),  # 2 prompts, 1 answer
    (EASYEDIT, _set(True, "ground_truth"), "ground_truth"),
    (EASYEDIT, _set(False, "ground_truth"), "ground_truth"),
    (EASYEDIT, _set(" ", "ground_truth"), "ground_truth"),
    (ROME, _del("requested_rewrite"), "requested_rewrite"),
    (ROME, _del("requested_rewrite", "prompt"), "requested_rewrite.prompt"),
    (ROME, _set("The mother tongue of Danielle Darrieux is", "requested_rewrite", "prompt"),
     "requested_rewrite.prompt"),
    (ROME, _set("English", "requested_rewrite", "target_new"), "requested_rewrite.target_new"),
    (ROME, _del("requested_rewrite", "target_new", "str"), "requested_rewrite.target_new.str"),
    (ROME, _set("", "requested_rewrite", "subject"), "requested_rewrite.subject"),
    (ROME, _del("requested_rewrite", "target_true"), "requested_rewrite.target_true"),  # neighbours need it
    (ROME, _set("not a list", "paraphrase_prompts"), "paraphrase_prompts"),
    (ROME, _set([""], "neighborhood_prompts"), "neighborhood_prompts[0]"),
])
def test_bad_counterfact_record_names_record_and_field(tmp_path, base, corrupt, field):
    bad = copy.deepcopy(base)
    bad["case_id"] = 41
    corrupt(bad)
    good = [copy.deepcopy(base) | {"case_id": i} for i in range(2)]
    path = _write_json(tmp_path / "cf.json", [*good, bad, copy.deepcopy(base)])  # bad one third: no half-load
    with pytest.raises(DataFormatError) as e:
        read_counterfact(path)
    msg = str(e.value)
    assert str(path) in msg and "record 2" in msg and f"field '{field}'" in msg
    if field != "case_id":
        assert "(case_id 41)" in msg


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ('{"case_id": 0}', "must hold a JSON list"),
    ("[1, 2]", "record 0 must be a JSON object"),
])
def test_bad_files(tmp_path, text, match):
    path = tmp_path / "cf.json"
    path.write_text(text)
    with pytest.raises(DataFormatError, match=match) as e:
        read_counterfact(path)
    assert str(path) in str(e.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(MecheditError, match="no such file"):
        read_counterfact(tmp_path / "nope.json")


KNOWN_ONE = {"known_id": 0, "subject": "Vinson Massif", "attribute": "Antarctica",
             "template": "{} is located in the continent", "prediction": " of Antarctica.",
             "prompt": "Vinson Massif is located in the continent of", "relation_id": "P30"}


@pytest.mark.parametrize("corrupt, field", [
    (_del("subject"), "subject"),
    (_del("known_id"), "known_id"),
    (_set("", "attribute"), "attribute"),
    (_set("is located in the continent", "template"), "template"),
    (_set("Mount Everest", "subject"), "subject"),  # not in the prompt
    (_set(5, "prompt"), "prompt"),
])
def test_bad_known_record_names_record_and_field(tmp_path, corrupt, field):
    bad = copy.deepcopy(KNOWN_ONE) | {"known_id": 7}
    corrupt(bad)
    path = _write_json(tmp_path / "known.json", [KNOWN_ONE, bad])
    with pytest.raises(DataFormatError) as e:
        read_known(path)
    assert "record 1" in str(e.value) and f"field '{field}'" in str(e.value)


# -- the shared data files --------------------------------------------------------------------------------------


@needs_counterfact
def test_reads_the_real_counterfact():
    records = read_counterfact(COUNTERFACT)
    assert len(records) == 21_919
    assert [r.case_id for r in records] == list(range(21_919))
    assert records[0] == EditRecord(**(DARRIEUX.to_dict() | {"relation_id": None}))
    for r in records:
        assert r.template.count("{}") == 1 and r.subject in r.prompt
        assert r.target_new and r.target_true and len(r.paraphrases) == 1 and len(r.neighborhood) == 1


@needs_counterfact
def test_rewriting_the_real_counterfact_is_lossless(tmp_path):
    records = read_counterfact(COUNTERFACT, limit=500)
    out = write_counterfact(records, tmp_path / "cf.json")
    assert json.loads(out.read_text()) == json.loads(COUNTERFACT.read_text())[:500]


@needs_known
def test_reads_the_real_known_1000():
    facts = read_known(KNOWN)
    assert len(facts) == 1_209
    assert facts[0] == KnownFact(**KNOWN_ONE | {"prediction": " of Antarctica. It is the largest of the three"})
    assert all(f.subject in f.prompt and f.template.count("{}") == 1 and f.attribute for f in facts)


# -- the embedded world's export ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> World:
    return World.generate(seed=0)


def test_world_records_are_counterfactual_and_well_formed(world):
    records = world_records(world)
    assert len(records) == len(world.facts) and [r.case_id for r in records] == list(range(len(world.facts)))
    for r in records:
        fact = world.facts[r.case_id]
        spec = world.relations[fact.relation]
        assert (r.subject, r.relation_id, r.target_true) == (fact.subject, fact.relation, fact.object)
        assert r.target_new != r.target_true and r.target_new in spec["objects"]
        assert r.template in spec["train"]
        (para,) = r.paraphrases
        assert para != r.prompt and para in [t.replace("{}", r.subject) for t in spec["heldout"]]
        ((prompt, answer),) = r.neighborhood
        subj = next(s for s in world.subjects if r.template.replace("{}", s) == prompt)
        assert subj != r.subject and world.object_of(subj, fact.relation) == answer


def test_world_records_are_deterministic_and_subsets_agree(world):
    a, b = world_records(world, n=25, seed=3), world_records(world, n=25, seed=3)
    assert a == b and len(a) == 25
    assert world_records(world, n=25, seed=4) != a
    full = {r.case_id: r for r in world_records(world, seed=3)}
    assert all(full[r.case_id] == r for r in a)


@pytest.mark.parametrize("n", [-1, 10**6, 2.5])
def test_world_records_rejects_bad_n(world, n):
    with pytest.raises(InputError, match="n must be"):
        world_records(world, n=n)


def test_cli_toy_export_writes_readable_records(tmp_path):
    from typer.testing import CliRunner

    from mechedit.cli import app

    out = tmp_path / "world.json"
    result = CliRunner().invoke(app, ["toy", "export", str(out), "-n", "12", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "wrote 12 records" in result.output
    records = read_counterfact(out)
    assert len(records) == 12 and all(r.relation_id and r.target_new != r.target_true for r in records)
    bad = CliRunner().invoke(app, ["toy", "export", str(out), "-n", "-3"])
    assert bad.exit_code != 0 and "n must be" in bad.output + str(bad.exception)
