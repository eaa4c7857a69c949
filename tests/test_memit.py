"""MEMIT (mechedit.editing.memit) on the embedded model and on tiny random models.

Key statistics come from a few hundred texts, in a temporary cache; the value optimisation runs few steps with
one short context prefix. That is enough on the embedded model (a trained model whose facts live in layers 0-2)
for the edits to take; on tiny random models only the mechanics are checked (layers, layouts, restore).
"""

from __future__ import annotations

import pytest
import torch
from conftest import same_weights, snapshot

import mechedit
from mechedit.data import EditRecord
from mechedit.editing import EditHandle, layer_stats
from mechedit.editing.memit import MEMITHyperParams, memit
from mechedit.editing.memit.compute_ks import prepare, read_resid
from mechedit.editing.memit.compute_zs import compute_zs, compute_zs_reference
from mechedit.editing.methods import edit, make_hparams
from mechedit.errors import DataFormatError, InputError, MecheditError
from mechedit.evaluation.counterfact import answer_nll, rewrite_scores
from mechedit.model import canonical_param_name
from mechedit.toy.export import embedded_world, world_records

FAST = MEMITHyperParams(layers=(0, 1, 2), context_prefixes=("The weather was mild.",), v_num_grad_steps=12,
                        mom2_source="world", mom2_n_samples=300, mom2_max_tokens=64, mom2_update_weight=100.0)


pytestmark = pytest.mark.usefixtures("stats_cache")  # key statistics in a temporary cache


@pytest.fixture(scope="module")
def records():
    return world_records(embedded_world(), n=4, seed=3)



def test_edit_makes_the_records_true_changes_only_those_layers_and_restores_bit_exactly(embedded, records):
    before = snapshot(embedded)
    assert all(rewrite_scores(embedded, r)["efficacy_success"] == 0.0 for r in records)
    with memit(embedded, records, FAST) as h:
        assert h.method == "memit" and h.evidence["layers"] == [0, 1, 2]
        assert set(h.deltas) == {f"model.layers.{layer}.mlp.down_proj.weight" for layer in (0, 1, 2)}
        for name, p in embedded.hf_model.named_parameters():
            name = canonical_param_name(name)
            assert torch.equal(p, before[name]) != (name in h.deltas), name
        assert [rewrite_scores(embedded, r)["efficacy_success"] for r in records] == [1.0] * len(records)
    assert same_weights(embedded, before)


def test_saved_handle_reapplied_to_a_fresh_copy_gives_identical_weights(embedded, records, tmp_path):
    with memit(embedded, records[:2], FAST) as h:
        edited = {n: p.detach().clone() for n, p in embedded.hf_model.named_parameters()}
        h.save(tmp_path / "e")
    fresh = mechedit.load()
    with EditHandle.load(tmp_path / "e").apply(fresh):
        for n, p in fresh.hf_model.named_parameters():
            assert torch.equal(p, edited[n]), n


def test_the_method_table_dispatches_memit(embedded, records):
    before = snapshot(embedded)
    hp = make_hparams("memit", {"layers": [1, 2], "context_prefixes": [], "v_num_grad_steps": 3,
                                "mom2_source": "world", "mom2_n_samples": 300, "mom2_max_tokens": 64})
    with edit(embedded, records[:2], "memit", hp) as h:
        assert set(h.deltas) == {f"model.layers.{layer}.mlp.down_proj.weight" for layer in (1, 2)}
        assert MEMITHyperParams.from_dict(h.hparams) == hp
    assert same_weights(embedded, before)


def test_prefix_cached_value_forward_matches_a_plain_forward(embedded, records):
    """compute_zs runs each prompt's prefix once and the rest on top of a key/value cache; with no step taken
    (δ = 0) its target probabilities must be those of ordinary full forwards."""
    hp = MEMITHyperParams(layers=(2,), context_prefixes=("The weather was mild.", "I"), v_num_grad_steps=1)
    templates = ["{}", "The weather was mild. {}", "I {}"]
    prep = prepare(embedded, records, templates, hp.key_position)
    values = compute_zs(embedded, prep, 2, read_resid(embedded, prep, 2), hp)
    for i, r in enumerate(records):
        nll = answer_nll(embedded, [(t.replace("{}", r.prompt), r.target_new) for t in templates])
        assert values.target_prob[i] == pytest.approx(float(torch.exp(-nll).mean()), rel=1e-4)
    assert torch.equal(values.delta, torch.zeros_like(values.delta))


def test_requests_about_one_subject_share_their_value(embedded):
    world = embedded_world()
    recs = [r for r in world_records(world) if r.subject == world.facts[0].subject][:2]
    hp = MEMITHyperParams(layers=(2,), context_prefixes=(), v_num_grad_steps=3)
    prep = prepare(embedded, recs, ["{}"], hp.key_position)
    values = compute_zs(embedded, prep, 2, read_resid(embedded, prep, 2), hp)
    assert torch.equal(values.delta[0], values.delta[1]) and values.delta[0].norm() > 0


def _no_patched_blocks(m) -> bool:
    blocks = m.hf_model.get_submodule(m.arch.layers)
    return not any("forward" in vars(b) for b in blocks)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_upper_layer_values_equal_the_whole_stack_reference(sharp, arch):
    """compute_zs runs only the blocks above the value layer on the suffixes, grouped by suffix length;
    compute_zs_reference runs every block on right-padded suffixes with δ added by a hook. Same δs, losses and
    step counts to float tolerance, with prompts whose prefixes and suffixes differ in length, two requests
    about one subject, and a value layer in the middle of the stack."""
    m = sharp(arch)
    recs = [EditRecord(0, "Yesterday I met {}", "Voupeis Draexmir", "Paris"),
            EditRecord(1, "{} was born in", "Voupeis Draexmir", "Lisbon"),
            EditRecord(2, "The friend of {} lives in the city of", "Dalo Frenwick", "Rome")]
    templates = ["{}", "The weather was mild. {}", "I {}"]
    hp = MEMITHyperParams(layers=(0, 1), context_prefixes=(), v_num_grad_steps=6, batch_requests=2)
    prep = prepare(m, recs, templates, hp.key_position)
    z = read_resid(m, prep, 1)
    fast, ref = compute_zs(m, prep, 1, z, hp), compute_zs_reference(m, prep, 1, z, hp)
    assert torch.equal(fast.steps, ref.steps) and int(ref.steps.max()) == 6
    torch.testing.assert_close(fast.delta, ref.delta, atol=1e-5 * float(ref.delta.norm()), rtol=1e-3)
    torch.testing.assert_close(fast.loss, ref.loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast.target_prob, ref.target_prob, atol=1e-6, rtol=1e-4)
    assert float(ref.delta.norm(dim=1).min()) > 0 and torch.equal(fast.delta[0], fast.delta[1])
    assert _no_patched_blocks(m)


def test_requests_below_the_stop_loss_do_not_move(embedded, records):
    """ROME's early stop, per request: with a stop loss above every loss, each request takes one forward (the
    one that measures it) and keeps δ = 0, in both ways of computing."""
    hp = MEMITHyperParams(layers=(2,), context_prefixes=(), v_num_grad_steps=5, v_loss_stop=1e6)
    prep = prepare(embedded, records, ["{}"], hp.key_position)
    z = read_resid(embedded, prep, 2)
    for f in (compute_zs, compute_zs_reference):
        values = f(embedded, prep, 2, z, hp)
        assert values.steps.tolist() == [1] * len(records)
        assert torch.equal(values.delta, torch.zeros_like(values.delta))


def test_bfloat16_values_stay_close_to_float32(embedded, records):
    """v_precision="bfloat16" runs the value optimisation's matrix products in bfloat16: not the same δ, but
    close, and the edits still reach their targets."""
    hp = MEMITHyperParams(layers=(2,), context_prefixes=("The weather was mild.",), v_num_grad_steps=8)
    prep = prepare(embedded, records, ["{}", "The weather was mild. {}"], hp.key_position)
    z = read_resid(embedded, prep, 2)
    f32 = compute_zs(embedded, prep, 2, z, hp)
    b16 = compute_zs(embedded, prep, 2, z, MEMITHyperParams(**{**hp.to_dict(), "v_precision": "bfloat16"}))
    rel = (b16.delta - f32.delta).norm(dim=1) / f32.delta.norm(dim=1)
    assert float(rel.max()) < 0.1 and not torch.equal(b16.delta, f32.delta)
    assert (b16.target_prob - f32.target_prob).abs().max() < 0.05
    assert _no_patched_blocks(embedded)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_models_edit_only_the_given_layers_in_their_layout(sharp, arch):
    m = sharp(arch)
    before = snapshot(m)
    recs = [EditRecord(0, "Yesterday I met {}", "Voupeis Draexmir", "Paris"),
            EditRecord(1, "Yesterday I met {}", "Dalo Frenwick", "Lisbon")]
    hp = MEMITHyperParams(layers=(0, 1), context_prefixes=(), v_num_grad_steps=3, max_update_ratio=1e6,
                          v_weight_decay=0.0)
    texts = [r.prompt for r in world_records(embedded_world(), n=60, seed=2)]  # ~600 keys for 64 dimensions
    stats = {layer: layer_stats(m, layer, texts, n_samples=60, max_tokens=32) for layer in (0, 1)}
    with memit(m, recs, hp, stats=stats) as h:
        assert set(h.deltas) == {m.module_name(layer, "mlp_out") + ".weight" for layer in (0, 1)}
        for name, d in h.deltas.items():
            assert d.shape == before[name].shape and d.abs().sum() > 0
        assert h.evidence["residual_left_fraction_mean"] < 1.0
    assert same_weights(m, before)


@pytest.mark.parametrize("requests, hp, message", [
    ([], FAST, "non-empty"),
    ("not a list", FAST, "non-empty"),
    ([EditRecord(0, "{} speaks", "Dalo Frenwick", "French"), EditRecord(1, "{} speaks", "Dalo Frenwick", "Dutch")],
     FAST, "both"),
    ([EditRecord(0, "{} speaks", "Dalo Frenwick", "French", "French")], FAST, "true target"),
    ([EditRecord(0, "{} speaks", "Dalo Frenwick", "French")], MEMITHyperParams(layers=(1, 8)), "out of range"),
])
def test_bad_inputs_fail_clearly_with_nothing_changed(embedded, requests, hp, message):
    before = snapshot(embedded)
    with pytest.raises(InputError, match=message):
        memit(embedded, requests, hp)
    assert same_weights(embedded, before)


def test_degenerate_updates_are_refused_before_any_weight_changes(embedded, records):
    before = snapshot(embedded)
    with pytest.raises(MecheditError, match="exploding"):
        memit(embedded, records[:2], MEMITHyperParams(**{**FAST.to_dict(), "max_update_ratio": 1e-9,
                                                           "layers": (0, 1, 2)}))
    assert same_weights(embedded, before)


def test_hparams_validate_and_round_trip():
    hp = MEMITHyperParams(layers=(0, 2), context_prefixes=("a",), prefix_lengths=((3, 2),))
    assert MEMITHyperParams.from_dict(hp.to_dict()) == hp
    assert hp.with_overrides(["layers=[1, 3]"]).layers == (1, 3)
    for bad in ({"layers": (2, 1)}, {"layers": ()}, {"layers": "all"}, {"v_lr": 0}, {"mom2_update_weight": -1},
                {"kl_prompt": "no braces"}, {"batch_requests": 0}, {"v_precision": "float16"}):
        with pytest.raises(InputError):
            MEMITHyperParams(**bad)
    with pytest.raises(DataFormatError):
        MEMITHyperParams.from_dict({"layer": 3})
