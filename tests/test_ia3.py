"""(IA)³ on chosen modules and unlearn-then-learn: the untrained adapter is the identity; only the targeted
modules change; the edit acts through the bridge (GPT-2's fused c_attn included); restore is bit-exact; the saved
peft adapter alone reproduces the edited model; bad hyperparameters fail before any weight changes; same seed,
same edit; the CLI runs it with --modules auto."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import mechedit
from mechedit.cli import app
from mechedit.data import EditRecord
from mechedit.editing.ia3 import (
    IA3HyperParams,
    UnlearnLearnHyperParams,
    feedforward_modules,
    ia3,
    ia3_unlearn_learn,
    training_prompts,
    wrap_ia3,
)
from mechedit.editing.methods import edit
from mechedit.editing.training import unbridged_copy
from mechedit.errors import InputError
from mechedit.model import canonical_param_name

SUBJECT = "Voupeis Draexmir"
REQUEST = EditRecord(0, "{} was born in the city of", SUBJECT, "Paris", "Rome",
                     paraphrases=(f"{SUBJECT} comes from the city of",))
# Modules per architecture for the targeted tests: GPT-2's fused c_attn (attention, output scaled) and an MLP input
# (feed-forward, input scaled); Llama's q_proj and down_proj likewise.
MODULES = {"gpt2": ("0.attn_qkv", "1.mlp_in0"), "llama": ("0.attn_q", "2.mlp_out")}
FAST = {"steps": 8, "lr": 0.1, "stop_loss": 0.0}


_HF_NAMES: dict[int, set[str]] = {}


def state(m) -> dict[str, torch.Tensor]:
    """The model's tensors under their HF names (the bridge's aliases, e.g. GPT-2's split q/k/v views of c_attn,
    left out: they are the same memory)."""
    if id(m) not in _HF_NAMES:
        _HF_NAMES[id(m)] = set(unbridged_copy(m).state_dict())
    names = _HF_NAMES[id(m)]
    return {n: v.detach().clone() for k, v in m.hf_model.state_dict().items()
            if (n := canonical_param_name(k)) in names}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def ids(m, text: str) -> torch.Tensor:
    return torch.tensor([m.encode(text)], device=m.device)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_untrained_adapter_is_the_identity(models, arch):
    m = models(arch)
    hf = unbridged_copy(m)
    x = ids(m, REQUEST.prompt)
    with torch.no_grad():
        want = hf(input_ids=x).logits
        every = [m.module_name(layer, k) for layer in range(m.n_layers) for k, p in m.arch.modules().items() if p]
        peft_model = wrap_ia3(m, hf, every)
        got = peft_model(input_ids=x).logits
    assert torch.equal(want, got)
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) > 0


def test_feedforward_modules_are_the_mlp_ones(models):
    m = models("gpt2")
    names = [m.module_name(0, k) for k in ("attn_qkv", "attn_out", "mlp_in0", "mlp_out")]
    assert feedforward_modules(m, names) == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_only_targeted_modules_change_and_restore_is_exact(models, arch):
    m = models(arch)
    before = state(m)
    hp = IA3HyperParams(modules=MODULES[arch], **FAST)
    handle = ia3(m, [REQUEST], hp)
    try:
        after = state(m)
        targets = set(handle.evidence["modules"])
        assert targets == {m.module_name(int(s.split(".")[0]), s.split(".")[1]) for s in MODULES[arch]}
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and {k.rpartition(".")[0] for k in changed} == targets
        assert set(handle.deltas) == changed
        for k in changed:  # the deltas are the exact change
            assert torch.equal(before[k] + handle.deltas[k], after[k])
        # the merged change acts through the bridge as in training (GPT-2's fused c_attn too)
        check = handle.evidence["bridge_check"]
        assert check["ok"] and check["max_logit_effect"] > 100 * check["max_logit_mismatch"]
    finally:
        handle.restore()
    assert_same(before, state(m))


def test_fused_qkv_alone_acts_through_the_bridge(models):
    m = models("gpt2")
    x = ids(m, REQUEST.prompt)
    with torch.no_grad():
        old = m.bridge(x).clone()
    with ia3(m, [REQUEST], IA3HyperParams(modules=("0.attn_qkv", "1.attn_qkv"), **FAST)) as h:
        assert {n.rpartition(".")[0] for n in h.deltas} == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
        with torch.no_grad():
            via_bridge, via_hf = m.bridge(x), m.hf_model(input_ids=x).logits
        assert (via_bridge - old).abs().max() > 1e-4
        torch.testing.assert_close(via_bridge, via_hf, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method, arch", [("ia3", "llama"), ("ia3", "gpt2"), ("ia3-unlearn-learn", "llama")])
def test_saved_adapter_loads_with_peft_alone(models, tiny_dir, tmp_path, method, arch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = models(arch)
    hp = {"modules": list(MODULES[arch]), **FAST}
    if method == "ia3-unlearn-learn":
        hp.update(unlearn_steps=5, unlearn_lr=0.1, unlearn_stop_loss=0.0)
    x = ids(m, REQUEST.paraphrases[0])
    with edit(m, [REQUEST], method, hp) as handle:
        with torch.no_grad():
            edited = m.hf_model(input_ids=x).logits
        handle.save(tmp_path / "edit")
    fresh = AutoModelForCausalLM.from_pretrained(tiny_dir(arch)).eval()
    with torch.no_grad():
        plain = fresh(input_ids=x).logits
        loaded = PeftModel.from_pretrained(fresh, tmp_path / "edit" / "adapter")
        got = loaded(input_ids=x).logits
    assert (edited - plain).abs().max() > 1e-4  # the edit did something ...
    torch.testing.assert_close(got, edited, atol=1e-5, rtol=1e-5)  # ... and the adapter alone reproduces it


def test_unlearn_then_learn_records_both_stages(models):
    m = models("llama")
    before = state(m)
    stages = []
    hp = UnlearnLearnHyperParams(modules=MODULES["llama"], unlearn_steps=6, unlearn_lr=0.1, unlearn_stop_loss=0.0,
                                 **FAST)
    h = ia3_unlearn_learn(m, [REQUEST], hp, progress=lambda s, d, t: stages.append((s, d, t)))
    try:
        ev = h.evidence
        assert len(ev["unlearn_losses"]) == 6 and len(ev["learn_losses"]) == 8
        assert ev["unlearn_losses"][-1] < ev["unlearn_losses"][0]  # stage 1 moved towards "I am not sure"
        assert ev["learn_losses"][-1] < ev["learn_losses"][0]
        assert stages[0] == ("unlearn", 1, 6) and stages[-1] == ("learn", 8, 8)
        assert {k.rpartition(".")[0] for k in h.deltas} <= set(ev["modules"])
    finally:
        h.restore()
    assert_same(before, state(m))


def test_same_seed_same_edit_and_random_modules_follow_the_seed(models):
    m = models("llama")
    runs = []
    for seed in (0, 0, 1):
        with ia3(m, [REQUEST], IA3HyperParams(modules="random", adapter_size=3, seed=seed, **FAST)) as h:
            runs.append((h.evidence["modules"], h.deltas))
    (mods_a, d_a), (mods_b, d_b), (mods_c, _) = runs
    assert mods_a == mods_b and len(mods_a) == 3 and mods_a != mods_c
    assert d_a.keys() == d_b.keys() and all(torch.equal(d_a[k], d_b[k]) for k in d_a)


@pytest.mark.parametrize("hp, needle", [
    ({"modules": []}, "module set is empty"),
    ({"modules": ["model.layers.9.mlp.down_proj"]}, "not a trainable module"),
    ({"modules": ["0.mlp_in7"]}, "not a trainable module"),
    ({"modules": "everything"}, "modules must be one of"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"steps": -3}, "steps must be a positive integer"),
    ({"lr": 0.0}, "lr must be a positive number"),
    ({"lr": -1e-3}, "lr must be a positive number"),
    ({"world_templates": "some"}, "world_templates"),
])
def test_bad_hyperparameters_fail_before_any_change(models, hp, needle):
    m = models("llama")
    before = state(m)
    with pytest.raises(InputError, match=needle):
        edit(m, [REQUEST], "ia3", hp)
    assert_same(before, state(m))


@pytest.mark.parametrize("hp, needle", [({"unlearn_steps": 0}, "unlearn_steps"), ({"unlearn_lr": -1}, "unlearn_lr"),
                                        ({"uncertain_answer": " "}, "uncertain_answer")])
def test_bad_unlearn_hyperparameters(hp, needle):
    with pytest.raises(InputError, match=needle):
        UnlearnLearnHyperParams().with_overrides(hp)


def test_embedded_model_located_edit(embedded):
    from mechedit.answering import answers
    from mechedit.toy.export import embedded_world, world_records

    m = embedded
    req = world_records(embedded_world(), n=1, seed=3)[0]
    prompts = training_prompts(m, req)
    # request prompt + its held-out paraphrase + the relation's training templates, nothing held out besides
    world = embedded_world()
    assert prompts[:2] == [req.prompt, req.paraphrases[0]]
    assert set(prompts[2:]) <= {t.replace("{}", req.subject) for t in world.templates(req.relation_id)}
    before = state(m)
    with edit(m, [req], "ia3", {"modules": "auto"}) as h:
        assert len(h.evidence["modules"]) == 10 and h.evidence["selection"]["modules"] == "auto"
        assert "rule" in h.evidence["selection"]["locate"]
        top = answers(m, [req.prompt])[0].top
        assert top.strip() == req.target_new
    assert_same(before, state(m))


def test_cli_edit_with_located_modules(tiny_dir, tmp_path):
    res = CliRunner().invoke(app, ["edit", "--model", str(tiny_dir("llama")), "--method", "ia3", "--modules", "auto",
                                   "--hp", "steps=3", "--prompt", REQUEST.prompt, "--subject", SUBJECT,
                                   "--target-new", "Paris", "--target-true", "Rome", "--out", str(tmp_path / "o")],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    h = mechedit.editing.EditHandle.load(tmp_path / "o" / "edit")
    assert h.method == "ia3" and h.hparams["steps"] == 3 and len(h.evidence["modules"]) == 10
    assert (tmp_path / "o" / "edit" / "adapter" / "adapter_config.json").is_file()
    assert {n.rpartition(".")[0] for n in h.deltas} <= set(h.evidence["modules"])


def test_cli_empty_module_set_is_one_line(tiny_dir):
    res = CliRunner().invoke(app, ["edit", "--model", str(tiny_dir("llama")), "--method", "ia3", "--modules", ","])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "module set is empty" in res.stderr
