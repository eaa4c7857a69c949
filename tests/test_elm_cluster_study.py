"""analyses/elm_cluster.py: the pieces its numbers rest on - intervals, the grid, the n-gram entropy, the
result object (round trip, table, figure), and the contrast check's eta-0 row against the model's own P.
No edit is made here (tests/test_elm.py covers the editor)."""

from __future__ import annotations

import math
import random

import pytest
import torch

import mechedit.editing  # noqa: F401  (before mechedit.evaluation: their imports are circular the other way round)
from mechedit.evaluation.stats import mean_ci, wilson


@pytest.fixture(scope="module")
def study(analysis_script):
    return analysis_script("elm_cluster")


def test_rate_is_wilson_over_prompts(study):
    r = study.rate(855, 864)
    assert (r["k"], r["n"]) == (855, 864)
    assert r["value"] == pytest.approx(855 / 864)
    assert (r["lo"], r["hi"]) == wilson(855, 864)
    assert r["lo"] < r["value"] < r["hi"]
    assert study.rate(0, 10)["lo"] == 0.0 and study.rate(10, 10)["hi"] == 1.0


def test_perplexity_interval_is_exp_of_the_nll_interval(study):
    nll = [1.2, 1.5, 1.4, 1.1, 1.6]
    p = study.perplexity(nll)
    m, lo, hi = mean_ci(nll)
    assert (p["value"], p["lo"], p["hi"]) == pytest.approx((math.exp(m), math.exp(lo), math.exp(hi)))
    assert p["lo"] < p["value"] < p["hi"] and p["n"] == 5
    same = study.perplexity([math.log(4.0)] * 3)  # no spread: a point at perplexity 4
    assert same["value"] == same["lo"] == same["hi"] == pytest.approx(4.0)


def test_ngram_entropy(study):
    assert study.ngram_entropy("a a a a a a") == 0.0  # one bigram, one trigram
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]  # all distinct: uniform n-grams
    want = (2 / 3 * math.log2(len(words) - 1) + 4 / 3 * math.log2(len(words) - 2)) / 2
    assert study.ngram_entropy(" ".join(words)) == pytest.approx(want)
    assert study.ngram_entropy("word") == 0.0


def test_grid_has_every_cell_once_eta_outermost(study):
    cells = study.grid(["default", "world"], [1.0, 4.0], [(0, 1, 2), (4, 5, 6)])
    assert len(cells) == len(set(cells)) == 8
    assert {c[1] for c in cells[:4]} == {1.0} and {c[1] for c in cells[4:]} == {4.0}
    assert set(cells) == {(p, e, ls) for p in ("default", "world") for e in (1.0, 4.0)
                          for ls in ((0, 1, 2), (4, 5, 6))}


def _scores(study, rng):
    s = {k: study.rate(rng.randint(1, 99), 100) for k in study.RATES}
    s["filler_ppl"] = study.perplexity([1 + rng.random() for _ in range(20)])
    s |= {k: study.mean([3 + rng.random() for _ in range(24)]) for k in ("entropy_cluster", "entropy_other")}
    return s


def test_result_round_trip_table_and_figure(study, tmp_path):
    rng = random.Random(0)
    runs = [{"prompts": p, "eta": e, "layers": list(ls), "scores": _scores(study, rng)}
            for p, e, ls in study.grid(["world", "default"], [4.0, 1.0], [(4, 5, 6), (0, 1, 2)])]
    res = study.ELMClusterStudy(_scores(study, rng), runs, {"seed": 0})
    res.save(tmp_path / "r.json")
    assert study.ELMClusterStudy.load(tmp_path / "r.json") == res

    df = res.to_frame()
    assert len(df) == (1 + len(runs)) * len(study.RATES + study.MEANS)
    assert ((df["lo"] <= df["value"]) & (df["value"] <= df["hi"])).all()
    table = res.to_markdown().splitlines()
    assert len(table) == 2 + 1 + len(runs)
    body = [line.split(" | ")[:3] for line in table[3:]]  # sorted: default first, then eta, then layers
    assert body[0] == ["| default", "1", "0,1,2"] and body[-1] == ["| world", "4", "4,5,6"]
    assert "[" in table[2] and table[2].count("[") == len(study.RATES + study.MEANS)

    fig = res.plot()
    points = [t for t in fig.data if t.error_x is not None and t.error_x.array is not None]
    assert len(points) == 2 * (1 + len(runs))  # training and held-out panels
    for t in points:  # every error bar reaches from the interval's low to its high end, inside [0, 1]
        assert 0 <= t.x[0] - t.error_x.arrayminus[0] and t.x[0] + t.error_x.array[0] <= 1
        assert 0 <= t.y[0] - t.error_y.arrayminus[0] and t.y[0] + t.error_y.array[0] <= 1


def test_merge_takes_every_cell_once_and_refuses_other_baselines(study):
    rng = random.Random(1)
    base = _scores(study, rng)
    cells = study.grid(["default", "world"], [1.0, 4.0], [(0, 1, 2), (4, 5, 6)])
    runs = [{"prompts": p, "eta": e, "layers": list(ls), "scores": _scores(study, rng)} for p, e, ls in cells]
    a = study.ELMClusterStudy(base, runs[:5], {"total_cpu_seconds": 10.0})
    b = study.ELMClusterStudy(base, runs[3:], {"total_cpu_seconds": 5.0})  # cells 3, 4 in both
    m = study.merge([a, b])
    assert m.runs == runs and m.baseline == base
    assert m.settings["total_cpu_seconds"] == 15.0 and len(m.settings["parts"]) == 2
    other = study.ELMClusterStudy(_scores(study, rng), runs[5:], {})
    with pytest.raises(SystemExit):
        study.merge([a, other])


def test_contrast_check_at_eta_zero_is_the_models_own_probability(study, embedded):
    from mechedit.toy.world import World
    from mechedit.tracing.common import encode_target

    world = World.load(embedded.path / "world.json")
    rows = study.contrast_check(embedded, world, {"default": {}}, [1.0], n=5)
    assert {(r["group"], r["eta"]) for r in rows} == {(g, e) for g in ("cluster", "other") for e in (0.0, 1.0)}
    tok = embedded.tokenizer
    for group in ("cluster", "other"):
        facts = [(p, a) for p, a, f in world.recall_prompts("train") if (f.subject in world.cluster) ==
                 (group == "cluster")]
        own = []
        for p, a in random.Random(0).sample(facts, 5):  # the same draw as the check's
            ids = torch.tensor([tok(p)["input_ids"]])
            with torch.no_grad():
                probs = embedded.hf_model(input_ids=ids).logits[0, -1].float().softmax(-1)
            own.append(float(probs[encode_target(embedded, p, a.strip())[0]]))
        row = next(r for r in rows if r["group"] == group and r["eta"] == 0.0)
        assert row["p_answer"] == pytest.approx(sum(own) / 5, abs=1e-4)
        assert row["lo"] <= row["p_answer"] <= row["hi"]
        assert row["n"] == 5


def test_smollm2_fact_lists_are_well_formed(study):
    from mechedit.data import EditRecord

    for template, subject, answer, para in study.FRANCE:
        r = EditRecord(0, template, subject, "?", answer)  # the records the SmolLM2 cell edits with
        assert answer and r.prompt not in (para,) and subject in r.prompt
    trained = {t.replace("{}", s) for t, s, _, _ in study.FRANCE} | {p for _, _, _, p in study.FRANCE}
    assert not trained & {p for p, _ in study.OTHER}  # other facts are never France's prompts
    assert not any(p in t for t in study.RETAIN for p, _ in study.OTHER)  # nor retain text
