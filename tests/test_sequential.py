"""Sequential editing (mechedit.editing.sequential): sequential ROME, AlphaEdit and sequential MEMIT on the
embedded model.

Few requests, few optimisation steps, one context prefix and small key statistics (temporary cache): the
mechanics and invariants, not the quality (analyses/sequential_edits.py measures that).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import same_weights, snapshot
import mechedit
from mechedit.editing import EditHandle, ROMEHyperParams
from mechedit.editing.memit import MEMITHyperParams, memit
from mechedit.editing.memit.compute_ks import prepare, read_keys, read_template_keys
from mechedit.editing.rome import context_templates
from mechedit.editing.methods import edit, make_hparams
from mechedit.editing.rome.layer_stats import layer_stats
from mechedit.editing.rome.repr_tools import mlp_keys, pad_right
from mechedit.editing.sequential import (
    EditKeys,
    SequentialHyperParams,
    alphaedit,
    null_space,
    prefer_true,
    sequential_memit,
    sequential_rome,
    subject_revisits,
)
from mechedit.evaluation.counterfact import rewrite_scores
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


def test_seq_memit_one_step_is_memit_and_restores_bit_exactly(embedded, records):
    # With nothing protected yet, a step's solve (λC + K Kᵀ)⁻¹ K R is MEMIT's own.
    before = snapshot(embedded)
    with memit(embedded, records[:2], MEMIT) as h:
        reference = {n: d.clone() for n, d in h.deltas.items()}
    with sequential_memit(embedded, records[:2], replace(HP, batch_size=2)) as h:
        assert h.method == "seq-memit" and set(h.deltas) == set(reference)
        for n, d in h.deltas.items():
            assert torch.allclose(d, reference[n], rtol=1e-4, atol=1e-6 * float(d.abs().max())), n
    assert same_weights(embedded, before)


def two_people_one_layer(embedded):
    """Two requests about different people, MEMIT on layer 1 only, and their keys there ((2, d_mlp) float64;
    layer 1's keys do not depend on its own output projection, so no edit changes them)."""
    recs = world_records(embedded_world(), n=1000, seed=0)[:12]
    first = recs[0]
    second = next(r for r in recs if r.subject != first.subject)
    mh = replace(MEMIT, layers=(1,))
    prep = prepare(embedded, [first, second], context_templates(embedded, mh), mh.key_position)
    return first, second, mh, read_keys(embedded, prep, 1)


def test_seq_memit_keeps_the_outputs_at_earlier_edits_keys_as_far_as_they_weigh(embedded):
    # Two people, one step each, one layer (whose keys no edit changes). The second step's change at the first
    # edit's key shrinks as the first edit weighs more in the solve, and is largest when it is not protected.
    first, second, mh, (k1, k2) = two_people_one_layer(embedded)
    name = "model.layers.1.mlp.down_proj.weight"
    with sequential_memit(embedded, [first], SequentialHyperParams(memit=mh)) as h:
        step1 = h.deltas[name].double()
    moved = {}
    for label, hp in {"unprotected": SequentialHyperParams(memit=mh, protect_edits=False),
                      "μ=1": SequentialHyperParams(memit=mh),
                      "μ=1000": SequentialHyperParams(memit=mh, protect_weight=1000.0)}.items():
        with sequential_memit(embedded, [first, second], hp) as h:
            step2 = h.deltas[name].double() - step1  # (d_model, d_mlp)
            moved[label] = float((step2 @ k1).norm() / (step2 @ k2).norm())
    assert moved["unprotected"] > moved["μ=1"] > moved["μ=1000"]
    assert moved["μ=1000"] < 0.02 * moved["unprotected"]


def test_seq_memit_anchored_to_the_original_takes_back_lambda_c_d_through_the_same_solve(embedded):
    # anchor_original charges λC on the total change: the second step solves A Δ = k₂ r₂ − λ C D₁ instead of
    # A Δ = k₂ r₂ (A = λC + μ k₁k₁ᵀ + k₂k₂ᵀ, D₁ the first step's change). Both runs see the same model before
    # step 2 (the first step is plain MEMIT either way), so A (Δ_plain − Δ_anchored) = λ C D₁ exactly, and the
    # total change of the anchored run costs less under λC plus the edit terms it trades against.
    first, second, mh, K = two_people_one_layer(embedded)
    C = layer_stats(embedded, 1, mh.mom2_source, mh.mom2_n_samples, max_tokens=mh.mom2_max_tokens).mom2.double()
    lam = mh.mom2_update_weight
    name = "model.layers.1.mlp.down_proj.weight"
    before = snapshot(embedded)
    totals = {}
    for anchored in (False, True):
        hp = SequentialHyperParams(memit=mh, anchor_original=anchored)
        with sequential_memit(embedded, [first], hp) as h:
            d1 = h.deltas[name].double().T  # (d_mlp, d_model)
        with sequential_memit(embedded, [first, second], hp) as h:
            totals[anchored] = h.deltas[name].double().T
            assert h.evidence["anchor_original"] is anchored
    assert same_weights(embedded, before)
    step_plain, step_anchored = totals[False] - d1, totals[True] - d1
    A = lam * C + torch.outer(K[0], K[0]) + torch.outer(K[1], K[1])
    pulled = A @ (step_plain - step_anchored)
    assert (pulled - lam * C @ d1).norm() <= 1e-3 * (lam * C @ d1).norm()
    # the anchored total spends less of λ‖D‖²_C on ordinary keys
    cost = {a: float(torch.trace(d.T @ C @ d)) for a, d in totals.items()}
    assert cost[True] < cost[False]


def test_edit_keys_count_each_edit_once_when_an_edit_is_written_again():
    g = torch.Generator().manual_seed(0)
    keys = EditKeys([3], 6)
    K1, K2 = (torch.randn(2, 6, generator=g, dtype=torch.float64) for _ in range(2))
    keys.add(3, [0, 1], K1)
    keys.drop([0, 7])  # 7 was never protected
    keys.add(3, [0, 2], K2)  # edit 0 again, with new keys
    expected = torch.outer(K1[1], K1[1]) + K2.T @ K2
    assert torch.allclose(keys.matrix[3], expected, atol=1e-12)
    keys.add(3, [2], K2[1:])  # adding an edit already there replaces it
    assert torch.allclose(keys.matrix[3], expected, atol=1e-12)
    assert set(keys.keys[3]) == {0, 1, 2}


def test_edit_keys_with_one_key_per_context_protect_their_mean_second_moment():
    g = torch.Generator().manual_seed(1)
    keys = EditKeys([0], 5)
    K = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)  # 2 edits, 3 contexts each
    keys.add(0, [4, 9], K)
    expected = sum(K[j].T @ K[j] / 3 for j in range(2))
    assert torch.allclose(keys.matrix[0], expected, atol=1e-12)
    keys.drop([4])
    assert torch.allclose(keys.matrix[0], K[1].T @ K[1] / 3, atol=1e-12)
    keys.add(0, [9], K[1, :1])  # (1, d): one key, replaces edit 9's three
    assert torch.allclose(keys.matrix[0], torch.outer(K[1, 0], K[1, 0]), atol=1e-12)


def test_seq_memit_protecting_every_context_holds_the_edit_prompts_own_key(embedded):
    # The first edit's prompt reads its bare template's key, not the mean over templates that MEMIT solves for.
    # Held firmly (μ = 1000), a later step leaves the mean key's output nearly alone either way; only with
    # protect_contexts does it also leave the bare prompt's key (and every other template's) alone.
    first, second, mh, _ = two_people_one_layer(embedded)
    mh = replace(mh, context_prefixes=("The weather was mild.", "He said so twice.", "Nobody knew"))
    prep = prepare(embedded, [first], context_templates(embedded, mh), mh.key_position)
    Kt = read_template_keys(embedded, prep, 1)[0]  # (4, d_mlp): bare prompt first
    name = "model.layers.1.mlp.down_proj.weight"
    before = snapshot(embedded)
    moved = {}
    for contexts in (False, True):
        hp = SequentialHyperParams(memit=mh, protect_weight=1000.0, protect_contexts=contexts)
        with sequential_memit(embedded, [first], hp) as h:
            d1 = h.deltas[name].double()
        with sequential_memit(embedded, [first, second], hp) as h:
            step2 = h.deltas[name].double() - d1  # (d_model, d_mlp)
            assert h.evidence["protect_contexts"] is contexts
        moved[contexts] = (step2 @ Kt.T).norm(dim=0) / step2.norm()  # per template
    assert same_weights(embedded, before)
    assert float(moved[True][0]) < 0.5 * float(moved[False][0])
    assert float(moved[True].max()) < 0.1 * float(moved[False].max())


def test_seq_memit_retry_writes_again_exactly_the_subjects_whose_edit_missed(embedded):
    # One MEMIT step on the embedded model leaves most of these requests preferring their true target. With
    # retry_misses the step writes those again - with every request of a missed subject, since a subject shares
    # one value - and fewer miss after it; requests without a true target cannot be judged and are never retried.
    by_subject: dict[str, list] = {}
    for r in world_records(embedded_world(), n=1000, seed=0)[:40]:
        by_subject.setdefault(r.subject, []).append(r)
    people = list(by_subject.values())
    recs = [r for facts in people[:3] for r in facts[:2]] + [facts[0] for facts in people[3:5]]
    mh = replace(MEMIT, layers=(0, 1, 2), v_num_grad_steps=20)
    before = snapshot(embedded)
    with sequential_memit(embedded, recs, SequentialHyperParams(memit=mh, batch_size=8)) as h:
        missed = [recs[j] for j in prefer_true(embedded, recs, range(8))]
        plain = {n: d.clone() for n, d in h.deltas.items()}
    hp = SequentialHyperParams(memit=mh, batch_size=8, retry_misses=True)
    with sequential_memit(embedded, recs, hp) as h:
        retried = h.evidence["steps"][0]["retried"]
        assert retried == [r.case_id for r in recs if r.subject in {m.subject for m in missed}]
        assert set(retried) > {m.case_id for m in missed}  # a request that took, retried with its subject
        assert len(prefer_true(embedded, recs, range(8))) < len(missed)
    unjudged = [replace(r, target_true=None) for r in recs]
    with sequential_memit(embedded, unjudged, hp) as h:
        assert h.evidence["steps"][0]["retried"] == []
        assert all(torch.equal(d, plain[n]) for n, d in h.deltas.items())
    assert same_weights(embedded, before)


def test_seq_memit_refresh_writes_again_exactly_the_earlier_edits_that_lapsed(embedded):
    # Two steps of 8. With refresh_lapsed (retry off) the first step has nothing earlier to check, so the model
    # before the second step's refresh is the plain run's final model: the refresh must list exactly the first
    # step's requests that model prefers the true target on, write every request of their subjects again, and
    # leave fewer of them preferring it.
    recs = world_records(embedded_world(), n=1000, seed=0)[:16]
    mh = replace(MEMIT, layers=(0, 1, 2), v_num_grad_steps=20)
    first = range(8)
    before = snapshot(embedded)
    with sequential_memit(embedded, recs, SequentialHyperParams(memit=mh, batch_size=8)):
        lapsed = [recs[j] for j in prefer_true(embedded, recs, first)]
    assert lapsed  # the embedded model loses some: the test has something to refresh
    with sequential_memit(embedded, recs, SequentialHyperParams(memit=mh, batch_size=8, refresh_lapsed=True)) as h:
        steps = h.evidence["steps"]
        assert steps[0]["retried"] == [] and steps[0]["lapsed"] == []
        assert steps[1]["lapsed"] == [r.case_id for r in lapsed]
        subjects = {r.subject for r in lapsed}
        assert steps[1]["retried"] == [r.case_id for r in recs if r.subject in subjects]
        assert len(prefer_true(embedded, recs, first)) < len(lapsed)
    assert same_weights(embedded, before)


def test_subject_revisits_lists_the_earlier_edits_of_the_subjects_edited_now():
    recs = world_records(embedded_world(), n=1000, seed=0)[:12]
    by_subject = {}
    for j in range(7):
        by_subject.setdefault(recs[j].subject, []).append(j)
    assert recs[4].subject != recs[5].subject == recs[6].subject == recs[7].subject
    assert subject_revisits(recs, [7], by_subject) == [5, 6]
    assert subject_revisits(recs, [7, 8], by_subject) == [5, 6]
    assert subject_revisits(recs, [0], {}) == []


def test_alphaedit_keeps_a_subjects_earlier_edits_when_it_edits_it_again(embedded):
    # Three facts of one person, edited one after another. Their keys (the subject's last token) are nearly the
    # same, so without re-asserting the earlier edits the later ones are written where the earlier ones are
    # protected: on the embedded model only the first takes (measured: ES 1, 0, 0); with them, all three do.
    recs = world_records(embedded_world(), n=1000, seed=0)[6:9]
    assert len({r.subject for r in recs}) == 1 and len({r.relation_id for r in recs}) == 3
    before = snapshot(embedded)
    took = {}
    for merge in (True, False):
        with alphaedit(embedded, recs, SequentialHyperParams(memit=MEMIT, merge_subjects=merge)) as h:
            took[merge] = [rewrite_scores(embedded, r)["efficacy_success"] for r in recs]
            assert [s["reasserted"] for s in h.evidence["steps"]] == (
                [[], [recs[0].case_id], [recs[0].case_id, recs[1].case_id]] if merge else [[], [], []])
    assert took[True] == [1.0, 1.0, 1.0]
    assert sum(took[False]) < 3
    assert same_weights(embedded, before)


def test_bad_inputs_fail_clearly_with_nothing_changed(embedded, records):
    before = snapshot(embedded)
    with pytest.raises(InputError, match="non-empty"):
        sequential_rome(embedded, [], HP)
    with pytest.raises(InputError, match="out of range"):
        alphaedit(embedded, records, SequentialHyperParams(memit=MEMITHyperParams(layers=(7, 9))))
    with pytest.raises(InputError, match="out of range"):
        sequential_rome(embedded, records, SequentialHyperParams(rome=ROMEHyperParams(layer=12)))
    for editor in (alphaedit, sequential_memit):
        with pytest.raises(InputError, match="statistics"):
            editor(embedded, records, SequentialHyperParams(memit=MEMITHyperParams(layers=(1,),
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
    for bad in ({"batch_size": 0}, {"nullspace_energy": 1.0}, {"l2": 0}, {"protect_weight": -1.0}, {"rome": 3},
                {"merge_subjects": 1}):
        with pytest.raises(InputError):
            SequentialHyperParams(**bad)
    with pytest.raises(InputError):
        hp.with_overrides(["nope.layer=1"])
    with pytest.raises(DataFormatError):
        SequentialHyperParams.from_dict({"rome": {"layerz": 1}})
