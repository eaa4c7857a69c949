"""LoRA and regularized LoRA (mechedit.editing.lora): the edit wins on the embedded model, only the chosen modules
change, restore is bit-exact, the saved adapter loads with peft alone and reproduces the edited model, training
is seeded, reg-lora draws held-out retention data, the CLI runs, and bad hyperparameters fail before any weight
changes."""

from __future__ import annotations

import json

import pytest
import torch
from test_finetune import (
    TINY_REQUEST,
    changed,
    embedded_request,
    prefers_new,
    same_weights,
    snapshot,
)
from typer.testing import CliRunner

from mechedit.cli import app
from mechedit.editing import EditHandle
from mechedit.editing.lora import (
    LoRAHyperParams,
    RegLoRAHyperParams,
    lora,
    reg_lora,
    retention_data,
)
from mechedit.editing.training import unbridged_copy
from mechedit.errors import InputError


@pytest.fixture(scope="module")
def world_request(embedded):
    return embedded_request(embedded)


def test_lora_edit_wins_on_the_embedded_model_and_restore_is_bit_exact(embedded, world_request):
    before = snapshot(embedded)
    seen = []
    hp = LoRAHyperParams(modules=("1.mlp_out", "2.attn_v"), steps=15)
    handle = lora(embedded, [world_request], hp, progress=lambda *a: seen.append(a))
    try:
        assert prefers_new(embedded, world_request)
        assert changed(embedded, before) == set(handle.deltas) == {
            "model.layers.1.mlp.down_proj.weight", "model.layers.2.self_attn.v_proj.weight"}
        assert handle.adapter["config"]["r"] == 8 and handle.adapter["config"]["peft_type"] == "LORA"
    finally:
        handle.restore()
    assert same_weights(embedded, before)
    assert seen[-1] == ("train", 15, 15)


def test_reg_lora_edit_wins_with_held_out_world_retention(embedded, world_request):
    before = snapshot(embedded)
    hp = RegLoRAHyperParams(steps=15, n_retention_facts=6, n_retention_sums=3)
    rows, source = retention_data(embedded, [world_request], hp)
    assert source == "world" and len(rows) == 9
    neighbours = {p for p, _ in world_request.neighborhood}
    assert not neighbours & {p for p, _ in rows}
    assert all(world_request.subject not in p or world_request.relation_id not in p for p, _ in rows)
    assert sum(1 for p, a in rows if "+" in p and a.isdigit()) == 3  # the arithmetic suite
    with reg_lora(embedded, [world_request], hp) as h:
        assert prefers_new(embedded, world_request)
        assert h.evidence["retention_source"] == "world" and len(h.evidence["retention"]) == 9
    assert same_weights(embedded, before)
    assert retention_data(embedded, [world_request], hp) == (rows, source)  # seeded


@pytest.mark.parametrize("arch, modules", [("llama", "all"), ("gpt2", "all"), ("gpt2", "mlp")])
def test_saved_adapter_loads_with_peft_alone_and_gives_the_edited_logits(models, tmp_path, arch, modules):
    from peft import PeftModel

    m = models(arch)
    before = snapshot(m)
    ids = torch.tensor([m.encode(TINY_REQUEST.prompt + " and then")])
    with lora(m, [TINY_REQUEST], LoRAHyperParams(modules=modules, steps=3, lr=5e-2)) as h:
        h.save(tmp_path / "edit")
        with torch.no_grad():
            edited = m.hf_model(input_ids=ids).logits
    with torch.no_grad():
        unedited = m.hf_model(input_ids=ids).logits
        fresh = unbridged_copy(m)  # an ordinary HF model with the unedited weights
        peft_model = PeftModel.from_pretrained(fresh, tmp_path / "edit" / "adapter").eval()
        via_peft = peft_model(input_ids=ids).logits
    assert (edited - unedited).abs().max() > 1e-3  # the edit does something ...
    torch.testing.assert_close(via_peft, edited, atol=1e-4, rtol=1e-4)  # ... and peft alone reproduces it
    assert same_weights(m, before)
    loaded = EditHandle.load(tmp_path / "edit")
    assert loaded.adapter["config"]["target_modules"] and set(loaded.adapter["weights"]) == set(h.adapter["weights"])


def test_lora_is_seeded(models):
    m = models("llama")
    hp = LoRAHyperParams(modules="mlp", steps=2, lr=1e-2, seed=3)
    with lora(m, [TINY_REQUEST], hp) as a:
        da = {k: v.clone() for k, v in a.deltas.items()}
    with lora(m, [TINY_REQUEST], hp) as b:
        assert all(torch.equal(da[k], b.deltas[k]) for k in da)
    with lora(m, [TINY_REQUEST], LoRAHyperParams(modules="mlp", steps=2, lr=1e-2, seed=4)) as c:
        assert not all(torch.equal(da[k], c.deltas[k]) for k in da)


def test_reg_lora_off_the_world_uses_neighbours_or_given_prompts(models):
    m = models("llama")
    with_neighbour = TINY_REQUEST.__class__(**{**TINY_REQUEST.__dict__,
                                               "neighborhood": (("Yesterday I met Lodum Fideth", "Rome"),)})
    rows, source = retention_data(m, [with_neighbour], RegLoRAHyperParams())
    assert source == "neighbourhood" and rows == [("Yesterday I met Lodum Fideth", "Rome")]
    given = RegLoRAHyperParams(retention=("2+2= => 4", "The weather is"), steps=2)
    assert retention_data(m, [TINY_REQUEST], given) == ([("2+2=", "4"), ("The weather is", None)], "given")
    before = snapshot(m)
    with reg_lora(m, [TINY_REQUEST], given) as h:
        assert h.evidence["retention_source"] == "given"
    with pytest.raises(InputError, match="retention"):
        reg_lora(m, [TINY_REQUEST], RegLoRAHyperParams(steps=2))
    assert same_weights(m, before)


@pytest.mark.parametrize("cls, overrides, needle", [
    (LoRAHyperParams, {"rank": 0}, "rank"), (LoRAHyperParams, {"steps": 0}, "steps"),
    (LoRAHyperParams, {"lr": 0.0}, "lr"), (LoRAHyperParams, {"modules": ()}, "empty"),
    (LoRAHyperParams, {"dropout": 1.0}, "dropout"), (RegLoRAHyperParams, {"kl_weight": -1}, "kl_weight"),
    (RegLoRAHyperParams, {"retention": "none"}, "retention"), (RegLoRAHyperParams, {"lr": -1}, "lr"),
])
def test_bad_hparams_fail_clearly(cls, overrides, needle):
    with pytest.raises(InputError, match=needle):
        cls().with_overrides(overrides)


def test_module_not_in_model_fails_before_any_weight_changes(models):
    m = models("gpt2")
    before = snapshot(m)
    with pytest.raises(InputError, match="not a trainable module"):
        lora(m, [TINY_REQUEST], LoRAHyperParams(modules=("transformer.h.0.mlp.down_proj",)))
    with pytest.raises(InputError, match="not in"):
        lora(m, [TINY_REQUEST], LoRAHyperParams(layers=(9,)))
    assert same_weights(m, before)


def test_cli_edit_with_lora(tiny_dir, tmp_path):
    out = tmp_path / "out"
    args = ["edit", "--model", str(tiny_dir("llama")), "--method", "lora", "--prompt", TINY_REQUEST.prompt,
            "--subject", TINY_REQUEST.subject, "--target-new", "Paris", "--target-true", "Rome",
            "--modules", "1.mlp_out,2.mlp_out", "--hp", "steps=3", "--no-evaluate", "--out", str(out)]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "edit" / "edit.json").read_text())
    assert meta["method"] == "lora" and meta["hparams"]["steps"] == 3
    assert set(meta["deltas"]) == {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    assert (out / "edit" / "adapter" / "adapter_config.json").is_file()
    bad = CliRunner().invoke(app, [*args[:-2], "--hp", "rank=0"], env={"COLUMNS": "200"})
    assert bad.exit_code == 2 and "rank must be a positive integer" in bad.output and "Traceback" not in bad.output
