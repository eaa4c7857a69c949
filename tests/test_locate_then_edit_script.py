"""analyses/locate_then_edit.py: the layer spec parses to what it says and refuses what it cannot mean, the trace
peak among swept layers is the argmax over exactly those layers, the known-fact draw keeps only known facts and is
prefix-stable, ``knows`` agrees with the model's greedy answer, and the analysis of a layer subset compares the best
swept layer with the peak among the swept layers (the peak over all layers reported beside it). The SmolLM2 run
itself is not tested here (minutes per fact)."""

from __future__ import annotations

import pytest
import torch

import mechedit.editing  # noqa: F401  (before mechedit.evaluation: a circular import otherwise)
from mechedit.data import EditRecord
from mechedit.editing.sweep import LayerSweepResult
from mechedit.errors import InputError
from mechedit.tracing.causal import CausalTraceConfig, CausalTraceResult


@pytest.fixture(scope="module")
def lte(analysis_script):
    return analysis_script("locate_then_edit")


def test_parse_layers(lte):
    assert lte.parse_layers(None, 8) == list(range(8))
    assert lte.parse_layers("all", 8) == list(range(8))
    assert lte.parse_layers("0:30:3", 30) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
    assert lte.parse_layers("2:5", 30) == [2, 3, 4]
    assert lte.parse_layers("6,8", 30) == [6, 8]
    for bad in ("0:31:3", "6,30", "6,6", "a,b", "5:2", "0:30:0", "1:2:3:4", "-1"):
        with pytest.raises(InputError):
            lte.parse_layers(bad, 30)


def _trace(scores: list[float], low: float = 0.0) -> tuple[list[float], CausalTraceResult]:
    tokens = ["<s>", "A", "B", " is"]
    mlp = torch.tensor([[0.1, 0.2, s, 0.3] for s in scores])  # the subject "A B" is tokens 1..2
    r = CausalTraceResult(prompt="A B is", subject="A B", tokens=tokens, subject_range=(1, 3), answer=" x",
                          answer_ids=[5], low_score=low, high_score=1.0, scores={"mlp": mlp},
                          config=CausalTraceConfig(kinds=("mlp",), window=1, samples=1), noise_scale=1.0,
                          model_name="m", model_fingerprint="f")
    return scores, r


def _sweep(trace_scores: list[float], layers: list[int], successes: dict[int, float]) -> LayerSweepResult:
    rows = []
    for layer in layers:
        s = successes.get(layer, 0.0)
        rows.append({"layer": layer, "efficacy_success": s, "paraphrase_success": s, "neighborhood_success": 1.0,
                     "efficacy_magnitude": s, "paraphrase_magnitude": s, "neighborhood_magnitude": 0.1,
                     "target_prob": s, "update_ratio": 0.1, "seconds": 0.0, "error": None})
    peak = max(range(len(trace_scores)), key=lambda i: (trace_scores[i], -i))
    return LayerSweepResult(layers=layers, rows=rows, unedited={}, trace_scores=trace_scores, trace_low=0.0,
                            trace_high=1.0, trace_peak=peak, trace_info={},
                            request={"template": "{} is", "subject": "A B", "case_id": 7}, hparams={},
                            model_name="m", model_fingerprint="f")


def test_swept_peak_is_argmax_over_swept_layers(lte):
    trace = [0.1, 0.9, 0.5, 0.5, 0.2, 0.05]
    assert lte.swept_peak(_sweep(trace, list(range(6)), {})) == 1  # every layer: the trace's own peak
    assert lte.swept_peak(_sweep(trace, [0, 2, 3, 5], {})) == 2  # tie 2/3: the first, as argmax
    assert lte.swept_peak(_sweep(trace, [4, 5], {})) == 4


def test_analysis_of_a_layer_subset_compares_with_the_peak_among_swept(lte):
    # fact 1: peak over all layers 1 (not swept), among swept 2, and layer 2 edits best -> a hit among swept
    # fact 2: peak 4 (swept), but layer 0 edits best -> a miss
    t1, r1 = _trace([0.1, 0.9, 0.5, 0.2, 0.1, 0.0])
    t2, r2 = _trace([0.0, 0.1, 0.2, 0.3, 0.8, 0.1])
    swept = [0, 2, 4]
    sweeps = [_sweep(t1, swept, {2: 1.0, 0: 0.5}), _sweep(t2, swept, {0: 1.0})]
    config = CausalTraceConfig(kinds=("mlp",), window=1, samples=1)
    result, lines, _ = lte.analyse([r1, r2], sweeps, config, swept, extended=True)
    assert result["trace_peaks"] == {1: 1, 4: 1}  # over all layers
    assert result["trace_peaks_among_swept"] == {2: 1, 4: 1}
    assert result["peak_all_layers_is_swept"] == 1
    assert result["best_layers"] == {0: 1, 2: 1}
    assert result["peak_is_best"]["count"] == 1 and result["peak_is_best"]["value"] == 0.5
    assert result["mean_abs_distance"] == (0 + 4) / 2
    assert [e["layer"] for e in result["per_layer"]] == swept  # per-layer means only over swept layers
    assert result["per_layer"][0]["efficacy_success"] == 0.75  # (0.5 + 1.0) / 2 at layer 0
    assert len(result["mean_trace_effect_all_layers"]) == 6
    assert result["mean_trace_effect_all_layers"][1] == pytest.approx(0.5)  # (0.9 + 0.1) / 2
    assert [f["trace_peak_among_swept"] for f in result["facts"]] == [2, 4]
    assert result["score_at_trace_peak"]["efficacy_success"][0] == pytest.approx(0.5)  # 1.0 (fact 1), 0.0 (fact 2)
    assert any("among swept" in line for line in lines)
    # the same facts analysed as if every layer had been swept use the trace's own peak, without the extra keys
    full = [_sweep(t1, list(range(6)), {2: 1.0}), _sweep(t2, list(range(6)), {4: 1.0})]
    result, _, _ = lte.analyse([r1, r2], full, config, list(range(6)), extended=False)
    assert result["peak_is_best"]["count"] == 1 and "trace_peaks_among_swept" not in result


def _record(i: int, target: str) -> EditRecord:
    return EditRecord(case_id=i, template="{} is", subject=f"s{i}", target_new="zzz", target_true=target)


def test_known_records_keeps_known_facts_and_is_prefix_stable(lte):
    records = [_record(i, "yes" if i % 3 == 0 else "no") for i in range(60)]
    def known(model, r):
        return r.target_true == "yes"

    five, drawn5 = lte.known_records(None, records, 5, seed=0, known=known)
    ten, drawn10 = lte.known_records(None, records, 10, seed=0, known=known)
    assert len(five) == 5 and all(r.target_true == "yes" for r in ten)
    assert ten[:5] == five and drawn10 >= drawn5 >= 5
    assert drawn5 == 1 + max(i for i, r in enumerate(_order(records, 0)) if r in five)  # drawn = tested up to the 5th
    assert lte.known_records(None, records, 10, seed=1, known=known)[0] != ten
    everything, drawn = lte.known_records(None, records, 100, seed=0, known=known)
    assert len(everything) == 20 and drawn == 60  # never more than there are


def _order(records, seed):
    import random

    order = list(records)
    random.Random(seed).shuffle(order)
    return order


def test_knows_is_the_greedy_first_token(lte, embedded):
    from mechedit.answering import answers
    from mechedit.toy.export import embedded_world, world_records
    from mechedit.tracing.common import encode_target

    r = world_records(embedded_world(), n=1, seed=0)[0]
    top = answers(embedded, [r.prompt])[0].top.strip()
    other = next(t for t in (r.target_new, r.target_true, "zebra")
                 if encode_target(embedded, r.prompt, t)[0] != encode_target(embedded, r.prompt, top)[0])
    right = EditRecord(case_id=1, template=r.template, subject=r.subject, target_new=other, target_true=top)
    wrong = EditRecord(case_id=2, template=r.template, subject=r.subject, target_new=top, target_true=other)
    assert lte.knows(embedded, right)
    assert not lte.knows(embedded, wrong)


def test_pearson_is_none_where_undefined(lte):
    assert lte.pearson([0.0, 1.0, 2.0], [1.0, 3.0, 5.0]) == pytest.approx(1.0)
    assert lte.pearson([0.0, 1.0, 2.0], [2.0, 1.0, 0.0]) == pytest.approx(-1.0)
    assert lte.pearson([0.0, 1.0], [1.0, 1.0]) is None  # one side constant (e.g. every edit succeeded)
    assert lte.pearson([0.5], [1.0]) is None


def test_stats_clock_charges_statistics_to_the_layer_being_edited(lte):
    clock = lte.StatsClock([3, 27])
    clock("trace", 0, 10)
    clock("stats", 0, 5)  # before any layer: not charged
    clock("layer", 0, 2)
    clock("stats", 0, 5)
    sum(i * i for i in range(200_000))  # some CPU time
    clock("stats", 5, 5)
    clock("layer", 1, 2)  # layer 27: its statistics were cached, no "stats" call
    clock("layer", 2, 2)
    assert list(clock.seconds) == [3] and clock.seconds[3] > 0


def test_smollm2_rome_is_pinned_in_full(lte):
    from dataclasses import fields

    from mechedit.editing.methods import make_hparams
    from mechedit.editing.rome import ROMEHyperParams

    pinned = lte.PINNED["smollm2-135m"]
    assert set(pinned) == {f.name for f in fields(ROMEHyperParams)}  # a new library field must be pinned here too
    d = make_hparams("rome", dict(pinned)).to_dict()
    assert {k: (list(map(list, v)) if k == "prefix_lengths" else v) for k, v in d.items()} == pinned
    assert (pinned["mom2_source"], pinned["mom2_n_samples"], pinned["mom2_max_tokens"]) == ("model", 1000, 64)
    assert pinned["clamp_norm_factor"] == 4.0 and pinned["clamp_norm_max"] is None  # ROME's clamp, no widening
