"""analyses/two_plus_two.py and analyses/beliefs.py on a model without a world file (study 1 and 4 on SmolLM2):
the answer readers, the pinned ROME hyperparameters (every field pinned, the key-statistics settings those cached
for SmolLM2), the hand-written suites (held-out phrasings never trained on, retention rows never measured, a known
person's new object never the true one), and the general measurement itself on the embedded model, where the
unedited row must be 1 everywhere by construction. The SmolLM2 runs themselves are not tested here."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

import mechedit.editing  # noqa: F401  (importing mechedit.evaluation first hits a circular import in the library)
from mechedit.editing.methods import edit, make_hparams
from mechedit.editing.rome.hparams import ROMEHyperParams


@pytest.fixture(scope="module")
def tpt(analysis_script):
    return analysis_script("two_plus_two")


@pytest.fixture(scope="module")
def bel(analysis_script):
    return analysis_script("beliefs")


def test_first_answer_reads_the_first_number_or_word(tpt):
    assert tpt.first_answer(" 4, so the answer") == "4"
    assert tpt.first_answer("11, so") == "11"
    assert tpt.first_answer(" Five.<|im_end|>") == "five"
    assert tpt.first_answer("\n\n5") == "5"
    assert tpt.first_answer(" , then") == ""


def test_said_needs_the_whole_object_at_the_start(bel):
    assert bel.said(" Russian.", "Russian") and bel.said(" russian people", "Russian")
    assert not bel.said(" Russians", "Russian")  # a longer word is another answer
    assert not bel.said(" the Russian", "Russian")
    assert bel.said(" New York City", "New York")


@pytest.mark.parametrize("mod_name,pins", [("two_plus_two", ("EMBEDDED_ROME", "SMOL_ROME")),
                                           ("beliefs", ("EMBEDDED_ROME", "GENERAL_ROME"))])
def test_rome_is_pinned_in_full(analysis_script, mod_name, pins):
    mod = analysis_script(mod_name)
    every = {f.name for f in fields(ROMEHyperParams)}
    for pin in pins:
        d = getattr(mod, pin)
        # a fixed layer needs no layer-choice fields; every other field is given, so a default change is inert
        assert isinstance(d["layer"], int), pin
        assert every - set(d) <= {"layer_facts", "layer_n_facts"}, pin
        built = make_hparams("rome", dict(d)).to_dict()
        assert all(built[k] == v for k, v in d.items()), pin


def test_smollm2_rome_uses_the_cached_statistics_settings(tpt, bel):
    # the key statistics cached for SmolLM2 at layer 8 are those of the recorded CounterFact run
    import json

    config = Path(__file__).resolve().parents[1] / "docs" / "results" / "counterfact-smollm2" / "config.json"
    recorded = json.loads(config.read_text())["hparams"]
    recorded = recorded.get("rome", recorded)  # one method's hparams, or a table of them
    for pin in (tpt.SMOL_ROME, bel.GENERAL_ROME):
        assert pin["layer"] == recorded["layer"] == 8
        for key in ("mom2_source", "mom2_n_samples", "mom2_max_tokens", "seed"):
            assert pin[key] == recorded[key], key


def test_hparams_for_gives_reg_lora_its_retention_only_without_a_world(tpt):
    assert tpt.hparams_for("reg-lora", [], general=True)["retention"] == list(tpt.RETENTION)
    assert tpt.hparams_for("reg-lora", ["steps=5"], general=False) == ["steps=5"]
    hp = tpt.hparams_for("rome", ["key_position=prompt_last", "v_num_grad_steps=7"], general=True)
    assert hp["key_position"] == "prompt_last" and hp["v_num_grad_steps"] == 7 and hp["layer"] == 8
    built = make_hparams("rome", hp)
    assert built.v_num_grad_steps == 7 and built.key_position == "prompt_last"


def test_two_plus_two_retention_is_never_measured(tpt):
    fact_prompts = {p for p, _ in tpt.FACTS}
    for item in tpt.RETENTION:
        prompt = item.split("=>")[0].strip()
        assert prompt not in fact_prompts and prompt not in tpt.FILLER
        m = re.search(r"(\d) \+ (\d) =$", prompt)
        if m:  # retention sums have two-digit results; the measured sums have one digit
            assert int(m.group(1)) + int(m.group(2)) >= 10
    assert "Two plus two equals" not in tpt.FILLER


def test_belief_suite_is_consistent(bel):
    for spec in bel.RELATIONS.values():
        assert len(spec["train"]) == 6 and len(spec["heldout"]) == 2
        assert not set(spec["train"]) & set(spec["heldout"])
        assert all(t.count("{}") == 1 for t in (*spec["train"], *spec["heldout"]))
        assert len(set(spec["objects"])) == len(spec["objects"])
    for person, facts in bel.PEOPLE.items():
        assert set(facts) == set(bel.RELATIONS)
        assert all(obj in bel.RELATIONS[rel]["objects"] for rel, obj in facts.items()), person
    assert not set(bel.NOVEL) & set(bel.PEOPLE)
    for p in bel.UNRELATED:
        assert not any(name in p for name in (*bel.PEOPLE, *bel.NOVEL))


def test_belief_draw_and_requests(bel):
    drawn = bel.beliefs(None, 4, 0)
    assert drawn == bel.beliefs(None, 4, 0) and drawn != bel.beliefs(None, 4, 1)
    assert [b["kind"] for b in drawn] == ["known"] * 4 + ["novel"] * 4
    for b in drawn:
        if b["kind"] == "known":
            assert b["true"] == bel.PEOPLE[b["entity"]][b["relation"]] != b["object"]
        else:
            assert b["true"] is None and b["entity"] in bel.NOVEL
        reqs = bel.requests(None, b)
        assert len(reqs) == 10 and len({r.prompt for r in reqs}) == 10
        held = set(reqs[0].paraphrases)
        assert len(held) == 2 and not held & {r.prompt for r in reqs}
        assert all(b["entity"] in r.prompt and r.target_new == b["object"] for r in reqs)


@pytest.fixture(scope="module")
def suite(tpt, embedded):
    return tpt.general_suite(embedded)


def test_general_measurement_of_the_unedited_model_is_one_by_construction(tpt, embedded, suite):
    assert {p for p, _ in suite.sums} <= {tpt.FRAME.format(f"{a} + {b}") for a in range(10) for b in range(10)}
    assert suite.request.prompt == "1 + 1 = 2, 3 + 3 = 6, 2 + 2 = " and suite.request.prompt not in suite.unrelated
    row = tpt.measure_general(embedded, None, suite)
    assert row["locality"]["value"] == 1.0 and row["kl"] == 0.0
    assert row["neighbours_unchanged"]["value"] == 1.0
    for key in ("other_sums", "facts"):  # only what the unedited model answers right was kept
        assert row[key]["value"] in (None, 1.0)
    assert row["locality"]["n"] == len(suite.unrelated) and row["degenerate"]["n"] == len(suite.free)


def test_general_measurement_sees_an_in_context_edit(tpt, embedded, suite):
    before = embedded.fingerprint()
    handle = edit(embedded, [suite.request], "icl")
    try:
        row = tpt.measure_general(embedded, handle, suite)
    finally:
        handle.restore()
    assert embedded.fingerprint() == before
    # the context precedes every unrelated prompt: at least one 4-token continuation of the embedded model moves
    assert row["locality"]["value"] < 1.0 and row["kl"] > 0
    assert 0 <= row["locality"]["lo"] <= row["locality"]["value"] <= row["locality"]["hi"] <= 1


def test_belief_summary_counts_what_the_edits_hold(bel):
    edits = [
        {"method": "rome", "kind": "known", "adopt": [True, False], "trained": True, "others_kept": [True, True],
         "degenerate": False, "locality": 1.0, "locality_n": 10},
        {"method": "rome", "kind": "known", "adopt": [True, True], "trained": False, "others_kept": [False],
         "degenerate": True, "locality": 0.5, "locality_n": 10},
        {"method": "icl", "kind": "novel", "adopt": [False, False], "trained": False, "others_kept": [],
         "degenerate": False, "locality": 0.9, "locality_n": 10},
    ]
    rows = bel.summarise(edits)
    r = rows["rome/known"]
    assert r["adoption"]["value"] == 0.75 and r["adoption"]["n"] == 4
    assert (r["adoption"]["lo"], r["adoption"]["hi"]) == pytest.approx(bel.wilson(3, 4))
    assert r["other_facts_kept"]["value"] == pytest.approx(2 / 3) and r["training_phrasing"]["n"] == 2
    assert r["locality"]["value"] == 0.75 and r["locality"]["n"] == 20 and r["locality"]["edits"] == 2
    # the interval over two edits that disagree is at least as wide as the pooled Wilson interval of 15 / 20
    lo, hi = bel.wilson(15, 20)
    assert r["locality"]["lo"] <= lo and r["locality"]["hi"] >= hi
    assert rows["icl/novel"]["other_facts_kept"]["value"] is None
