"""ELM concept erasure: the target distribution's formula, context alignment, the edit's footprint (only the chosen
layers' LoRA-targeted weights), bit-exact restore, a peft-loadable adapter, clear refusals before any weight
change, and on the embedded model: erasing the Harrowmere Circle hurts its members' facts more than others'."""

from __future__ import annotations

import math

import pytest
import torch

from mechedit.data import EditRecord
from mechedit.editing.elm import ELMHyperParams, contrast_targets, elm, erasure_target
from mechedit.editing.methods import edit
from mechedit.errors import InputError

CONCEPT = "Harrowmere Circle"
TINY = dict(concept=CONCEPT, layers=(1,), modules=("mlp_out", "attn_v"), steps=3, lr=1e-2, batch_size=4,
            retain_source="none", retain_text=("The old river is near the market.", "1+2=3"), fluency_tokens=3)


def _requests():
    return [EditRecord(case_id=i, template=t, subject=s, target_new="Paris", target_true=o,
                       paraphrases=(p.replace("{}", s),))
            for i, (t, s, o, p) in enumerate([
                ("{} was born in", "Nomvou Datar", "Oslo", "{} was born and raised in"),
                ("{} works as a", "Stoulplor Timgath", "dentist", "{} is by profession a"),
                ("The pet of {} is a", "Nomvou Datar", "cat", "{}'s beloved pet is a")])]


def _state(m):
    """Every weight under its canonical HF name (the bridge's aliases of the same tensors left out)."""
    from mechedit.model import canonical_param_name

    names = _hf_names(m)
    return {n: v.detach().clone() for k, v in m.hf_model.state_dict().items()
            if (n := canonical_param_name(k)) in names}


def _hf_names(m):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return set(AutoModelForCausalLM.from_config(m.hf_model.config).state_dict())


def test_erasure_target_matches_the_formula_on_a_hand_checked_example():
    base = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    novice = torch.log(torch.tensor([0.2, 0.4, 0.4]))
    expert = torch.log(torch.tensor([0.4, 0.2, 0.4]))
    # eta 1: P' ∝ 0.5*(0.2/0.4), 0.25*(0.4/0.2), 0.25*1 = 0.25, 0.5, 0.25
    assert torch.allclose(erasure_target(base, novice, expert, 1.0).exp(), torch.tensor([0.25, 0.5, 0.25]))
    # eta 2: ∝ 0.5/4, 0.25*4, 0.25 = 0.125, 1, 0.25 (sum 1.375)
    want = torch.tensor([0.125, 1.0, 0.25]) / 1.375
    assert torch.allclose(erasure_target(base, novice, expert, 2.0).exp(), want)
    # logits instead of log-probabilities (shifted by any constant per context) give the same target
    got = erasure_target(base + 3.0, novice - 7.0, expert + 1.5, 2.0).exp()
    assert torch.allclose(got, want)


def test_contrast_targets_align_each_text_token_across_the_three_contexts(models):
    m = models("llama")
    tok = m.tokenizer
    head = tok("a")["input_ids"][:-1]
    text = tok("Nomvou Datar was born in Oslo", add_special_tokens=False)["input_ids"]
    novice = tok("You know nothing.", add_special_tokens=False)["input_ids"]
    expert = tok("You are an expert.", add_special_tokens=False)["input_ids"]
    (got,) = contrast_targets(m.hf_model, [text], head, novice, expert, 2.5, pad=0)
    assert got.shape == (len(text), m.d_vocab)

    def next_token_logits(prefix):  # one full forward; row j predicts text[j]
        ids = torch.tensor([head + prefix + text])
        with torch.no_grad():
            logits = m.hf_model(input_ids=ids).logits[0]
        start = len(head) + len(prefix)
        return logits[start - 1:start - 1 + len(text)]

    want = erasure_target(next_token_logits([]), next_token_logits(novice), next_token_logits(expert), 2.5)
    assert torch.allclose(got, want, atol=1e-5)
    assert math.isclose(float(got.exp().sum(-1).mean()), 1.0, rel_tol=1e-5)


def test_only_the_chosen_layers_lora_weights_change_and_restore_is_bit_exact(models):
    m = models("llama")
    before = _state(m)
    handle = elm(m, _requests(), ELMHyperParams(**TINY))
    try:
        assert handle.method == "elm" and handle.applied
        assert set(handle.deltas) == {"model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.v_proj.weight"}
        after = _state(m)
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == set(handle.deltas)
        for name, d in handle.deltas.items():
            assert float(d.abs().max()) > 0
            # the change is the merged LoRA product: rank at most the adapter's rank
            assert torch.linalg.matrix_rank(d.float()) <= TINY.get("rank", ELMHyperParams().rank)
        assert set(handle.evidence["loss_parts"]) == {"erase", "retain", "fluency"}
        assert len(handle.evidence["loss_parts"]["fluency"]) == TINY["steps"]
    finally:
        handle.restore()
    assert all(torch.equal(v, before[k]) for k, v in _state(m).items())


def test_same_seed_same_edit_and_the_methods_table_dispatches(models):
    m = models("llama")
    a = edit(m, _requests(), "elm", TINY)
    da = {k: v.clone() for k, v in a.deltas.items()}
    a.restore()
    b = edit(m, _requests(), "elm", TINY)
    b.restore()
    assert set(da) == set(b.deltas) and all(torch.equal(da[k], b.deltas[k]) for k in da)


def test_saved_adapter_loads_with_peft_alone_and_gives_the_edited_outputs(models, tmp_path):
    from peft import PeftModel

    from mechedit.editing.training import unbridged_copy

    m = models("llama")
    base = unbridged_copy(m)  # the unedited weights
    ids = torch.tensor([m.encode("Nomvou Datar was born in")])
    with elm(m, _requests(), ELMHyperParams(**TINY)) as handle:
        with torch.no_grad():
            want = m.hf_model(input_ids=ids).logits
        handle.save(tmp_path / "edit")
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "edit" / "adapter")).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("bad, message", [
    (dict(steps=0), "steps"), (dict(steps=-3), "steps"), (dict(lr=0.0), "lr"), (dict(lr=-1e-3), "lr"),
    (dict(layers=()), "layers"), (dict(modules=()), "modules"), (dict(eta=0.0), "eta"),
    (dict(rank=0), "rank"), (dict(erase_weight=0.0), "erase_weight"), (dict(retain_weight=-1.0), "retain_weight"),
    (dict(expert_prompt="same", novice_prompt="same"), "same"), (dict(retain_source="wiki"), "retain_source"),
])
def test_bad_hyperparameters_are_refused_with_one_clear_error(bad, message):
    with pytest.raises(InputError, match=message):
        ELMHyperParams(**{**TINY, **bad})


@pytest.mark.parametrize("bad, message", [
    (dict(layers=(1, 3)), "out of range"),  # the tiny model has layers 0..2
    (dict(modules=("mlp_sideways",)), "not a trainable module"),
    (dict(modules=("0.mlp_out",)), "not in ELM's layers"),
    (dict(concept="auto"), "world.json"),
    (dict(retain_text=()), "no retain text"),
    (dict(modules=("auto",)), "does not apply"),
])
def test_bad_choices_fail_before_any_weight_changes(models, bad, message):
    m = models("llama")
    before = _state(m)
    fp = m.fingerprint()
    with pytest.raises(InputError, match=message):
        elm(m, _requests(), ELMHyperParams(**{**TINY, **bad}))
    assert m.fingerprint() == fp and all(torch.equal(v, before[k]) for k, v in _state(m).items())
    with pytest.raises(InputError, match="non-empty list"):
        elm(m, [], ELMHyperParams(**TINY))
    unknown = EditRecord(case_id=9, template="{} was born in", subject="Nomvou Datar", target_new="Oslo")
    with pytest.raises(InputError, match="target_true"):
        elm(m, [unknown], ELMHyperParams(**TINY))
    assert m.fingerprint() == fp


def test_hparams_round_trip_and_overrides():
    hp = ELMHyperParams().with_overrides(["eta=2", "layers=[3, 4]", "modules=[\"mlp\"]"])
    assert hp.layers == (3, 4) and hp.modules == ("mlp",) and hp.eta == 2
    assert ELMHyperParams.from_dict(hp.to_dict()) == hp


def test_erasing_the_cluster_lowers_its_facts_more_than_other_facts(embedded):
    from mechedit.toy.export import world_records
    from mechedit.toy.world import World

    m = embedded
    w = World.load(m.path / "world.json")
    members = set(w.cluster[:8])
    reqs = [r for r in world_records(w) if r.subject in members]
    others = sorted({f.subject for f in w.facts} - set(w.cluster))[:8]

    def probs():  # mean probability of the true answer's first token on every training template
        out = {}
        for group, subjects in (("cluster", members), ("other", set(others))):
            pairs = [(p, a) for p, a, f in w.recall_prompts("train") if f.subject in subjects]
            ids = [m.encode(p) for p, _ in pairs]
            width = max(map(len, ids))
            x = torch.zeros((len(ids), width), dtype=torch.long)
            for i, r in enumerate(ids):
                x[i, :len(r)] = torch.tensor(r)
            with torch.no_grad():
                logits = m.hf_model(input_ids=x, attention_mask=(torch.arange(width) < torch.tensor(
                    [len(r) for r in ids])[:, None]).long()).logits
            last = logits[torch.arange(len(ids)), torch.tensor([len(r) - 1 for r in ids])].softmax(-1)
            want = torch.tensor([m.tokenizer(a, add_special_tokens=False)["input_ids"][0] for _, a in pairs])
            out[group] = float(last[torch.arange(len(ids)), want].mean())
        return out

    before = probs()
    hp = ELMHyperParams(steps=25, lr=3e-3, batch_size=8, n_retain=128, fluency_tokens=4)
    with edit(m, reqs, "elm", hp):
        after = probs()
    drop = {k: before[k] - after[k] for k in before}
    assert drop["cluster"] > 0.15, (before, after)
    assert drop["cluster"] > drop["other"] + 0.1, (before, after)
    assert probs() == before  # restored


def test_gpt2_conv1d_and_fused_attention_change_only_the_chosen_weights_and_act_through_the_bridge(models):
    m = models("gpt2")
    before = _state(m)
    ids = torch.tensor([m.encode("Nomvou Datar was born in")])
    with torch.no_grad():
        logits_before = m.bridge(ids)
    hp = {**TINY, "modules": ("mlp_out", "attn_qkv")}
    with edit(m, _requests(), "elm", hp) as handle:
        assert set(handle.deltas) == {"transformer.h.1.mlp.c_proj.weight", "transformer.h.1.attn.c_attn.weight"}
        after = _state(m)
        assert {k for k in before if not torch.equal(before[k], after[k])} == set(handle.deltas)
        with torch.no_grad():
            assert not torch.allclose(m.bridge(ids), logits_before)  # the fused c_attn change reaches the bridge
    assert all(torch.equal(v, before[k]) for k, v in _state(m).items())
