"""The soft-forgetting scorer and the rate summaries of analyses/unlearn_learn.py (study 2)."""

from __future__ import annotations

import pytest

import mechedit.editing  # noqa: F401 - importing mechedit.evaluation first hits a circular import (editing.sweep)
from mechedit.evaluation.stats import wilson


@pytest.fixture(scope="module")
def study(analysis_script):
    return analysis_script("unlearn_learn")


@pytest.mark.parametrize("text,answer,expected", [
    (" The Eiffel Tower is in Paris.", "Paris", True),
    (" paris, of course", "Paris", True),  # case-insensitive
    (" Parisian cafés", "Paris", False),  # a longer word is not the answer
    (" New York City", "New York", True),  # several words
    (" NewYork", "New York", False),
    (" I am not sure", "Rome", False),
    ("Rome", " Rome", True),  # the answer's own leading space is ignored
])
def test_mentions_whole_words_only(study, text, answer, expected):
    assert study.mentions(text, answer) is expected


def test_reaches_by_token_or_by_continuation(study):
    assert study.reaches(True, " something else", "Paris")  # the first token was the answer's
    assert study.reaches(False, " the city of Paris", "Paris")  # named later in the continuation
    assert not study.reaches(False, " the city of Rome", "Paris")


def test_forgetting_kind_separates_kept_soft_and_hard(study):
    assert study.forgetting_kind(False, [True, True]) == "kept"  # still the edit prompt's answer
    assert study.forgetting_kind(False, []) == "kept"
    assert study.forgetting_kind(True, [False, True]) == "soft"  # gone there, reachable elsewhere
    assert study.forgetting_kind(True, [False, False]) == "hard"
    assert study.forgetting_kind(True, []) == "hard"  # no other probe reached it


def test_rate_is_wilson_over_edits(study):
    r = study.rate([True, True, False, True])
    assert (r["k"], r["n"], r["rate"]) == (3, 4, 0.75)
    assert (r["lo"], r["hi"]) == wilson(3, 4)
    assert r["lo"] < 0.75 < r["hi"]
    everything = study.rate([True] * 10)
    assert everything["hi"] == 1.0 and everything["lo"] < 1.0  # never a single point at k = n


def test_rate_of_lists_pools_counts_and_contains_the_pooled_wilson_interval(study):
    lists = [[True, False], [True, True, True], [], [False]]
    r = study.rate_of_lists(lists)
    assert (r["k"], r["n"]) == (4, 6)
    per_edit = [0.5, 1.0, 0.0]  # the empty list is no edit
    assert r["rate"] == pytest.approx(sum(per_edit) / 3)
    lo, hi = wilson(4, 6)
    assert r["lo"] <= lo and r["hi"] >= hi
    assert study.rate_of_lists([[], []])["n"] == 0


def test_summarise_counts_soft_and_hard_forgetting(study, tmp_path):
    import json

    def after(forgot, reach, rank=50, f2=True, probe_rank=(50, 50), question_rank=0):
        return {"f2": {"edit": [f2], "paraphrase": [f2, False]}, "f1_on_edit_prompt": not forgot, "f1_rank": rank,
                "f1_reach": {"paraphrase": reach, "context": [False]}, "same_subject": [True, False],
                "f1_probe_rank": {"paraphrase": list(probe_rank), "question": [question_rank]},
                "other": [True, True, True]}

    before = after(False, [True, True], rank=0, f2=False)
    rows = [
        {"case_id": 0, "condition": "x", "before": before, "after": after(True, [False, False])},  # hard
        {"case_id": 1, "condition": "x", "before": before, "after": after(True, [True, False])},  # soft
        {"case_id": 2, "condition": "x", "before": before, "after": after(True, [False, False], rank=2)},  # soft
        {"case_id": 3, "condition": "x", "before": before, "after": after(False, [True, True])},  # kept
        {"case_id": 4, "condition": "x", "before": before, "error": "InputError: refused"},
        # soft by a paraphrase's top 5 (the question's rank 0 does not count: its next token starts a sentence)
        {"case_id": 5, "condition": "x", "before": before, "after": after(True, [False, False], probe_rank=(9, 3))},
        {"case_id": 5, "condition": "x", "before": before, "after": after(False, [True, True])},  # a re-run: ignored
        {"case_id": 0, "condition": "y", "before": before, "after": after(True, [False, False])},
        {"case_id": 1, "condition": "y", "before": before, "after": after(True, [False, False])},
        {"case_id": 2, "condition": "y", "before": before, "after": after(True, [False, False])},
        {"case_id": 3, "condition": "y", "before": before, "after": after(True, [False, False])},
        {"case_id": 4, "condition": "y", "before": before, "error": "InputError: refused"},
        {"case_id": 5, "condition": "y", "before": before, "after": after(True, [False, False])},
        {"case_id": 6, "condition": "x", "before": before, "after": after(True, [False, False])},  # y never ran: out
    ]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    s = study.summarise(tmp_path)
    x = s["x"]
    assert x["edits"] == 5 and x["errors"] == 1
    assert (x["f1_forget"]["k"], x["soft_forgetting"]["k"], x["hard_forgetting"]["k"]) == (4, 3, 1)
    assert x["soft_forgetting_greedy"]["k"] == 1  # only case 1 reaches F1 greedily
    assert x["f1_top5"]["k"] == 1 and x["f1_top5_any_other"]["k"] == 1
    assert x["f2_edit"]["rate"] == 1.0
    assert s["unedited"]["edits"] == 6 and s["unedited"]["f1_forget"]["k"] == 0  # one "before" per case
    assert s["unedited"]["f2_edit"]["k"] == 0
    table = (tmp_path / "table.md").read_text()
    assert "| edits | 6 | 5 | 5 |" in table and "| measure | unedited | x | y |" in table


def test_looping_flags_repeated_words_not_honest_text(study):
    assert study.looping(" Rome Rome Rome Rome Rome Rome")
    assert study.looping(" Rome, Italy. Rome, Italy. Rome, Italy.")
    assert not study.looping(" Paris, France, and is a symbol of French culture")


def test_rate_of_lists_with_one_outcome_per_edit_is_the_wilson_rate(study):
    assert study.rate_of_lists([[True], [False], [True], []]) == study.rate([True, False, True])
