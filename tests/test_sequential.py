"""Sequential editing (mechedit.editing.sequential): sequential ROME and AlphaEdit on the embedded model.

Few requests, few optimisation steps, one context prefix and small key statistics (temporary cache): the
mechanics and invariants, not the quality (analyses/sequential_edits.py measures that).
"""

from __future__ import annotations


import pytest
import torch

from conftest import same_weights, snapshot
import mechedit
from mechedit.editing import EditHandle, ROMEHyperParams
from mechedit.editing.memit import MEMITHyperParams
from mechedit.editing.methods import edit, make_hparams
from mechedit.editing.rome.layer_stats import layer_stats
from mechedit.editing.rome.repr_tools import mlp_keys, pad_right
from mechedit.editing.sequential import (
    SequentialHyperParams,
    alphaedit,
    null_space,
    sequential_rome,
)
from mechedit.errors import DataFormatError, InputError, MecheditError
from mechedit.toy.export import embedded_world, world_records

ROME = ROMEHyperParams(layer=1, context_prefixes=("The weather was mild.",), v_num_grad_steps=8,
                       mom2_source="world", mom2_n_samples=300, mom2_max_tokens=64)
MEMIT = MEMITHyperParams(layers=(1, 2), context_prefixes=("The weather was mild.",), v_num_grad_steps=8,
                         mom2_source="world", mom2_n_samples=300, mom2_max_tokens=64)
HP = SequentialHyperParams(rome=ROME, memit=MEMIT)


pytestmark = pytest.mark.usefixtures("stats_cache")  # key statistics in a temporary cache


@pytest.fixture(scope="module")
def records():
    return world_records(embedded_world(), n=3, seed=5)



def test_sequential_rome_total_delta_restores_bit_exactly_and_reapplies_identically(embedded, records, tmp_path):
    before = snapshot(embedded)
    seen = []
    with sequential_rome(embedded, records, HP, progress=lambda s, d, t: seen.append((s, d, t))) as h:
        assert h.method == "seq-rome" and set(h.deltas) == {"model.layers.1.mlp.down_proj.weight"}
        assert h.evidence["n_applied"] + len(h.evidence["skipped"]) == len(records)
        assert [x for x in seen if x[0] == "edit"] == [("edit", k, 3) for k in (1, 2, 3)]
        edited = {n: p.detach().clone() for n, p in embedded.hf_model.named_parameters()}
        h.save(tmp_path / "seq")
    assert same_weights(embedded, before)
    fresh = mechedit.load()
    with EditHandle.load(tmp_path / "seq").apply(fresh):
        assert all(torch.equal(p, edited[n]) for n, p in fresh.hf_model.named_parameters())


def test_a_failing_step_leaves_the_model_as_it_was(embedded, records):
    before = snapshot(embedded)
    bad = SequentialHyperParams(rome=ROMEHyperParams(**{**ROME.to_dict(), "max_update_ratio": 1e-9}))
    with pytest.raises(MecheditError, match="exploding"):
        sequential_rome(embedded, records, bad)
    assert same_weights(embedded, before)


def test_null_space_projector_annihilates_the_preserved_keys(embedded):
    texts = [r.prompt for r in world_records(embedded_world(), n=120, seed=1)]
    stats = layer_stats(embedded, 1, texts, n_samples=len(texts), max_tokens=64)
    ns = null_space(stats.mom2, 0.02)
    P = ns.P
    assert torch.allclose(P, P.T) and torch.allclose(P @ P, P, atol=1e-10) and 0 < ns.n_null < embedded.d_mlp
    # the very keys the statistics were read from
    rows = [embedded.encode(t)[:64] for t in texts]
    keys = mlp_keys(embedded, 1, pad_right(rows))  # (B, T, d_mlp)
    K0 = torch.cat([keys[i, :len(r)] for i, r in enumerate(rows)]).double()  # (N, d_mlp)
    assert (K0 @ P).norm() ** 2 <= 0.02 * K0.norm() ** 2 * (1 + 1e-9)
    assert (K0 @ P).norm() / K0.norm() == pytest.approx(ns.energy ** 0.5, rel=1e-6)


def test_alphaedit_updates_lie_in_the_null_space_and_restore_bit_exactly(embedded, records):
    before = snapshot(embedded)
    # the unedited model's statistics (layer 2's keys depend on layer 1, which the edit changes)
    P = {layer: null_space(layer_stats(embedded, layer, "world", 300, max_tokens=64).mom2, HP.nullspace_energy).P
         for layer in (1, 2)}
    with alphaedit(embedded, records, HP) as h:
        assert h.method == "alphaedit"
        assert set(h.deltas) == {f"model.layers.{layer}.mlp.down_proj.weight" for layer in (1, 2)}
        assert len(h.evidence["steps"]) == len(records)
        for layer in (1, 2):
            d_io = h.deltas[f"model.layers.{layer}.mlp.down_proj.weight"].double().T  # (d_mlp, d_model)
            assert (P[layer] @ d_io - d_io).norm() <= 1e-5 * d_io.norm()
    assert same_weights(embedded, before)


def test_alphaedit_through_the_method_table_in_batches(embedded, records):
    before = snapshot(embedded)
    hp = make_hparams("alphaedit", {**HP.to_dict(), "batch_size": 2})
    with edit(embedded, records, "alphaedit", hp) as h:
        assert [s["case_ids"] for s in h.evidence["steps"]] == [[r.case_id for r in records[:2]],
                                                                [records[2].case_id]]
    assert same_weights(embedded, before)


def test_bad_inputs_fail_clearly_with_nothing_changed(embedded, records):
    before = snapshot(embedded)
    with pytest.raises(InputError, match="non-empty"):
        sequential_rome(embedded, [], HP)
    with pytest.raises(InputError, match="out of range"):
        alphaedit(embedded, records, SequentialHyperParams(memit=MEMITHyperParams(layers=(7, 9))))
    with pytest.raises(InputError, match="out of range"):
        sequential_rome(embedded, records, SequentialHyperParams(rome=ROMEHyperParams(layer=12)))
    with pytest.raises(InputError, match="statistics"):
        alphaedit(embedded, records, SequentialHyperParams(memit=MEMITHyperParams(layers=(1,),
                                                                                  mom2_adjustment=False)))
    assert same_weights(embedded, before)


def test_hparams_round_trip_the_nesting_and_take_dotted_overrides():
    hp = SequentialHyperParams(rome=ROMEHyperParams(layer=2), memit=MEMITHyperParams(layers=(0, 1)), batch_size=4)
    d = hp.to_dict()
    assert d["rome"]["layer"] == 2 and d["memit"]["layers"] == [0, 1]
    assert SequentialHyperParams.from_dict(d) == hp
    import json
    assert SequentialHyperParams.from_dict(json.loads(json.dumps(d))) == hp
    o = hp.with_overrides(["rome.layer=3", "memit.layers=[1, 2]", "nullspace_energy=0.1"])
    assert (o.rome.layer, o.memit.layers, o.nullspace_energy, o.batch_size) == (3, (1, 2), 0.1, 4)
    assert make_hparams("seq-rome", ["rome.v_lr=0.1"]).rome.v_lr == 0.1
    for bad in ({"batch_size": 0}, {"nullspace_energy": 1.0}, {"l2": 0}, {"rome": 3}):
        with pytest.raises(InputError):
            SequentialHyperParams(**bad)
    with pytest.raises(InputError):
        hp.with_overrides(["nope.layer=1"])
    with pytest.raises(DataFormatError):
        SequentialHyperParams.from_dict({"rome": {"layerz": 1}})
