"""Locating (mechedit.locating) on tiny random models: the decisions are valid for the model, follow their stated
rules, record their evidence, survive save/load, and given evidence is used instead of recomputed.

As in test_causal_trace, the ``sharp`` fixture multiplies the final norm's weight by 20 so that the random
models' next-token distributions are peaked and tracers see effects well above float noise.
"""

from __future__ import annotations

import pytest
import torch

import mechedit
import mechedit.locating as locate_module
from mechedit.errors import DataFormatError, InputError
from mechedit.locating import LocateConfig, LocateEvidence, LocateResult, locate
from mechedit.model import resolve_module
from mechedit.tracing import CausalTraceConfig, causal_trace, live_hooks

ARCHS = ("gpt2", "llama", "gpt_neox")  # fused q/k/v + Conv1D, separate q/k/v + GQA, parallel attention
PROMPT = "Voupeis Draexmir was born in the city of"
SUBJECT = "Voupeis Draexmir"
FAST = LocateConfig(samples=2, adapter_size=5)


@pytest.fixture(scope="module")
def llama_located(sharp) -> LocateResult:
    return locate(sharp("llama"), PROMPT, SUBJECT, config=FAST)


# -- decisions valid for the model ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_decisions_are_valid_for_the_model(sharp, arch):
    m = sharp(arch)
    r = locate(m, PROMPT, SUBJECT, config=FAST)
    assert 0 <= r.edit_layer < m.n_layers
    assert r.edit_module == m.module_name(r.edit_layer, "mlp_out")
    assert resolve_module(m.hf_model, r.edit_module) is m.module(r.edit_layer, "mlp_out")
    # every candidate is a real module of the architecture table, each (kind, layer) once
    kinds = [k for k, path in m.arch.modules().items() if path]
    assert len(r.ranking) == len(kinds) * m.n_layers
    assert {(x.kind, x.layer) for x in r.ranking} == {(k, layer) for k in kinds for layer in range(m.n_layers)}
    assert len(r.adapter_modules) == FAST.adapter_size == len(set(r.adapter_modules))
    for name in r.adapter_modules:
        mod = resolve_module(m.hf_model, name)
        assert isinstance(mod, torch.nn.Module) and hasattr(mod, "weight")
    assert r.adapter_modules == [x.module for x in r.ranking[:FAST.adapter_size]]
    assert live_hooks(m) == []


def test_edit_layer_follows_roms_rule(llama_located):
    r = llama_located
    trace = r.evidence.causal_trace
    last_subject = r.subject_range[1] - 1
    column = trace.scores["mlp"][:, last_subject]
    assert r.edit_layer == int(column.argmax())
    assert set(trace.scores) == {"mlp"}
    # the default window scales with depth: n_layers / 5, at least 1 (ROME: 10 of 48)
    assert trace.config.window == FAST.window_for(trace.n_layers) == 1
    assert LocateConfig().window_for(48) == 10 and LocateConfig().window_for(8) == 2
    assert LocateConfig(window=4).window_for(48) == 4


def test_ranking_combines_normalised_scores(llama_located):
    r = llama_located
    combined = [x.combined for x in r.ranking]
    assert combined == sorted(combined, reverse=True)
    assert [x.rank for x in r.ranking] == list(range(1, len(r.ranking) + 1))
    for part in ("patch_score", "grad_score"):
        values = [getattr(x, part) for x in r.ranking]
        assert min(values) == 0.0 and max(values) == 1.0
    for x in r.ranking:
        assert x.combined == pytest.approx(0.5 * x.patch_score + 0.5 * x.grad_score)
        component = "mlp_out" if x.kind.startswith("mlp_") else "attn_out"
        assert x.site == f"blocks.{x.layer}.hook_{component}"
        # "max" position: the largest effect over the prompt's positions
        eff = r.evidence.patching.effect(component)[x.layer, :len(r.tokens)]
        assert x.patch_effect == pytest.approx(float(eff.max()))
        assert x.grad_norm == pytest.approx(float(r.evidence.gradients.modules[x.kind][x.layer]))


def test_weights_and_position_options(sharp, llama_located):
    m = sharp("llama")
    grads_only = locate(m, PROMPT, SUBJECT, config=LocateConfig(samples=2, patch_weight=0, grad_weight=1),
                        evidence=llama_located.evidence)
    norms = sorted(((float(g[layer]), k, layer) for k, g in llama_located.evidence.gradients.modules.items()
                    for layer in range(m.n_layers)), reverse=True)
    assert [(x.kind, x.layer) for x in grads_only.ranking[:3]] == [(k, layer) for _, k, layer in norms[:3]]
    last = locate(m, PROMPT, SUBJECT, config=LocateConfig(samples=2, position="last_subject"),
                  evidence=llama_located.evidence)
    assert {x.position for x in last.ranking} == {last.subject_range[1] - 1}
    only_mlp = locate(m, PROMPT, SUBJECT, config=LocateConfig(samples=2, adapter_size=2, adapter_kinds=["mlp_out"]),
                      evidence=llama_located.evidence)
    assert only_mlp.adapter_modules and all(n.endswith("mlp.down_proj") for n in only_mlp.adapter_modules)
    assert len(only_mlp.ranking) == m.n_layers


def test_adapter_size_larger_than_candidates(sharp, llama_located):
    m = sharp("llama")
    r = locate(m, PROMPT, SUBJECT, config=LocateConfig(samples=2, adapter_size=1000), evidence=llama_located.evidence)
    assert len(r.adapter_modules) == len(r.ranking)


# -- evidence ---------------------------------------------------------------------------------------------------


def test_evidence_is_recorded(llama_located):
    r = llama_located
    ev = r.evidence
    assert ev.causal_trace is not None and ev.patching is not None and ev.gradients is not None
    assert r.edit_decision.sources == {"causal_trace": "computed"}
    assert r.adapter_decision.sources == {"patching": "computed", "gradients": "computed"}
    assert "last subject token" in r.edit_decision.rule
    n = r.edit_decision.numbers
    assert n["position"] == r.subject_range[1] - 1
    assert n["scores"] == ev.causal_trace.scores["mlp"][:, n["position"]].tolist()
    assert n["peak_score"] == max(n["scores"])
    assert (r.low_score, r.high_score) == (ev.causal_trace.low_score, ev.causal_trace.high_score)
    a = r.adapter_decision.numbers
    assert [c["module"] for c in a["chosen"]] == r.adapter_modules
    assert a["weights"] == {"patching": 0.5, "gradients": 0.5}
    assert a["patching"]["corruption"] == "noise on the subject" and a["patching"]["direction"] == "denoise"
    assert "combined score" in r.adapter_decision.rule
    assert set(ev.patching.scores) == {"attn_out", "mlp_out"}


def test_precomputed_evidence_is_used_not_recomputed(sharp, llama_located, monkeypatch):
    m = sharp("llama")

    def must_not_run(*args, **kwargs):
        raise AssertionError("a tracer ran although its result was given")

    for name in ("causal_trace", "activation_patching", "gradient_norms"):
        monkeypatch.setattr(locate_module, name, must_not_run)
    again = locate(m, PROMPT, SUBJECT, config=FAST, evidence=llama_located.evidence)
    assert again.edit_layer == llama_located.edit_layer
    assert again.adapter_modules == llama_located.adapter_modules
    assert again.evidence.causal_trace is llama_located.evidence.causal_trace
    assert again.edit_decision.sources == {"causal_trace": "given"}
    assert again.adapter_decision.sources == {"patching": "given", "gradients": "given"}


def test_partial_evidence_computes_only_the_rest(sharp, monkeypatch):
    m = sharp("llama")
    trace = causal_trace(m, PROMPT, SUBJECT, config=CausalTraceConfig(samples=2, window=2, kinds=("mlp", "attn")))
    calls = []
    for name in ("causal_trace", "activation_patching", "gradient_norms"):
        real = getattr(locate_module, name)
        monkeypatch.setattr(locate_module, name,
                            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    r = locate(m, PROMPT, SUBJECT, config=FAST, evidence=LocateEvidence(causal_trace=trace))
    assert calls == ["activation_patching", "gradient_norms"]
    assert r.evidence.causal_trace is trace
    assert r.edit_decision.numbers["window"] == 2  # the given trace's window, not the config's
    assert r.edit_decision.sources == {"causal_trace": "given"}
    assert r.adapter_decision.sources == {"patching": "computed", "gradients": "computed"}


def test_evidence_that_does_not_fit_is_refused(sharp, llama_located):
    m = sharp("llama")
    other = causal_trace(m, "Lodum Fideth was born in the city of", "Lodum Fideth",
                         config=CausalTraceConfig(samples=2, kinds=("mlp",)))
    with pytest.raises(InputError, match="prompt"):
        locate(m, PROMPT, SUBJECT, config=FAST, evidence=LocateEvidence(causal_trace=other))
    with pytest.raises(InputError, match="answer"):
        locate(m, PROMPT, SUBJECT, "Paris London", config=FAST,
               evidence=LocateEvidence(gradients=llama_located.evidence.gradients))
    no_mlp = causal_trace(m, PROMPT, SUBJECT, config=CausalTraceConfig(samples=2, kinds=("hidden",)))
    with pytest.raises(InputError, match="'mlp'"):
        locate(m, PROMPT, SUBJECT, config=FAST, evidence=LocateEvidence(causal_trace=no_mlp))
    with pytest.raises(InputError, match="must be a"):
        locate(m, PROMPT, SUBJECT, config=FAST, evidence=LocateEvidence(patching=llama_located.evidence.gradients))
    assert live_hooks(m) == []


def test_evidence_from_other_weights_is_refused(sharp, tiny_dir, llama_located):
    fresh = mechedit.load(tiny_dir("llama"))  # same architecture and tokenizer, weights not sharpened
    with pytest.raises(InputError, match="other weights|answer"):
        locate(fresh, PROMPT, SUBJECT, config=FAST,
               evidence=LocateEvidence(causal_trace=llama_located.evidence.causal_trace))


# -- persistence, frame, figure, determinism --------------------------------------------------------------------


def test_save_load_round_trip(llama_located, tmp_path):
    path = llama_located.save(tmp_path / "locate.json")
    back = LocateResult.load(path)
    assert back.to_json_dict() == llama_located.to_json_dict()
    assert back.edit_layer == llama_located.edit_layer and back.adapter_modules == llama_located.adapter_modules
    torch.testing.assert_close(back.evidence.causal_trace.scores["mlp"],
                               llama_located.evidence.causal_trace.scores["mlp"])
    assert back.config == llama_located.config
    (tmp_path / "trace.json").write_text('{"format": "mechedit.causal_trace/1"}')
    with pytest.raises(DataFormatError, match="not a LocateResult"):
        LocateResult.load(tmp_path / "trace.json")


def test_loaded_evidence_can_be_given_again(sharp, llama_located, tmp_path):
    back = LocateResult.load(llama_located.save(tmp_path / "locate.json"))
    again = locate(sharp("llama"), PROMPT, SUBJECT, config=FAST, evidence=back.evidence)
    assert again.adapter_modules == llama_located.adapter_modules


def test_frame_and_plot(llama_located):
    df = llama_located.to_frame()
    assert list(df["module"]) == [x.module for x in llama_located.ranking]
    assert df["in_adapter"].sum() == FAST.adapter_size
    assert df["is_edit_module"].sum() == 1
    assert {"rank", "kind", "layer", "site", "token", "patch_effect", "grad_norm", "combined"} <= set(df.columns)
    fig = llama_located.plot()
    assert [t.type for t in fig.data] == ["bar", "heatmap", "bar", "bar"]


def test_same_seed_same_decisions(sharp, llama_located):
    again = locate(sharp("llama"), PROMPT, SUBJECT, config=FAST)
    assert again.edit_layer == llama_located.edit_layer
    assert again.adapter_modules == llama_located.adapter_modules


def test_progress_reports_every_stage(sharp, llama_located):
    seen = []
    locate(sharp("llama"), PROMPT, SUBJECT, config=FAST, progress=lambda done, total: seen.append((done, total)))
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)  # never goes backwards


# -- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(position="first"), "position"),
    (dict(patch_weight=0, grad_weight=0), "both be 0"),
    (dict(patch_weight=-1), "patch_weight"),
    (dict(adapter_size=0), "adapter_size"),
    (dict(window=0), "window"),
    (dict(patch_metric="accuracy"), "metric"),
    (dict(adapter_kinds="mlp_out"), "not the string"),
])
def test_config_is_checked(kw, match):
    with pytest.raises(InputError, match=match):
        LocateConfig(**kw)


def test_config_round_trips():
    cfg = LocateConfig(window=3, adapter_kinds=("mlp_out", "attn_out"), position="last_subject")
    assert LocateConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(DataFormatError, match="unknown"):
        LocateConfig.from_dict({"windw": 3})


def test_bad_input(sharp):
    m = sharp("llama")
    with pytest.raises(InputError, match="not in the prompt"):
        locate(m, PROMPT, "Nobody Atall", config=FAST)
    with pytest.raises(InputError, match="empty"):
        locate(m, "", SUBJECT, config=FAST)
    with pytest.raises(InputError, match="no module kind"):
        locate(m, PROMPT, SUBJECT, config=LocateConfig(adapter_kinds=("attn_qkv",)))
    assert live_hooks(m) == []
