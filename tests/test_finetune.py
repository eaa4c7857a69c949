"""Fine-tuning baselines (mechedit.editing.finetune): FT makes the edit on the embedded model, trains only what it
was told to, restores bit-exactly; FT-L keeps every weight within ±ε; bad hyperparameters fail before any
weight changes."""

from __future__ import annotations

import pytest
import torch

from mechedit.data import EditRecord
from mechedit.editing.finetune import FT_L_EPSILON, FTHyperParams, finetune, finetune_l
from mechedit.editing.methods import edit
from mechedit.errors import InputError
from mechedit.evaluation.counterfact import answer_nll
from mechedit.model import canonical_param_name

TINY_REQUEST = EditRecord(case_id=0, template="Yesterday I met {}", subject="Voupeis Draexmir", target_new="Paris",
                          target_true="Rome")


def hf_names(m) -> set[str]:
    """The HF class's own parameter names (the bridge adds aliases of some tensors, e.g. GPT-2's split q/k/v)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return set(AutoModelForCausalLM.from_config(m.hf_model.config).state_dict())


def snapshot(m) -> dict[str, torch.Tensor]:
    names = hf_names(m)
    if m.hf_model.config.tie_word_embeddings:
        names.discard("lm_head.weight")  # the embedding itself
    return {n: p.detach().clone() for k, p in m.hf_model.state_dict().items() if (n := canonical_param_name(k)) in names}


def same_weights(m, snap) -> bool:
    now = snapshot(m)
    return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)


def changed(m, snap) -> set[str]:
    now = snapshot(m)
    return {k for k in snap if not torch.equal(now[k], snap[k])}


def embedded_request(m) -> EditRecord:
    """One embedded-world record the unedited model answers with its true object."""
    from mechedit.toy.export import world_records
    from mechedit.toy.world import World

    return world_records(World.load(m.path / "world.json"), n=1, seed=3)[0]


@pytest.fixture(scope="module")
def world_request(embedded):
    return embedded_request(embedded)


def prefers_new(m, r: EditRecord, prompt: str | None = None) -> bool:
    nll = answer_nll(m, [(prompt or r.prompt, r.target_new), (prompt or r.prompt, r.target_true)])
    return bool(nll[0] < nll[1])


@pytest.mark.parametrize("method", ["ft", "ft-l"])
def test_edit_wins_on_the_embedded_model_and_restore_is_bit_exact(embedded, world_request, method):
    before = snapshot(embedded)
    assert not prefers_new(embedded, world_request)
    seen = []
    handle = edit(embedded, [world_request], method, {"steps": 10}, progress=lambda *a: seen.append(a))
    try:
        assert prefers_new(embedded, world_request)
        assert changed(embedded, before) == set(handle.deltas)
        for name, d in handle.deltas.items():  # deltas are the exact change
            p = dict(snapshot(embedded))[name]
            assert torch.equal(p, before[name] + d)
    finally:
        handle.restore()
    assert same_weights(embedded, before)
    assert seen[-1] == ("train", 10, 10) and len(seen) == 10


def test_ft_with_layers_changes_only_those_layers(models):
    m = models("llama")
    before = snapshot(m)
    with finetune(m, [TINY_REQUEST], FTHyperParams(layers=(1,), steps=3, lr=1e-2)) as h:
        touched = changed(m, before)
        assert touched and all(n.startswith("model.layers.1.") for n in touched)
        assert touched == set(h.deltas)
        assert any("norm" in n for n in touched)  # layers alone: every parameter of the layer, norms too
    with finetune(m, [TINY_REQUEST], FTHyperParams(layers=(0, 2), modules="mlp", steps=3, lr=1e-2)) as h:
        assert {n.rsplit(".", 2)[0] for n in changed(m, before)} == {
            f"model.layers.{i}.mlp" for i in (0, 2)}
        assert h.evidence["trained_modules"] == [m.module_name(i, k) for i in (0, 2)
                                                 for k in ("mlp_in0", "mlp_in1", "mlp_out")]
    assert same_weights(m, before)


def test_ft_on_gpt2_all_weights_trains_tied_embedding_once(models):
    m = models("gpt2")
    before = snapshot(m)
    with finetune(m, [TINY_REQUEST], FTHyperParams(steps=2, lr=1e-2)) as h:
        assert "lm_head.weight" not in h.deltas and "transformer.wte.weight" in h.deltas
        assert changed(m, before) == set(h.deltas)
    assert same_weights(m, before)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ft_l_respects_the_linf_bound(models, arch):
    m = models(arch)
    before = snapshot(m)
    with finetune_l(m, [TINY_REQUEST], FTHyperParams(steps=5, lr=1e-2)) as h:  # lr >> ε: the bound binds
        assert h.hparams["norm_constraint"] == FT_L_EPSILON
        worst = max(float(d.abs().max()) for d in h.deltas.values())
        assert worst <= FT_L_EPSILON * (1 + 1e-3)  # float rounding of (w0 + ε) - w0
        assert worst >= 0.9 * FT_L_EPSILON
    with finetune_l(m, [TINY_REQUEST], FTHyperParams(steps=5, lr=1e-2, norm_constraint=1e-5)) as h:
        assert max(float(d.abs().max()) for d in h.deltas.values()) <= 1e-5 * 1.01
    with finetune(m, [TINY_REQUEST], FTHyperParams(steps=5, lr=1e-2)) as h:  # unconstrained moves further
        assert max(float(d.abs().max()) for d in h.deltas.values()) > 10 * FT_L_EPSILON
    assert same_weights(m, before)


def test_same_seed_same_edit(models):
    m = models("llama")
    hp = FTHyperParams(modules="random", steps=2, lr=1e-2, seed=5)
    with finetune(m, [TINY_REQUEST], hp) as a:
        da = {k: v.clone() for k, v in a.deltas.items()}
    with finetune(m, [TINY_REQUEST], hp) as b:
        assert da.keys() == b.deltas.keys() and all(torch.equal(da[k], b.deltas[k]) for k in da)
    with finetune(m, [TINY_REQUEST], FTHyperParams(modules="random", steps=2, lr=1e-2, seed=6)) as c:
        assert c.deltas.keys() != da.keys()


@pytest.mark.parametrize("overrides, needle", [
    ({"steps": 0}, "steps"), ({"lr": -1e-3}, "lr"), ({"lr": 0}, "lr"), ({"modules": ()}, "empty"),
    ({"norm_constraint": 0}, "norm_constraint"), ({"layers": ()}, "layers"),
])
def test_bad_hparams_fail_clearly(overrides, needle):
    with pytest.raises(InputError, match=needle):
        FTHyperParams().with_overrides(overrides)


@pytest.mark.parametrize("hp, needle", [
    (FTHyperParams(modules=("model.layers.0.mlp.nope",)), "not a trainable module"),
    (FTHyperParams(layers=(7,)), "not in"),
    (FTHyperParams(layers=(0,), modules=("2.mlp_out",)), "empty"),
])
def test_bad_modules_fail_before_any_weight_changes(models, hp, needle):
    m = models("llama")
    before = snapshot(m)
    with pytest.raises(InputError, match=needle):
        finetune(m, [TINY_REQUEST], hp)
    assert same_weights(m, before)
