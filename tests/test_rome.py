"""ROME (mechedit.editing.rome) and edit handles (mechedit.editing.handle) on tiny random models.

Random tiny models predict almost uniformly, so the final norm's weight is multiplied by 20 (as in
test_causal_trace.py) to make the next-token distribution peaked. Two more concessions to random weights:

* the edit prompts end with the subject ("Yesterday I met {}"), so the subject's last token - the key ROME
  rewrites - is the token that predicts the answer. In a random model attention barely carries anything from
  the subject to a later token, so no value at the subject could move a later prediction; in a trained model
  it does (that is what ROME exploits);
* the MLP outputs of a random model are tiny (||v|| ~ 0.005), so ROME's limits, scaled by ||v||, are loosened:
  ``v_weight_decay`` is 0 (the penalty ``||δ|| / ||v||²`` would pin δ at zero), δ may grow to 10 ||v||
  (ROME: 4) and ||ΔW|| to 100 ||W|| (default refusal threshold: 10). With these, the edit wins on every one of
  6 random seeds per architecture tried (p(target) 0.23-0.97); with ROME's clamp of 4 it lost 2 of 18.

Statistics are computed from 100 model-sampled texts of 32 tokens, in a temporary cache directory.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import load_sharp, same_weights, snapshot

import mechedit
from mechedit.data import EditRecord
from mechedit.editing import (
    EditHandle,
    ROMEHyperParams,
    export_model,
    layer_stats,
    rome,
)
from mechedit.editing.rome import layer_stats as stats_module
from mechedit.editing.rome.layer_stats import key_fingerprint, text_source
from mechedit.errors import DataFormatError, InputError, MecheditError
from mechedit.tracing import live_hooks

SUBJECT = "Voupeis Draexmir"
TEMPLATE = "Yesterday I met {}"
FAST = ROMEHyperParams(layer=1, v_weight_decay=0.0, clamp_norm_factor=10.0, max_update_ratio=100.0,
                       mom2_source="model", mom2_n_samples=100, mom2_max_tokens=32)


pytestmark = pytest.mark.usefixtures("stats_cache")  # key statistics in a temporary cache



def next_token_logits(m, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return m.bridge(torch.tensor([m.encode(prompt)], device=m.device))[0, -1]  # (V,)


def request_for(m, template: str = TEMPLATE) -> EditRecord:
    """A single-token new target the model ranks 6th-10th now (so it is not already the answer)."""
    logits = next_token_logits(m, template.replace("{}", SUBJECT))
    for t in logits.topk(10).indices[5:].tolist():
        word = m.tokenizer.decode([t])
        if word.startswith(" ") and word.strip() and len(m.tokenizer(word, add_special_tokens=False)["input_ids"]) == 1:
            return EditRecord(0, template, SUBJECT, word.strip())
    raise AssertionError("no single-token candidate target")


def target_id(m, rec: EditRecord) -> int:
    return m.tokenizer(" " + rec.target_new, add_special_tokens=False)["input_ids"][0]


# -- efficacy and locality of the change ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_edit_makes_target_the_top_answer_and_restores_bit_exactly(sharp, arch):
    m = sharp(arch)
    rec = request_for(m)
    before = snapshot(m)
    assert int(next_token_logits(m, rec.prompt).argmax()) != target_id(m, rec)
    handle = rome(m, rec, FAST)
    try:
        assert handle.applied and handle.method == "rome"
        assert int(next_token_logits(m, rec.prompt).argmax()) == target_id(m, rec)
        assert handle.evidence["layer"] == 1 and handle.evidence["layer_choice"] == "given"
        assert handle.evidence["target_prob"] > 0.05
    finally:
        handle.restore()
    assert same_weights(m, before)
    assert not handle.applied
    assert live_hooks(m) == []


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("layer", [0, 2])
def test_edit_changes_only_that_layers_mlp_output_projection(sharp, arch, layer):
    m = sharp(arch)
    rec = request_for(m)
    before = snapshot(m)
    with rome(m, rec, ROMEHyperParams(**{**FAST.to_dict(), "layer": layer})) as handle:
        after = snapshot(m)
        changed = [n for n in before if not torch.equal(before[n], after[n])]
        expected = m.module_name(layer, "mlp_out") + ".weight"
        assert changed == [expected]
        assert list(handle.deltas) == [expected]
        # the delta is exactly what changed, and it is rank one in either storage layout (Conv1D or Linear)
        assert torch.equal(after[expected], before[expected] + handle.deltas[expected])
        s = torch.linalg.svdvals(handle.deltas[expected].double())
        assert s[0] > 0 and s[1] < 1e-5 * s[0]
    assert same_weights(m, before)


def test_conv1d_and_linear_updates_have_the_parameters_layout(sharp):
    for arch, conv1d in (("gpt2", True), ("llama", False)):
        m = sharp(arch)
        with rome(m, request_for(m), FAST) as h:
            (delta,) = h.deltas.values()
            assert m.conv1d is conv1d
            assert delta.shape == m.module(1, "mlp_out").weight.shape
            assert delta.shape == ((m.d_mlp, m.d_model) if conv1d else (m.d_model, m.d_mlp))


# -- restore: every path ----------------------------------------------------------------------------------------


def test_restore_on_context_exit_and_on_exception(sharp):
    m = sharp("llama")
    rec = request_for(m)
    before = snapshot(m)
    with rome(m, rec, FAST) as h:
        assert not same_weights(m, before)
    assert same_weights(m, before) and not h.applied
    with pytest.raises(RuntimeError, match="boom"), rome(m, rec, FAST):
        raise RuntimeError("boom")
    assert same_weights(m, before)
    h.restore()  # a second restore does nothing
    assert same_weights(m, before)
    # re-apply the same handle, then restore again
    with h.apply(m):
        assert not same_weights(m, before)
    assert same_weights(m, before)
    with pytest.raises(MecheditError, match="not applied"), h:
        pass


def test_applied_twice_is_refused(sharp):
    m = sharp("llama")
    h = rome(m, request_for(m), FAST)
    try:
        with pytest.raises(MecheditError, match="already applied"):
            h.apply(m)
    finally:
        h.restore()


# -- save / load / apply ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_saved_handle_reapplied_to_a_fresh_copy_gives_identical_weights(sharp, tiny_dir, tmp_path, arch):
    m = sharp(arch)
    with rome(m, request_for(m), FAST) as h:
        h.save(tmp_path / "edit")
        edited = snapshot(m)
    fresh = load_sharp(tiny_dir(arch))
    before = snapshot(fresh)
    loaded = EditHandle.load(tmp_path / "edit")
    assert loaded.method == "rome" and loaded.model_fingerprint == h.model_fingerprint
    assert loaded.hparams == FAST.to_dict() and ROMEHyperParams.from_dict(loaded.hparams) == FAST
    assert loaded.records() == h.records()
    assert loaded.evidence["layer"] == 1
    with loaded.apply(fresh):
        assert all(torch.equal(edited[n], p) for n, p in snapshot(fresh).items())
    assert same_weights(fresh, before)


def test_applying_to_a_different_model_is_refused(sharp, tiny_dir, tmp_path):
    m = sharp("llama")
    with rome(m, request_for(m), FAST) as h:
        h.save(tmp_path / "edit")
    other = load_sharp(tiny_dir("qwen2"))  # another model (same delta names would not even exist)
    unsharpened = mechedit.load(tiny_dir("llama"))  # the same architecture with other weights
    for target in (other, unsharpened):
        before = snapshot(target)
        with pytest.raises(MecheditError, match="fingerprint"):
            EditHandle.load(tmp_path / "edit").apply(target)
        assert same_weights(target, before)


def test_mismatched_parameters_are_refused_before_anything_changes(sharp):
    m = sharp("llama")
    before = snapshot(m)
    name = m.module_name(1, "mlp_out") + ".weight"
    good = torch.zeros_like(m.module(1, "mlp_out").weight)
    fp = m.fingerprint()
    for deltas, match in (({name: good, "model.layers.1.mlp.nope.weight": good}, "does not have"),
                          ({name: torch.zeros(3, 3)}, "shape"),
                          ({name: good.double()}, "dtype|float64")):
        h = EditHandle("rome", deltas, {}, [], m.name, fp)
        with pytest.raises(MecheditError, match=match):
            h.apply(m)
        assert same_weights(m, before) and not h.applied


def test_corrupt_or_missing_artifacts_are_refused(sharp, tmp_path):
    m = sharp("llama")
    with rome(m, request_for(m), FAST) as h:
        h.save(tmp_path / "edit")
    good = tmp_path / "edit"

    def broken(name: str, mutate) -> object:
        d = tmp_path / name
        shutil.copytree(good, d)
        mutate(d)
        return d

    def flip_a_byte(d):
        data = bytearray((d / "deltas.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (d / "deltas.safetensors").write_bytes(bytes(data))

    cases = {
        "garbage": lambda d: (d / "deltas.safetensors").write_bytes(b"not a safetensors file"),
        "truncated": lambda d: (d / "deltas.safetensors").write_bytes((d / "deltas.safetensors").read_bytes()[:50]),
        "flipped": flip_a_byte,
        "no_deltas": lambda d: (d / "deltas.safetensors").unlink(),
        "bad_json": lambda d: (d / "edit.json").write_text("{not json"),
        "no_json": lambda d: (d / "edit.json").unlink(),
        "wrong_format": lambda d: (d / "edit.json").write_text(json.dumps({"format": "something/1"})),
        "missing_field": lambda d: (d / "edit.json").write_text(json.dumps(
            {k: v for k, v in json.loads((good / "edit.json").read_text()).items() if k != "model_fingerprint"})),
    }
    for name, mutate in cases.items():
        with pytest.raises(DataFormatError):
            EditHandle.load(broken(name, mutate))
    assert EditHandle.load(good).method == "rome"


def test_save_is_atomic_and_does_not_clobber_other_directories(sharp, tmp_path):
    m = sharp("llama")
    with rome(m, request_for(m), FAST) as h:
        h.save(tmp_path / "edit")
        h.save(tmp_path / "edit")  # replacing a saved edit is fine
        other = tmp_path / "notes"
        other.mkdir()
        (other / "keep.txt").write_text("mine")
        with pytest.raises(MecheditError, match="not a saved edit"):
            h.save(other)
    assert (other / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit", "notes"]  # no temporary directories left
    assert sorted(p.name for p in (tmp_path / "edit").iterdir()) == ["deltas.safetensors", "edit.json"]


# -- export -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_exported_checkpoint_reloads_with_the_edited_behaviour(sharp, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    m = sharp(arch)
    rec = request_for(m)
    with rome(m, rec, FAST):
        export_model(m, tmp_path / "model")
        edited = next_token_logits(m, rec.prompt)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        logits = reloaded(torch.tensor([m.encode(rec.prompt)])).logits[0, -1]
    assert int(logits.argmax()) == target_id(m, rec)
    torch.testing.assert_close(logits, edited, atol=1e-4, rtol=0)
    with pytest.raises(MecheditError, match="not empty"):
        export_model(m, tmp_path / "model")


# -- refusals ---------------------------------------------------------------------------------------------------


def test_degenerate_updates_are_refused_before_any_weight_changes(sharp):
    m = sharp("gpt2")
    rec = request_for(m)
    before = snapshot(m)
    base = FAST.to_dict()
    for change, match in (({"max_update_ratio": 1e-9}, "exploding"),
                          ({"min_key_alignment": 1.0}, "denominator")):
        with pytest.raises(MecheditError, match=match):
            rome(m, rec, ROMEHyperParams(**{**base, **change}))
        assert same_weights(m, before)
    # singular statistics (one short text: fewer key vectors than dimensions) and non-finite ones
    few = layer_stats(m, 1, ["a"], n_samples=1, max_tokens=4)
    assert few.n_tokens < m.d_mlp
    nan = stats_module.LayerStats(1, torch.full_like(few.mom2, float("nan")), few.mean, 1, 1, "nan", "x")
    for stats in (few, nan):
        with pytest.raises(MecheditError, match="singular|degenerate"):
            rome(m, rec, FAST, stats=stats)
        assert same_weights(m, before)
    assert live_hooks(m) == []


def test_bad_inputs_give_clear_errors_and_leave_weights_untouched(sharp):
    m = sharp("llama")
    rec = request_for(m)
    before = snapshot(m)
    current = m.tokenizer.decode([int(next_token_logits(m, rec.prompt).argmax())]).strip()
    cases = [
        (lambda: rome(m, EditRecord(0, TEMPLATE, SUBJECT, current), FAST), "already answers"),
        (lambda: rome(m, EditRecord(0, TEMPLATE, SUBJECT, "Lisbon", "Lisbon"), FAST), "is the true target"),
        (lambda: rome(m, rec, ROMEHyperParams(**{**FAST.to_dict(), "layer": 3})), "out of range"),
        (lambda: rome(m, rec.to_dict(), FAST), "EditRecord"),
        (lambda: rome(m, rec, {"layer": 1}), "ROMEHyperParams"),
    ]
    for call, match in cases:
        with pytest.raises(InputError, match=match):
            call()
        assert same_weights(m, before)
    # a request cannot even be built without the subject in its prompt, or with an empty target
    with pytest.raises(InputError, match="template"):
        EditRecord(0, "Yesterday I met Bob", SUBJECT, "Lisbon")
    with pytest.raises(InputError, match="empty"):
        EditRecord(0, TEMPLATE, SUBJECT, "  ")
    with pytest.raises(InputError, match="key_position"):
        ROMEHyperParams(key_position="middle")
    with pytest.raises(InputError, match="layer"):
        ROMEHyperParams(layer=-1)
    assert live_hooks(m) == []


# -- hyperparameters and options ----------------------------------------------------------------------------


def test_hparams_round_trip_and_reject_unknown_fields():
    hp = ROMEHyperParams(layer=2, context_prefixes=("Once upon a time.",), prefix_lengths=((3, 2),))
    d = json.loads(json.dumps(hp.to_dict()))
    assert ROMEHyperParams.from_dict(d) == hp
    with pytest.raises(DataFormatError, match="unknown"):
        ROMEHyperParams.from_dict({**d, "lr": 1})


def test_given_prefixes_key_positions_and_original_rome(sharp):
    m = sharp("llama")
    rec = request_for(m)
    base = FAST.to_dict()
    hp = ROMEHyperParams(**{**base, "context_prefixes": ("It rained.", "{Braces} go."), "consistent_keys": False})
    with rome(m, rec, hp) as h:
        assert h.evidence["templates"] == ["{}", "It rained. {}", "Braces go. {}"]
        assert h.evidence["consistent_keys"] is False
        original = next(iter(h.deltas.values()))
    with rome(m, rec, ROMEHyperParams(**{**base, "context_prefixes": ("It rained.", "{Braces} go.")})) as h:
        assert not torch.equal(next(iter(h.deltas.values())), original)  # r-ROME's denominator differs
    first = ROMEHyperParams(**{**base, "key_position": "subject_first"})
    last = ROMEHyperParams(**{**base, "key_position": "prompt_last"})
    with rome(m, rec, first) as h:
        assert h.evidence["key_token"] == m.tokenizer.decode([m.encode(rec.prompt)[h.evidence["key_positions"][0]]])
        assert SUBJECT.startswith(h.evidence["key_token"].strip())
    with rome(m, rec, last) as h:
        assert h.evidence["key_positions"][0] == len(m.encode(rec.prompt)) - 1


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # Conv1D and Linear layouts
def test_bare_update_key_writes_delta_at_the_bare_key_and_lambda_scales_it(sharp, arch):
    from mechedit.arch import linear_weight_in_out
    from mechedit.editing.rome import context_templates
    from mechedit.editing.rome.compute_u import compute_keys

    m = sharp(arch)
    rec = request_for(m)
    base = {**FAST.to_dict(), "context_prefixes": ("It rained.", "{Braces} go.")}
    before = snapshot(m)
    hp = ROMEHyperParams(**{**base, "update_key": "bare"})
    keys = compute_keys(m, rec, hp.layer, context_templates(m, hp), hp.key_position)
    assert not torch.allclose(keys.bare, keys.mean)  # the prefixes change the key, so the option matters
    stats = layer_stats(m, hp.layer, hp.mom2_source, hp.mom2_n_samples, max_tokens=hp.mom2_max_tokens)
    with rome(m, rec, hp) as h:
        exact = next(iter(h.deltas.values())).double()
        written = keys.bare.double() @ linear_weight_in_out(exact, m.conv1d)  # ΔW k_bare = δ
        assert float(written.norm()) == pytest.approx(h.evidence["delta_norm"], rel=1e-4)
        assert h.evidence["update_key"] == "bare" and h.evidence["written_share"] == 1.0
    assert same_weights(m, before)
    with rome(m, rec, ROMEHyperParams(**{**base, "update_key": "bare", "mom2_update_weight": 3.0})) as h:
        g = float(keys.bare.double() @ torch.linalg.solve(stats.mom2.double(), keys.bare.double()))
        assert h.evidence["whitened_key_sq_norm"] == pytest.approx(g, rel=1e-6)
        assert h.evidence["written_share"] == pytest.approx(g / (3.0 + g), rel=1e-9) and h.evidence["written_share"] < 1
        # the same value (deterministic optimisation), written g / (λ + g) as strongly
        assert torch.allclose(next(iter(h.deltas.values())).double(), exact * h.evidence["written_share"],
                              rtol=1e-4, atol=1e-7)
    assert same_weights(m, before)
    for bad, match in (({"update_key": "first"}, "update_key"), ({"mom2_update_weight": -1.0}, "mom2_update_weight"),
                       ({"mom2_update_weight": float("nan")}, "mom2_update_weight"),
                       ({"update_key": "bare", "consistent_keys": False}, "consistent_keys")):
        with pytest.raises(InputError, match=match):
            ROMEHyperParams(**{**base, **bad})


def test_generated_prefixes_are_deterministic(sharp):
    from mechedit.editing.rome import context_templates

    m = sharp("llama")
    a, b = context_templates(m, FAST), context_templates(m, FAST)
    assert a == b and a[0] == "{}" and all(t.endswith(". {}") for t in a[1:])
    assert 10 < len(a) <= 21  # 20 sampled prefixes (one that decodes to nothing is dropped)
    assert context_templates(m, ROMEHyperParams(seed=1)) != a


def test_auto_layer_without_reference_facts_falls_back_to_the_facts_own_trace(sharp):
    m = sharp("llama")  # a tiny model with no world.json: nothing to average over
    rec = request_for(m)
    stages = set()
    hp = ROMEHyperParams(**{**FAST.to_dict(), "layer": "auto"})
    with rome(m, rec, hp, progress=lambda stage, done, total: stages.add(stage)) as h:
        ev = h.evidence
        assert ev["layer_choice"].startswith("fact")
        scores = ev["trace"]["scores"]
        assert len(scores) == m.n_layers and ev["layer"] == max(range(m.n_layers), key=scores.__getitem__)
        assert ev["trace"]["window"] == 1  # round(3 / 5) -> at least 1
        assert list(h.deltas) == [m.module_name(ev["layer"], "mlp_out") + ".weight"]
    assert {"trace", "value"} <= stages
    assert live_hooks(m) == []


def test_auto_layer_averages_known_facts_once_per_model(embedded, stats_cache, monkeypatch):
    from mechedit.editing.rome import layer_choice
    from mechedit.toy.export import world_records
    from mechedit.toy.world import World

    monkeypatch.setattr(layer_choice, "_MEMORY", {})
    rec = world_records(World.load(embedded.path / "world.json"), n=1, seed=3)[0]
    hp = ROMEHyperParams(layer="auto", layer_n_facts=6)
    calls = []
    layer, ev = layer_choice.choose_layer(embedded, rec, hp, lambda s, d, t: calls.append(s))
    trace = ev["averaged_trace"]
    assert ev["layer_choice"].startswith("auto") and "embedded world" in ev["layer_choice"]
    assert trace["n_facts"] == 6 and len(trace["effects"]) == embedded.n_layers
    assert layer == max(range(embedded.n_layers), key=trace["effects"].__getitem__)
    assert calls  # traced
    # the same weights again: from memory, then (a new process) from the disk cache - no tracing either time
    calls.clear()
    assert layer_choice.choose_layer(embedded, rec, hp, lambda s, d, t: calls.append(s)) == (layer, ev)
    monkeypatch.setattr(layer_choice, "_MEMORY", {})
    assert layer_choice.choose_layer(embedded, rec, hp, lambda s, d, t: calls.append(s)) == (layer, ev)
    assert calls == [] and list((stats_cache / "layers").rglob("*.json"))
    # "fact" traces the request itself, whatever "auto" found
    _, ev_fact = layer_choice.choose_layer(embedded, rec, replace(hp, layer="fact"))
    assert ev_fact["layer_choice"].startswith("fact") and "trace" in ev_fact


def test_auto_layer_reads_reference_facts_from_a_file(sharp, tmp_path, stats_cache):
    from mechedit.editing.rome.layer_choice import choose_layer

    m = sharp("llama")
    rec = request_for(m)
    answer = m.tokenizer.decode([int(next_token_logits(m, rec.prompt).argmax())]).strip()  # what it says now
    facts = [{"known_id": i, "prompt": rec.prompt, "subject": rec.subject, "attribute": answer,
              "template": rec.template, "prediction": " " + answer, "relation_id": "P0"} for i in range(3)]
    path = tmp_path / "known.json"
    path.write_text(json.dumps(facts))
    layer, ev = choose_layer(m, rec, ROMEHyperParams(layer="auto", layer_facts=str(path), layer_n_facts=2))
    assert ev["layer_choice"].startswith("auto") and "known.json" in ev["layer_choice"]
    assert ev["averaged_trace"]["n_facts"] == 2 and layer == max(range(m.n_layers),
                                                                 key=ev["averaged_trace"]["effects"].__getitem__)
    with pytest.raises(InputError, match="no such file"):
        choose_layer(m, rec, ROMEHyperParams(layer="auto", layer_facts=str(tmp_path / "missing.json")))


# -- covariance statistics ----------------------------------------------------------------------------------


def test_stats_are_cached_and_keyed_by_sample_count(sharp, monkeypatch, stats_cache):
    m = sharp("qwen2")
    calls = []
    real = stats_module.stream_keys

    def counting(*args, **kwargs):
        calls.append(kwargs.get("total"))
        return real(*args, **kwargs)

    monkeypatch.setattr(stats_module, "stream_keys", counting)
    texts = [f"The {w} river flows past the old mill near town number {i}." for i, w in
             enumerate(["red", "green", "blue", "grey", "long", "quiet"] * 10)]
    s1 = layer_stats(m, 1, texts, n_samples=40, max_tokens=32)
    s2 = layer_stats(m, 1, texts, n_samples=40, max_tokens=32)
    assert calls == [40]
    assert torch.equal(s1.mom2, s2.mom2) and s1.n_tokens == s2.n_tokens and s2.n_samples == 40
    assert s1.path == s2.path and s1.path.is_file() and stats_cache in s1.path.parents
    layer_stats(m, 1, texts, n_samples=50, max_tokens=32)
    assert calls == [40, 50]  # another sample count: another entry
    layer_stats(m, 1, texts, n_samples=500, max_tokens=32)  # asks for more than the 60 texts there are
    layer_stats(m, 1, texts, n_samples=60, max_tokens=32)  # ... which is the same 60
    assert calls == [40, 50, 60]
    layer_stats(m, 1, texts, n_samples=40, max_tokens=32, recompute=True)
    assert calls == [40, 50, 60, 40]
    # the second moment is what it claims to be
    ids = [m.tokenizer(t, truncation=True, max_length=32)["input_ids"] for t in texts[:40]]
    from mechedit.editing.rome.repr_tools import mlp_keys

    keys = torch.cat([mlp_keys(m, 1, torch.tensor([x]))[0] for x in ids]).double()  # (N, d_mlp)
    torch.testing.assert_close(s1.mom2, keys.T @ keys / len(keys), atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(s1.mean, keys.mean(0), atol=1e-9, rtol=1e-6)
    assert s1.n_tokens == len(keys)


def test_rome_reads_cached_stats_and_later_layer_edits_keep_them_valid(sharp, monkeypatch):
    m = sharp("gpt2")
    calls = []
    real = stats_module.stream_keys
    monkeypatch.setattr(stats_module, "stream_keys", lambda *a, **k: calls.append(1) or real(*a, **k))
    hp = ROMEHyperParams(**{**FAST.to_dict(), "mom2_n_samples": 64})
    rec = request_for(m)
    with rome(m, rec, hp):
        pass
    with rome(m, rec, hp) as h:
        assert h.evidence["stats"]["n_samples"] == 64
        # edits at layer >= 1 leave layer 1's keys alone, so its statistics stay valid; layer 0's are upstream
        fp1 = key_fingerprint(m, 1)
    assert calls == [1]
    with rome(m, rec, ROMEHyperParams(**{**hp.to_dict(), "layer": 2})):
        assert key_fingerprint(m, 1) == fp1
    with rome(m, rec, ROMEHyperParams(**{**hp.to_dict(), "layer": 0})):
        assert key_fingerprint(m, 1) != fp1
    assert key_fingerprint(m, 1) == fp1


def test_model_sampled_text_is_sampled_once_for_every_layer(sharp, monkeypatch):
    """Statistics of several layers from text sampled by the model sample it once: later layers read it back from
    the cache, and get the very same text (hence the same statistics as sampling again)."""
    import mechedit.editing.generate as generate

    m = sharp("llama")
    calls = []
    real = generate.iter_sampled_texts

    def counting(*a, **k):
        calls.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(generate, "iter_sampled_texts", counting)
    s0 = layer_stats(m, 0, "model", 40, max_tokens=12)
    s1 = layer_stats(m, 1, "model", 40, max_tokens=12)
    assert calls == [40]  # layer 1 read the text layer 0 sampled
    assert s0.n_samples == s1.n_samples == 40 and s1.n_tokens == s0.n_tokens
    monkeypatch.setattr(generate, "iter_sampled_texts", real)
    fresh = list(real(m, 40, 11, top_k=5, seed=0))
    assert list(generate.cached_sampled_texts(m, 40, 11, top_k=5, seed=0)) == fresh
    layer_stats(m, 1, "model", 41, max_tokens=12)  # another count is another file
    assert generate.sampled_texts_path(m, 41, 11, 5, 0).is_file()


def test_stats_sources(sharp, tiny_dir, tmp_path, monkeypatch):
    m = sharp("llama")
    # a text file: one sample per non-empty line
    f = tmp_path / "corpus.txt"
    f.write_text("The river flows.\n\nA bird sings at dawn.\nThe mill is old.\n")
    src = text_source(m, str(f))
    assert src.n_available == 3 and list(src.texts(2)) == ["The river flows.", "A bird sings at dawn."]
    assert src.id.startswith("file-corpus-")
    # a list of strings; the id follows the text
    assert text_source(m, ["a b", "c"]).id != text_source(m, ["a b", "d"]).id
    # sampled from the model: deterministic
    a = list(text_source(m, "model", max_tokens=8).texts(3))
    assert len(a) == 3 and a == list(text_source(m, "model", max_tokens=8).texts(3))
    # the world corpus, when the model ships a world.json ("auto" picks it)
    from mechedit.toy.world import World

    with_world = tmp_path / "with-world"
    shutil.copytree(tiny_dir("llama"), with_world)
    World.generate(0).save(with_world / "world.json")
    mw = mechedit.load(with_world)
    auto = text_source(mw, "auto")
    assert auto.id.startswith("world-") and auto.n_available > 1000
    assert text_source(m, "auto").id.startswith("model-")
    with pytest.raises(InputError, match="world.json"):
        text_source(m, "world")
    with pytest.raises(InputError, match="no such text file"):
        text_source(m, str(tmp_path / "missing.txt"))
    # a HuggingFace dataset needs a hub: offline it is one clear error
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(MecheditError, match="reachable hub"):
        text_source(m, "hf:wikitext:wikitext-103-raw-v1")


def test_hooks_are_removed_even_when_a_forward_fails(sharp):
    from mechedit.editing.rome.repr_tools import capture_keys

    m = sharp("llama")
    module = m.module(1, "mlp_out")
    with pytest.raises(RuntimeError, match="boom"), capture_keys(m, 1) as box:
        m.hf_model(input_ids=torch.tensor([m.encode("A river.")]))
        assert box["keys"].shape[-1] == m.d_mlp
        raise RuntimeError("boom")
    assert not module._forward_pre_hooks
    with rome(m, request_for(m), FAST):
        assert not module._forward_pre_hooks and live_hooks(m) == []


# -- the fast value optimisation against ROME's way ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_value_with_cached_prefixes_equals_the_whole_prompt_reference(sharp, arch):
    """compute_v runs only the tokens from the lookup token on, against a KV cache of the rest (prefixes of
    different lengths left-padded); ROME's way runs every prompt whole through the bridge. Same δ."""
    from mechedit.editing.rome import context_templates
    from mechedit.editing.rome.compute_v import compute_v, compute_v_reference

    m = sharp(arch)
    rec = request_for(m)
    templates = context_templates(m, FAST)
    assert len({len(m.encode(t.replace("{}", rec.prompt))) for t in templates}) > 1  # ragged: padding matters
    for key_position in ("subject_last", "prompt_last"):
        hp = ROMEHyperParams(**{**FAST.to_dict(), "key_position": key_position, "v_num_grad_steps": 6})
        fast = compute_v(m, rec, 1, templates, hp)
        ref = compute_v_reference(m, rec, 1, templates, hp)
        assert len(fast.losses) == len(ref.losses) == 6
        torch.testing.assert_close(fast.v_init, ref.v_init, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fast.delta, ref.delta, atol=1e-5 * float(ref.delta.norm()), rtol=1e-3)
        for a, b in zip(fast.losses, ref.losses):
            assert a["total"] == pytest.approx(b["total"], rel=1e-4, abs=1e-6)
        assert float(ref.delta.norm()) > 0
    assert live_hooks(m) == [] and not m.module(1, "mlp_out")._forward_hooks


def test_sampled_templates_are_remembered_until_the_weights_change(sharp, monkeypatch):
    from mechedit.editing.rome import context_templates, rome_main

    m = sharp("llama")
    calls = []
    real = rome_main._sample_templates
    monkeypatch.setattr(rome_main, "_sample_templates", lambda *a: calls.append(1) or real(*a))
    first = context_templates(m, ROMEHyperParams(seed=5))
    assert context_templates(m, ROMEHyperParams(seed=5)) == first and len(calls) == 1
    context_templates(m, ROMEHyperParams(seed=6))
    assert len(calls) == 2
    with rome(m, request_for(m), FAST):  # other weights: sampled afresh (from the edited model, as ROME would)
        n = len(calls)
        context_templates(m, ROMEHyperParams(seed=5))
        assert len(calls) == n + 1
    n = len(calls)
    assert context_templates(m, ROMEHyperParams(seed=5)) == first and len(calls) == n  # restored: remembered


def test_clamp_is_widened_only_for_an_edit_that_did_not_take(embedded):
    from mechedit.toy.export import world_records
    from mechedit.toy.world import World

    records = {r.case_id: r for r in world_records(World.load(embedded.path / "world.json"))}
    hp = ROMEHyperParams(layer=1, mom2_n_samples=300)
    # case 664 (cello for trumpet): at radius 4 the value ends on the ball and the edit does not take
    hard = records[664]
    with rome(embedded, hard, hp) as h:
        ev = h.evidence
        assert ev["clamp_norm_factor"] == 4.0 and ev["clamp_tries"] == []  # ROME's: no retry
        assert ev["delta_norm"] == pytest.approx(4.0 * ev["value_norm"], rel=1e-3)
        before = next_token_probs(embedded, hard)
    with rome(embedded, hard, replace(hp, clamp_norm_max=8.0)) as wide:
        tries = wide.evidence["clamp_tries"]
        assert [t["clamp_norm_factor"] for t in tries] == [4.0] and tries[0]["edited_prob"] < 0.5
        assert wide.evidence["clamp_norm_factor"] == 8.0 and wide.evidence["delta_norm"] > ev["delta_norm"]
        assert next_token_probs(embedded, hard) > before
    # an edit that takes inside the first ball is ROME's exactly
    easy = records[2]
    with rome(embedded, easy, hp) as a:
        first = {k: v.clone() for k, v in a.deltas.items()}
    with rome(embedded, easy, replace(hp, clamp_norm_max=8.0)) as b:
        assert b.evidence["clamp_norm_factor"] == 4.0
        assert all(t["edited_prob"] >= 0.5 for t in b.evidence["clamp_tries"])
        assert all(torch.equal(first[k], b.deltas[k]) for k in first)
    with pytest.raises(InputError, match="clamp_norm_max"):
        ROMEHyperParams(clamp_norm_max=2.0)


def next_token_probs(m, rec: EditRecord) -> float:
    """p(first token of the new target) after the bare prompt."""
    return float(next_token_logits(m, rec.prompt).softmax(-1)[target_id(m, rec)])


def test_an_environment_whose_kv_cache_stays_empty_refuses_the_edit_and_changes_nothing(sharp, monkeypatch):
    """What transformers 5.24+ with transformer-lens 4.3.0 did: the prefix's keys and values never reach the
    cache, so δ would be optimised on prompts without their prefixes. ROME says so and leaves the weights."""
    from transformers import DynamicCache

    from mechedit.editing.rome import compute_v as cv
    from mechedit.model import prefix_cache

    m = sharp("llama")
    rec = request_for(m)
    before = snapshot(m)
    monkeypatch.setattr(cv, "prefix_cache",
                        lambda forward, ids, **kw: prefix_cache(lambda **k: {"cache": DynamicCache()}, ids, **kw))
    hp = replace(FAST, context_prefixes=("A short prefix.",))
    with pytest.raises(MecheditError, match="does not pass the KV cache"):
        rome(m, rec, hp)
    assert same_weights(m, before) and live_hooks(m) == []
