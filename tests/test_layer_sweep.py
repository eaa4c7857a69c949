"""The edit-layer sweep (mechedit.editing.sweep) on the embedded model: ROME at three layers beside the causal
trace of the same fact. Key statistics are computed from 500 world texts into a temporary cache."""

from __future__ import annotations


from dataclasses import replace

import pytest
import torch

from mechedit.data import EditRecord
from mechedit.editing import ROMEHyperParams, rome
from mechedit.editing.sweep import LayerSweepResult, layer_sweep
from mechedit.errors import DataFormatError, InputError
from mechedit.evaluation.counterfact import SCORE_KEYS, rewrite_scores
from mechedit.model import canonical_param_name
from mechedit.toy.export import world_records
from mechedit.toy.world import World
from mechedit.tracing import live_hooks

HP = ROMEHyperParams(mom2_n_samples=500)
LAYERS = [0, 2, 5]


pytestmark = pytest.mark.usefixtures("stats_cache")  # key statistics in a temporary cache


@pytest.fixture(scope="module")
def record(embedded) -> EditRecord:
    return world_records(World.load(embedded.path / "world.json"), 3, seed=0)[1]


@pytest.fixture(scope="module")
def sweep(embedded, record):
    before = {canonical_param_name(n): p.detach().clone() for n, p in embedded.hf_model.named_parameters()}
    stages: dict[str, list] = {}
    result = layer_sweep(embedded, record, HP, LAYERS,
                         progress=lambda stage, done, total: stages.setdefault(stage, []).append((done, total)))
    after = {canonical_param_name(n): p for n, p in embedded.hf_model.named_parameters()}
    return result, before, after, stages


def test_the_model_is_bit_identical_afterwards_and_no_hook_is_left(embedded, sweep):
    _, before, after, _ = sweep
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert live_hooks(embedded) == []


def test_scores_are_in_range_and_the_rows_follow_the_layers(embedded, sweep):
    result, _, _, stages = sweep
    assert result.layers == LAYERS and [r["layer"] for r in result.rows] == LAYERS
    assert len(result.trace_scores) == embedded.n_layers
    assert 0 <= result.trace_low <= 1 and 0 <= result.trace_high <= 1
    assert result.trace_peak == max(range(embedded.n_layers), key=result.trace_scores.__getitem__)
    for row in [*result.rows, result.unedited]:
        for k in SCORE_KEYS:
            assert row[k] is not None  # world records have a true target, a paraphrase and a neighbour
            lo = 0.0 if k.endswith("success") else -1.0
            assert lo <= row[k] <= 1.0, (k, row[k])
    assert result.unedited["efficacy_success"] == 0.0  # the model knows the fact before the edit
    assert any(r["efficacy_success"] == 1.0 for r in result.rows)  # and some layer's edit wins
    assert stages["layer"][-1] == (len(LAYERS), len(LAYERS)) and "trace" in stages
    assert result.best_layer in LAYERS
    best = result.score(result.best_layer)
    assert all(result.score(layer) <= best for layer in LAYERS)


def test_the_default_layers_row_equals_a_direct_rome_edit(embedded, record, sweep):
    result, _, _, _ = sweep
    with rome(embedded, record, replace(HP, layer="fact")) as handle:  # this fact's trace peak
        direct = rewrite_scores(embedded, record)
        layer = handle.evidence["layer"]
    assert layer == result.trace_peak and layer in LAYERS, (layer, LAYERS)
    row = result.rows[LAYERS.index(layer)]
    for k in SCORE_KEYS:
        assert row[k] == pytest.approx(direct[k], abs=1e-6), k
    assert row["target_prob"] == pytest.approx(handle.evidence["target_prob"], abs=1e-6)
    assert handle.evidence["trace"]["scores"] == pytest.approx(result.trace_scores, abs=1e-6)


def test_frame_plot_and_save_load(sweep, tmp_path):
    result, _, _, _ = sweep
    frame = result.to_frame()
    assert list(frame["layer"]) == LAYERS
    assert frame["is_best"].sum() == 1 and frame["is_trace_peak"].sum() == (result.trace_peak in LAYERS)
    assert frame["trace_effect"].tolist() == pytest.approx([result.trace_scores[i] - result.trace_low for i in LAYERS])
    fig = result.plot()
    names = {t.name for t in fig.data}
    assert {"trace effect", "Efficacy success", "Paraphrase success", "Neighbourhood success"} <= names
    assert len(fig.layout.shapes) >= 2 * 2  # trace peak and best layer, on both panels
    loaded = LayerSweepResult.load(result.save(tmp_path / "sweep.json"))
    assert loaded == result and loaded.best_layer == result.best_layer
    (tmp_path / "other.json").write_text('{"format": "mechedit.patching/1"}')
    with pytest.raises(DataFormatError, match="LayerSweepResult"):
        LayerSweepResult.load(tmp_path / "other.json")


def test_bad_inputs_fail_before_anything_runs(embedded, record):
    fp = embedded.fingerprint()
    for layers, match in (([], "no layers"), ([0, 8], "out of range"), ([1, 1], "twice"), (["1"], "out of range")):
        with pytest.raises(InputError, match=match):
            layer_sweep(embedded, record, HP, layers)
    with pytest.raises(InputError, match="EditRecord"):
        layer_sweep(embedded, record.to_dict(), HP, [0])
    already = EditRecord(0, record.template, record.subject, record.target_true)
    with pytest.raises(InputError, match="already answers"):
        layer_sweep(embedded, already, HP, [0])
    assert embedded.fingerprint() == fp
