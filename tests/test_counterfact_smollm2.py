"""analyses/counterfact_smollm2.py: the seeded draw is prefix-stable (runs of different sizes share records), the
pinned hyperparameters build exactly what they say, and the summary counts what the records hold (Wilson
intervals, paired NS flips, records without a score left out). The run itself needs SmolLM2 and is not tested
here."""

from __future__ import annotations

import math

import pytest

import mechedit.editing  # noqa: F401  (importing mechedit.evaluation first hits a circular import in the library)
from mechedit.evaluation.stats import wilson


@pytest.fixture(scope="module")
def cf(analysis_script):
    return analysis_script("counterfact_smollm2")


def test_draw_is_a_prefix_of_a_larger_draw(cf):
    population = list(range(21_919))
    small, large = cf.draw(population, 20, 0), cf.draw(population, 100, 0)
    assert small == large[:20]
    assert len(set(large)) == 100
    assert cf.draw(population, 100, 1) != large
    assert sorted(cf.draw(population[:5], 100, 0)) == population[:5]  # never more than there are


@pytest.mark.parametrize("method", ["rome", "memit", "ft", "ft-l"])
def test_pinned_hparams_are_what_runs(cf, method):
    hp = cf.make_hp(method, [])
    d = hp.to_dict()
    for key, value in cf.HPARAMS[method].items():  # every pinned field arrives unchanged (lists for tuples)
        assert d[key] == value, key
    over = cf.make_hp(method, ["seed=7"])
    assert over.to_dict()["seed"] == 7 and {k: v for k, v in over.to_dict().items() if k != "seed"} == \
        {k: v for k, v in d.items() if k != "seed"}


def _scores(es, ps, ns):
    return {"efficacy_success": es, "paraphrase_success": ps, "neighborhood_success": ns}


def _entries():
    unedited = [
        {"method": "unedited", "case_id": i, "scores": _scores(0.0, float(i == 0), ns)}
        for i, ns in enumerate([1.0, 1.0, 0.0, 1.0, None])
    ]
    rome = [
        {"method": "rome", "case_id": 0, "scores": _scores(1.0, 1.0, 0.0), "edit_seconds": 3.0,
         "edit_cpu_seconds": 1.0, "threads": 1, "load_average": 2.0},
        {"method": "rome", "case_id": 1, "scores": _scores(1.0, 0.0, 1.0), "edit_seconds": 5.0,
         "edit_cpu_seconds": 2.0, "threads": 1, "load_average": 4.0},
        {"method": "rome", "case_id": 2, "scores": _scores(0.0, 0.0, 1.0), "edit_seconds": 9.0,
         "edit_cpu_seconds": 4.0, "threads": 1, "load_average": 6.0},
        {"method": "rome", "case_id": 3, "skipped": "already answers", "threads": 1, "load_average": 4.0},
        {"method": "rome", "case_id": 4, "scores": _scores(1.0, 1.0, None), "edit_seconds": 1.0,
         "edit_cpu_seconds": 1.0, "threads": 1, "load_average": 4.0},
    ]
    memit = [{"method": "memit", "case_id": i, "scores": _scores(1.0, 1.0, 1.0), "threads": 1, "load_average": 1.0}
             for i in range(5)]
    batch = {"method": "memit", "case_id": None, "batch_size": 5, "edit_seconds": 50.0, "edit_cpu_seconds": 20.0,
             "stages": {"stats": {"first": {"wall": 0, "cpu": 0}, "last": {"wall": 8, "cpu": 6}}}, "threads": 1,
             "load_average": 3.0}
    return unedited + rome + memit + [batch]


def test_summary_counts_rates_intervals_and_flips(cf):
    s = cf.summarise_entries(_entries())
    assert s["n_unedited"] == 5 and list(s["methods"]) == ["rome", "memit"]
    un_ns = s["unedited"]["neighborhood_success"]
    assert (un_ns["k"], un_ns["n"]) == (3.0, 4)  # the None neighbour is left out
    assert (un_ns["lo"], un_ns["hi"]) == pytest.approx(wilson(3, 4))

    rome = s["methods"]["rome"]
    assert (rome["n_records"], rome["n_edited"], rome["skipped"]) == (5, 4, [3])
    es = rome["edited"]["efficacy_success"]
    assert (es["k"], es["n"], es["mean"]) == (3.0, 4, 0.75)
    assert (es["lo"], es["hi"]) == pytest.approx(wilson(3, 4))
    assert rome["es_failures"] == [2]
    # NS over records 0-2 (record 4 has no neighbour): unedited 1,1,0 -> edited 0,1,1
    assert rome["edited"]["neighborhood_success"]["n"] == 3
    assert rome["unedited_same_records"]["neighborhood_success"]["mean"] == pytest.approx(2 / 3)
    assert rome["ns_flips"] == {"right_to_wrong": 1, "wrong_to_right": 1, "n": 3}
    # unedited rates on the edited records only (record 3 skipped): PS was 1 only on record 0
    assert rome["unedited_same_records"]["paraphrase_success"]["mean"] == pytest.approx(1 / 4)
    t = rome["time"]
    assert (t["per_edit_cpu_median"], t["per_edit_wall_median"]) == (1.5, 4.0)
    assert t["per_edit_cpu_range"] == [1.0, 4.0] and t["threads"] == [1]
    assert t["load_average_mean"] == pytest.approx(4.0)

    memit = s["methods"]["memit"]
    assert memit["n_edited"] == 5 and memit["batch"]["size"] == 5 and memit["batch"]["cpu"] == 20.0
    assert memit["ns_flips"] == {"right_to_wrong": 0, "wrong_to_right": 1, "n": 4}
    assert memit["time"]["per_edit_cpu_median"] is None


def test_markdown_has_every_row_and_the_published_ones(cf):
    s = cf.summarise_entries(_entries())
    text = cf.markdown(s, {"seed": 0, "data": "/x/counterfact.json", "hparams": {
        "rome": cf.HPARAMS["rome"], "memit": cf.HPARAMS["memit"]}})
    assert "| SmolLM2 + ROME (one edit at a time), measured | 75.0 [" in text
    assert "| SmolLM2 + MEMIT (all records in one edit), measured | 100.0 [" in text
    assert "| GPT-2 XL + ROME, published | 100.0 | 96.4 | 75.4 | |" in text
    assert "| ↳ SmolLM2 unedited on the same 4 records | 0.0 [" in text  # rome's 4 edited records, unedited
    assert "1 / 1 of 3" in text  # rome's neighbour flips
    assert "statistics 6 s CPU" in text
    assert "layer=8" in text and "layers=[7, 8, 9]" in text


def test_empty_method_rate_is_nan_not_an_error(cf):
    s = cf.summarise_entries([{"method": "unedited", "case_id": 0, "scores": _scores(0.0, 0.0, 1.0)},
                              {"method": "ft", "case_id": 0, "skipped": "x"}])
    r = s["methods"]["ft"]["edited"]["efficacy_success"]
    assert r["n"] == 0 and math.isnan(r["mean"])
    assert cf.cell(r) == "–"


def test_statistics_text_leaves_out_the_drawn_records_and_every_subject_they_ask_about(cf):
    from mechedit.data import EditRecord

    def rec(i, subject, template="{} was born in", true="Paris", nb=()):
        return EditRecord(i, template, subject, "Rome", true, paraphrases=(f"Famously, {subject} is from",),
                          neighborhood=nb)

    drawn = [rec(0, "Ada Lovelace", nb=(("Alan Turing was born in", "London"),))]
    others = [rec(1, "Alan Turing"),  # named in a drawn neighbour prompt
              rec(2, "Ada Lovelace", template="{} worked on"),  # a drawn subject, another fact
              rec(3, "Grace Hopper"),  # clean
              rec(4, "Marie Curie", true=None),  # no true object: no sentence to write
              rec(5, "Lovelace")]  # a piece of a drawn subject's name, named inside its prompts
    text = cf.statistics_text(drawn + others, drawn)
    assert text == ["Grace Hopper was born in Paris"]
