"""Gradient norms (mechedit.tracing.gradients) on tiny random models of each architecture, checked against
autograd on a fresh, un-bridged HF model."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import pytest
import torch

import mechedit
from conftest import exploding_mlp
from mechedit.errors import DataFormatError, InputError
from mechedit.model import resolve_module
from mechedit.sites import RESIDUAL_COMPONENTS
from mechedit.tracing import (
    GradientNormConfig, GradientNormResult, gradient_norms, live_hooks, prepare_prompt,
)
from mechedit.tracing.common import answer_prob

ARCHS = ("gpt2", "llama", "qwen2", "gpt_neox")
PROMPT = "Voupeis Draexmir was born in the city of"
SUBJECT = "Voupeis Draexmir"
# the input of the norm before each layer's MLP: the residual stream between attention and MLP (test-only table;
# GPT-NeoX runs attention and MLP in parallel and has no such point)
RESID_MID_NORM = {"gpt2": "transformer.h.{L}.ln_2", "llama": "model.layers.{L}.post_attention_layernorm",
                  "qwen2": "model.layers.{L}.post_attention_layernorm"}


@pytest.fixture(scope="module")
def llama_grads(models) -> GradientNormResult:
    return gradient_norms(models("llama"), PROMPT, subject=SUBJECT)


def direct(tiny_dir, m: mechedit.LoadedModel, arch: str, target: str | None = None):
    """(log p(answer), fresh HF model, its hidden states, resid_mid tensors) with the graph kept."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir(arch), attn_implementation="eager").eval()
    p = prepare_prompt(m, PROMPT, None, target)
    mids: dict[int, torch.Tensor] = {}
    handles = []
    for layer in range(m.n_layers) if arch in RESID_MID_NORM else ():
        mod = resolve_module(hf, RESID_MID_NORM[arch].format(L=layer))
        handles.append(mod.register_forward_pre_hook(lambda mod, args, layer=layer: mids.__setitem__(layer, args[0])))
    try:
        out = hf(torch.tensor([p.input_ids]), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    logp = sum(out.logits[0, pos].log_softmax(-1)[a] for pos, a in zip(p.answer_positions, p.answer_ids))
    return logp, hf, out.hidden_states, mids


def norm_of(grads) -> float:
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads))


# -- agreement with autograd on the HF model ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_module_norms_equal_direct_autograd_on_hf_model(models, tiny_dir, arch):
    m = models(arch)
    r = gradient_norms(m, PROMPT, subject=SUBJECT)
    logp, hf, _, _ = direct(tiny_dir, m, arch)
    assert r.log_prob == pytest.approx(float(logp.detach()), abs=1e-5)
    assert set(r.modules) == {k for k, path in m.arch.modules().items() if path}
    # the brief's case: the MLP output projection of layer 1
    mlp_out = resolve_module(hf, m.module_name(1, "mlp_out"))
    want = norm_of(torch.autograd.grad(logp, list(mlp_out.parameters()), retain_graph=True))
    assert float(r.modules["mlp_out"][1]) == pytest.approx(want, rel=1e-4)
    # and every other module, the fused q/k/v projections of GPT-2 and GPT-NeoX included
    for kind, norms in r.modules.items():
        assert norms.shape == (m.n_layers,)
        for layer in range(m.n_layers):
            mod = resolve_module(hf, m.module_name(layer, kind))
            want = norm_of(torch.autograd.grad(logp, list(mod.parameters()), retain_graph=True))
            assert float(norms[layer]) == pytest.approx(want, rel=1e-4, abs=1e-7), (kind, layer)
    assert float(r.modules["mlp_out"].min()) > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_site_norms_equal_direct_autograd_on_hf_model(models, tiny_dir, arch):
    m = models(arch)
    r = gradient_norms(m, PROMPT)
    logp, _, hidden, mids = direct(tiny_dir, m, arch)
    n_tokens = len(r.tokens)
    for layer in range(m.n_layers):
        g = torch.autograd.grad(logp, hidden[layer], retain_graph=True)[0][0].norm(dim=-1)  # (T,)
        torch.testing.assert_close(r.sites["resid_pre"][layer], g[:n_tokens], rtol=1e-4, atol=1e-7)
        if layer + 1 < m.n_layers:  # the output of one block is the input of the next
            torch.testing.assert_close(r.sites["resid_post"][layer], r.sites["resid_pre"][layer + 1])
        if arch in RESID_MID_NORM:  # both uses of resid_mid count: the skip connection and the MLP's input
            g = torch.autograd.grad(logp, mids[layer], retain_graph=True)[0][0].norm(dim=-1)
            torch.testing.assert_close(r.sites["resid_mid"][layer], g[:n_tokens], rtol=1e-4, atol=1e-7)
    for comp, g in r.sites.items():
        assert g.shape == (m.n_layers, n_tokens) and torch.isfinite(g).all(), comp


def test_multi_token_answer_objective(models):
    m = models("qwen2")
    r = gradient_norms(m, PROMPT, target="Paris London")
    p = prepare_prompt(m, PROMPT, None, "Paris London")
    assert len(r.answer_ids) > 1 and r.answer_ids == list(p.answer_ids)
    with torch.no_grad():
        prob = float(answer_prob(m.bridge(torch.tensor([p.input_ids])), p)[0])
    assert r.log_prob == pytest.approx(math.log(prob), abs=1e-4)
    assert r.sites["resid_post"].shape[1] == len(p.ids)  # prompt positions only


def test_fused_qkv_and_parallel_blocks_are_noted(models):
    g2 = gradient_norms(models("gpt2"), PROMPT)
    assert "attn_qkv" in g2.modules and "attn_q" not in g2.modules
    assert "split" in g2.notes["attn_qkv"]
    neox = gradient_norms(models("gpt_neox"), PROMPT)
    assert "resid_mid" not in neox.sites and "parallel" in neox.notes["resid_mid"]
    assert set(neox.sites) == set(RESIDUAL_COMPONENTS) - {"resid_mid"}
    llama = gradient_norms(models("llama"), PROMPT)
    assert llama.notes == {} and set(llama.sites) == set(RESIDUAL_COMPONENTS)


# -- no side effects ---------------------------------------------------------------------------------------------


def snapshot(m: mechedit.LoadedModel) -> dict[str, bool]:
    return {n: q.requires_grad for n, q in m.hf_model.named_parameters()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_no_grads_left_and_requires_grad_restored(models, arch):
    m = models(arch)
    before = gradient_norms(m, PROMPT)
    fingerprint = m.fingerprint()
    frozen = [q for n, q in m.hf_model.named_parameters() if ".0." in n or "embed" in n or "wte" in n]
    try:
        for q in frozen:
            q.requires_grad_(False)
        flags = snapshot(m)
        r = gradient_norms(m, PROMPT)
        assert snapshot(m) == flags
        assert all(q.grad is None for q in m.hf_model.parameters())
        # freezing changes nothing measured: every activation is still in the graph
        for kind in r.modules:
            torch.testing.assert_close(r.modules[kind], before.modules[kind])
        for comp in r.sites:
            torch.testing.assert_close(r.sites[comp], before.sites[comp])
        # a fully frozen model, called under no_grad, gives the same numbers too
        m.hf_model.requires_grad_(False)
        with torch.no_grad():
            r2 = gradient_norms(m, PROMPT)
        assert not any(q.requires_grad for q in m.hf_model.parameters())
        torch.testing.assert_close(r2.modules["mlp_out"], before.modules["mlp_out"])
        torch.testing.assert_close(r2.sites["resid_pre"], before.sites["resid_pre"])
    finally:
        m.hf_model.requires_grad_(True)
    assert all(q.grad is None for q in m.hf_model.parameters())
    assert m.fingerprint() == fingerprint
    assert live_hooks(m) == []


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_no_hook_and_no_flag_change_after_a_call_that_raised(models, arch):
    m = models(arch)
    m.module(0, "mlp_out").weight.requires_grad_(False)
    try:
        flags = snapshot(m)
        with exploding_mlp(m), pytest.raises(RuntimeError, match="boom"):
            gradient_norms(m, PROMPT, target="Paris")
        assert live_hooks(m) == []
        assert snapshot(m) == flags
        assert all(q.grad is None for q in m.hf_model.parameters())
    finally:
        m.module(0, "mlp_out").weight.requires_grad_(True)


def test_bad_input(models):
    m = models("gpt_neox")
    with pytest.raises(InputError, match="empty"):
        gradient_norms(m, "")
    with pytest.raises(InputError, match="not in the prompt"):
        gradient_norms(m, PROMPT, subject="Nobody Atall")
    with pytest.raises(InputError, match="parallel"):
        gradient_norms(m, PROMPT, components=("resid_mid",))
    with pytest.raises(InputError, match="attn_q"):
        gradient_norms(m, PROMPT, kinds=("attn_q",))
    with pytest.raises(InputError):
        gradient_norms(m, PROMPT, components=("resid_post", "resid_post"))
    with pytest.raises(InputError):
        gradient_norms(m, PROMPT, components="resid_post")
    with pytest.raises(InputError):
        gradient_norms(m, PROMPT, components=("mlp_post",))
    assert live_hooks(m) == []


def test_subsets(models):
    m = models("llama")
    r = gradient_norms(m, PROMPT, components=("mlp_out",), kinds=("mlp_out", "attn_v"))
    assert list(r.sites) == ["mlp_out"] and list(r.modules) == ["mlp_out", "attn_v"]
    full = gradient_norms(m, PROMPT)
    torch.testing.assert_close(r.modules["attn_v"], full.modules["attn_v"])
    torch.testing.assert_close(r.sites["mlp_out"], full.sites["mlp_out"])


# -- the result object -----------------------------------------------------------------------------------------


def test_save_load_round_trip(llama_grads, tmp_path):
    path = llama_grads.save(tmp_path / "grads.json")
    back = GradientNormResult.load(path)
    assert back.to_json_dict() == llama_grads.to_json_dict()
    for kind, g in llama_grads.modules.items():
        assert torch.equal(back.modules[kind], g)
    assert back.config == llama_grads.config and back.subject_range == llama_grads.subject_range
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(DataFormatError):
        GradientNormResult.load(tmp_path / "bad.json")


def test_config_round_trips():
    for c in (GradientNormConfig(), GradientNormConfig(components=("resid_pre",), kinds=("mlp_out",))):
        assert GradientNormConfig.from_dict(c.to_dict()) == c
    with pytest.raises(DataFormatError):
        GradientNormConfig.from_dict({"components": None, "kinds": None, "lr": 1})


def test_to_frame(llama_grads, models):
    m = models("llama")
    df = llama_grads.to_frame()
    assert list(df.columns) == ["group", "name", "layer", "position", "token", "is_subject", "target", "grad_norm"]
    n_tokens = len(llama_grads.tokens)
    assert len(df) == m.n_layers * (len(llama_grads.modules) + len(llama_grads.sites) * n_tokens)
    mods = df[df.group == "module"]
    assert mods.position.isna().all()
    row = mods[(mods.name == "mlp_out") & (mods.layer == 1)].iloc[0]
    assert row.target == m.module_name(1, "mlp_out") and row.grad_norm == float(llama_grads.modules["mlp_out"][1])
    sites = df[df.group == "site"]
    start, end = llama_grads.subject_range
    assert sites.is_subject.sum() == len(llama_grads.sites) * m.n_layers * (end - start)
    assert set(sites.target) >= {"blocks.0.hook_resid_pre", "blocks.2.hook_mlp_out"}
    assert llama_grads.top_modules(1)[0][2] == float(mods.grad_norm.max())


def test_plot(llama_grads):
    fig = llama_grads.plot()
    assert isinstance(fig, go.Figure)
    bars = [t for t in fig.data if t.type == "bar"]
    heats = [t for t in fig.data if t.type == "heatmap"]
    assert [b.name for b in bars] == list(llama_grads.modules)
    assert [h.name for h in heats] == list(llama_grads.sites)
    assert list(bars[0].y) == llama_grads.modules[bars[0].name].tolist()


def test_result_records_model_and_prompt(models, llama_grads):
    m = models("llama")
    assert llama_grads.model_fingerprint == m.fingerprint() and llama_grads.model_name == m.name
    assert llama_grads.tokens == m.token_strings(m.encode(PROMPT))
    assert "".join(llama_grads.tokens[slice(*llama_grads.subject_range)]).strip() == SUBJECT
    assert llama_grads.module_names["mlp_out"] == [m.module_name(layer, "mlp_out") for layer in range(m.n_layers)]
