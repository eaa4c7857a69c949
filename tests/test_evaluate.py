"""mechedit.evaluation on the embedded model: the unedited model is perfectly local to itself, a ROME edit
succeeds and stays local, an in-context edit's context reaches every edited-side prompt, evaluation leaves the
weights exactly as found, intervals contain their means and shrink with n, results round-trip, bad input fails
clearly."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mechedit.data import EditRecord
from mechedit.editing.handle import EditHandle
from mechedit.editing.methods import edit
from mechedit.errors import InputError
from mechedit.evaluation import EvalConfig, EvalResult, Evaluator, evaluate, rewrite_scores
from mechedit.evaluation.stats import interval, mean_ci, rate_over_units, t_quantile, wilson
from mechedit.evaluation.text import TfIdf, has_loop, ngram_entropy, target_share
from mechedit.toy.export import world_records
from mechedit.toy.world import World

# Small sizes keep the file fast: 10 world facts, 3 filler prompts, 2 free generations of 8 tokens.
CFG = EvalConfig(n_world_facts=10, n_filler=3, n_free=2, gen_tokens=8)


@pytest.fixture(scope="module")
def records(embedded):
    return world_records(World.load(embedded.path / "world.json"), n=3, seed=0)


@pytest.fixture(scope="module")
def evaluator(embedded, records):
    ev = Evaluator(embedded, CFG)
    ev.prepare(records)
    return ev


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.hf_model.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- statistics ---------------------------------------------------------------------------------------------------


def test_wilson_contains_rate_and_shrinks_with_n():
    for k, n in [(0, 5), (3, 5), (5, 5), (40, 100)]:
        lo, hi = wilson(k, n)
        assert 0 <= lo <= k / n <= hi <= 1
    widths = [(lambda lo_hi: lo_hi[1] - lo_hi[0])(wilson(n * 0.9, n)) for n in (10, 100, 1000)]
    assert widths[0] > widths[1] > widths[2] > 0


def test_t_interval_contains_mean_shrinks_and_matches_tables():
    # Student t 0.975 quantiles from statistical tables
    for df, want in [(3, 3.182), (5, 2.571), (10, 2.228), (30, 2.042)]:
        assert abs(t_quantile(df) - want) < 0.01
    rng = random.Random(0)
    values = [rng.gauss(0.3, 1.0) for _ in range(1000)]
    prev = math.inf
    for n in (10, 100, 1000):
        mean, lo, hi = mean_ci(values[:n])
        assert lo < mean < hi and hi - lo < prev
        prev = hi - lo
    assert interval([1, 0, 1, 1]) == (0.75, *wilson(3, 4))  # 0/1 values: a rate
    assert interval([0.2, 0.9, 2.0], bounds=(0, 1))[2] == 1.0  # a t interval cut to the metric's range
    # units that all agree still get an interval as wide as the pooled count's Wilson interval
    mean, lo, hi = rate_over_units([1.0, 1.0, 1.0], [10, 10, 10])
    assert mean == 1.0 and (lo, hi) == wilson(30, 30) and lo < 1


def test_text_scores():
    assert ngram_entropy("the cat the cat the cat the cat") < ngram_entropy("the cat sat on a warm mat today")
    assert has_loop([3, 4, 5, 3, 4, 5, 3, 4, 5]) and not has_loop([1, 2, 3, 4, 5, 6, 1, 2])
    assert target_share("harp harp violin harp", "harp") == 0.75
    tf = TfIdf(["a harp is played", "a violin is played", "rugby is a sport"])
    assert tf.similarity("she plays the harp", "the harp is played") > tf.similarity("she plays the harp",
                                                                                      "rugby is a sport")


# -- counterfact scores -------------------------------------------------------------------------------------------


def test_rewrite_scores_unedited_model_knows_the_truth(embedded, records):
    s = rewrite_scores(embedded, records[0])
    assert s["efficacy_success"] == 0.0 and s["efficacy_magnitude"] < 0  # the true object is more likely
    assert s["neighborhood_success"] == 1.0
    # magnitude = exp(-NLL_new) - exp(-NLL_true) from the raw NLLs it reports
    row = next(r for r in s["nll"] if r["kind"] == "efficacy")
    assert s["efficacy_magnitude"] == pytest.approx(math.exp(-row["nll"]) - math.exp(-row["nll_other"]), abs=1e-6)


# -- evaluate -----------------------------------------------------------------------------------------------------


def test_unedited_evaluation_is_perfectly_local(embedded, records, evaluator):
    r = evaluator.evaluate(None, records)
    summ = r.summary()
    assert summ["locality"][0] == 1.0 and summ["kl"][0] == 0.0
    for row in r.records:  # edited side = unedited side
        assert row["efficacy_success"] == row["pre_efficacy_success"]
        assert row["fluency"] == row["pre_fluency"]
    assert r.edits[0]["fact_accuracy"] == r.edits[0]["pre_fact_accuracy"]
    for name, (mean, lo, hi) in summ.items():
        assert lo <= mean <= hi, name


def test_rome_edit_succeeds_locally_and_weights_come_back_exactly(embedded, records, evaluator):
    before = weights(embedded)
    handle = edit(embedded, records[0], "rome")
    edited = weights(embedded)
    try:
        r = evaluator.evaluate(handle, [records[0]])
        assert handle.applied and same_weights(weights(embedded), edited)  # found applied, left applied
    finally:
        handle.restore()
    assert same_weights(weights(embedded), before)
    row = r.records[0]
    assert row["efficacy_success"] == 1.0 and row["pre_efficacy_success"] == 0.0
    assert row["efficacy_magnitude"] > 0.5 > row["pre_efficacy_magnitude"]
    e = r.edits[0]
    assert e["locality"] >= 0.9 and 0 < e["kl"] < 0.1
    assert e["sum_accuracy"] == e["pre_sum_accuracy"] == 1.0
    # evaluating an unapplied handle applies it only while measuring and gives the same numbers
    r2 = evaluator.evaluate(handle, [records[0]])
    assert not handle.applied and same_weights(weights(embedded), before)
    assert r2.records == r.records and r2.edits == r.edits


def test_in_context_edit_context_reaches_every_prompt(embedded, records, evaluator):
    rec = records[0]
    context = f"{rec.prompt} {rec.target_new}. "
    handle = EditHandle("icl", {}, {}, [rec.to_dict()], embedded.name, embedded.fingerprint(), context=context)
    before = weights(embedded)
    r = evaluator.evaluate(handle, [rec])
    assert same_weights(weights(embedded), before)
    direct = rewrite_scores(embedded, rec, handle.prompt)
    assert r.records[0]["efficacy_magnitude"] == pytest.approx(direct["efficacy_magnitude"])
    assert r.records[0]["efficacy_magnitude"] > r.records[0]["pre_efficacy_magnitude"]
    # unrelated prompts were asked with the context in front: their next-token distributions moved
    assert r.edits[0]["kl"] > 0


def test_subject_prompts_are_left_out_of_locality(embedded, records):
    ev = Evaluator(embedded, CFG)
    ev.prepare(records)
    subj = next(p.subject for p in ev._probes if p.kind == "fact")
    rec = EditRecord("x", "{} plays", subj, "harp", "violin")
    r = ev.evaluate(None, [rec])
    n_fact = sum(p.kind == "fact" for p in ev._probes)
    assert r.edits[0]["fact_accuracy_n"] == n_fact - 1


def test_result_round_trip_frame_and_plot(tmp_path, records, evaluator):
    r = evaluator.evaluate(None, records)
    back = EvalResult.load(r.save(tmp_path / "e.json"))
    assert back.records == r.records and back.summary() == r.summary()
    df = r.to_frame()
    assert len(df) == len(records) and {"efficacy_success", "locality", "kl"} <= set(df.columns)
    fig = r.plot()
    assert len(fig.data) >= 2
    merged = EvalResult.merge([r, r])
    assert [e["edit"] for e in merged.edits] == [0, 1] and len(merged.records) == 2 * len(records)


def test_generic_prompts_without_a_world(sharp, records):
    m = sharp("llama")  # a tiny random model: no world.json, so neighbours + the built-in generic prompts
    r = evaluate(m, None, records[:1], CFG)
    assert r.edits[0]["locality"] == 1.0 and r.edits[0]["fact_accuracy"] is None
    assert r.edits[0]["locality_n"] >= 20


def test_bad_input(embedded, records, evaluator):
    with pytest.raises(InputError, match="positive integer"):
        EvalConfig(locality_tokens=0)
    with pytest.raises(InputError, match="EditHandle"):
        evaluator.evaluate("rome", records)
    with pytest.raises(InputError, match="non-empty"):
        evaluator.evaluate(None, [])
    with pytest.raises(InputError, match="requests"):
        evaluate(embedded, None, None, CFG)
