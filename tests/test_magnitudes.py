"""Activation magnitudes (mechedit.tracing.magnitudes) on tiny random models of each architecture."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import pytest
import torch

from conftest import exploding_mlp
from mechedit.errors import DataFormatError, InputError
from mechedit.sites import Site
from mechedit.tracing import (
    DEFAULT_BASELINE_PROMPTS, MagnitudeConfig, MagnitudeResult, activation_magnitudes, live_hooks,
)
from mechedit.tracing.magnitudes import DEFAULT_COMPONENTS

ARCHS = ("gpt2", "llama", "qwen2", "gpt_neox")
PROMPT = "Voupeis Draexmir was born in the city of"
SUBJECT = "Voupeis Draexmir"
BASELINES = ["Tamsel Orwick lives in the town of", "The weather today is", "Kiro Bastane works as a"]


@pytest.fixture(scope="module")
def llama_mag(models) -> MagnitudeResult:
    return activation_magnitudes(models("llama"), PROMPT, BASELINES, subject=SUBJECT)


# -- the numbers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_norms_equal_a_cached_run_and_hf_hidden_states(models, arch):
    m = models(arch)
    comps = ("resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_pre", "mlp_post", "z")
    r = activation_magnitudes(m, PROMPT, BASELINES, components=comps)
    x = torch.tensor([m.encode(PROMPT)])
    names = {c: [Site(layer, c).hook_name for layer in range(m.n_layers)] for c in comps}
    with torch.no_grad():
        _, cache = m.bridge.run_with_cache(x, names_filter=[n for ns in names.values() for n in ns])
        hidden = m.hf_model(x, output_hidden_states=True).hidden_states
    for c in comps:
        assert r.norms[c].shape == (m.n_layers, len(r.tokens))
        for layer, name in enumerate(names[c]):
            want = cache[name][0].flatten(start_dim=1).norm(dim=-1)  # (T,)
            torch.testing.assert_close(r.norms[c][layer], want, rtol=1e-5, atol=1e-6)
    for layer in range(m.n_layers):  # independent of the bridge's hooks
        torch.testing.assert_close(r.norms["resid_pre"][layer], hidden[layer][0].norm(dim=-1), rtol=1e-5, atol=1e-6)
    assert cache["blocks.0.mlp.hook_post"].shape[-1] == m.d_mlp  # mlp_post's norm is over d_mlp
    assert live_hooks(m) == []


def test_baseline_statistics_are_the_pools_mean_and_std(models, llama_mag):
    m = models("llama")
    r = llama_mag
    assert r.comparisons == ["last", "subject_last"]
    assert r.positions == [len(r.tokens) - 1, r.subject_range[1] - 1]
    # each baseline prompt measured on its own
    each = [activation_magnitudes(m, b, BASELINES[:1]).norms for b in BASELINES]
    for c in DEFAULT_COMPONENTS:
        last = torch.stack([n[c][:, -1] for n in each], dim=1)  # (L, N)
        interior = torch.cat([n[c][:, 1:-1] for n in each], dim=1)  # (L, M)
        torch.testing.assert_close(r.baseline_mean[c][0], last.mean(dim=1))
        torch.testing.assert_close(r.baseline_std[c][0], last.std(dim=1))
        torch.testing.assert_close(r.baseline_mean[c][1], interior.mean(dim=1))
        torch.testing.assert_close(r.baseline_std[c][1], interior.std(dim=1))
        fact = torch.stack([r.norms[c][:, pos] for pos in r.positions])  # (P, L)
        torch.testing.assert_close(r.fact[c], fact)
        torch.testing.assert_close(r.ratio[c], fact / r.baseline_mean[c])
        torch.testing.assert_close(r.z_score[c], (fact - r.baseline_mean[c]) / r.baseline_std[c])
    assert r.baseline_n == [len(BASELINES), sum(len(m.encode(b)) - 2 for b in BASELINES)]


def test_without_subject_only_the_last_token_is_compared(models):
    m = models("gpt2")
    r = activation_magnitudes(m, PROMPT, BASELINES)
    assert r.comparisons == ["last"] and r.positions == [len(r.tokens) - 1]
    assert r.subject is None and r.subject_range is None
    assert r.baseline_mean["mlp_out"].shape == (1, m.n_layers)


def test_single_baseline_gives_nan_std_and_finite_ratio(models, tmp_path):
    m = models("qwen2")
    r = activation_magnitudes(m, PROMPT, ["The weather today is"], subject=SUBJECT)
    assert r.baseline_n[0] == 1
    assert torch.isnan(r.baseline_std["resid_post"][0]).all() and torch.isnan(r.z_score["resid_post"][0]).all()
    assert torch.isfinite(r.ratio["resid_post"]).all()
    assert torch.isfinite(r.z_score["resid_post"][1]).all()  # the interior pool has several tokens
    back = MagnitudeResult.load(r.save(tmp_path / "nan.json"))  # NaN survives save/load
    assert torch.equal(back.baseline_std["resid_post"].isnan(), r.baseline_std["resid_post"].isnan())
    torch.testing.assert_close(back.baseline_std["mlp_post"], r.baseline_std["mlp_post"], equal_nan=True)


def test_default_baselines(models):
    m = models("llama")
    r = activation_magnitudes(m, PROMPT)
    assert r.baseline_prompts == list(DEFAULT_BASELINE_PROMPTS)
    assert r.baseline_n == [len(DEFAULT_BASELINE_PROMPTS)]
    assert r.config == MagnitudeConfig()


def test_answer_is_recorded_and_norms_do_not_depend_on_it(models, llama_mag):
    m = models("llama")
    r = activation_magnitudes(m, PROMPT, BASELINES, subject=SUBJECT, target="Paris London")
    assert r.answer.strip() == "Paris London" and len(r.answer_ids) > 1
    for c in r.norms:
        torch.testing.assert_close(r.norms[c], llama_mag.norms[c])


# -- hooks, inputs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("after", [0, 2])  # in the fact prompt's run; in a baseline prompt's run
def test_no_hook_remains_after_a_call_that_raised(models, after):
    m = models("gpt2")
    with exploding_mlp(m, after), pytest.raises(RuntimeError, match="boom"):
        activation_magnitudes(m, PROMPT, BASELINES, target="Paris")  # a given target: no greedy forward
    assert live_hooks(m) == []


def test_bad_input(models):
    m = models("gpt_neox")
    with pytest.raises(InputError, match="baseline prompts is empty"):
        activation_magnitudes(m, PROMPT, [])
    with pytest.raises(InputError, match="not one string"):
        activation_magnitudes(m, PROMPT, "The weather today is")
    with pytest.raises(InputError, match="baseline prompt 1"):
        activation_magnitudes(m, PROMPT, ["The weather today is", "  "])
    with pytest.raises(InputError, match="the prompt is empty"):
        activation_magnitudes(m, "", BASELINES)
    with pytest.raises(InputError, match="not in the prompt"):
        activation_magnitudes(m, PROMPT, BASELINES, subject="Nobody Atall")
    with pytest.raises(InputError, match="parallel"):
        activation_magnitudes(m, PROMPT, BASELINES, components=("resid_mid",))
    with pytest.raises(InputError, match="components"):
        activation_magnitudes(m, PROMPT, BASELINES, components=("pattern",))
    with pytest.raises(InputError, match="components"):
        activation_magnitudes(m, PROMPT, BASELINES, components=())
    with pytest.raises(InputError, match="interior"):
        activation_magnitudes(m, PROMPT, ["a"], subject=SUBJECT)
    assert live_hooks(m) == []


# -- the result object -----------------------------------------------------------------------------------------


def test_save_load_round_trip(llama_mag, tmp_path):
    back = MagnitudeResult.load(llama_mag.save(tmp_path / "mag.json"))
    assert back.to_json_dict() == llama_mag.to_json_dict()
    for c, n in llama_mag.norms.items():
        assert torch.equal(back.norms[c], n)
    assert back.config == llama_mag.config and back.subject_range == llama_mag.subject_range
    (tmp_path / "bad.json").write_text('{"format": "mechedit.logit_lens/1"}')
    with pytest.raises(DataFormatError):
        MagnitudeResult.load(tmp_path / "bad.json")


def test_config_round_trips():
    c = MagnitudeConfig(components=("mlp_post", "z"))
    assert MagnitudeConfig.from_dict(c.to_dict()) == c
    with pytest.raises(DataFormatError):
        MagnitudeConfig.from_dict({"components": ["z"], "baseline": "x"})


def test_to_frame(llama_mag, models):
    m = models("llama")
    df = llama_mag.to_frame()
    assert list(df.columns) == ["component", "layer", "position", "token", "is_subject", "comparison", "norm",
                                "baseline_mean", "baseline_std", "ratio", "z_score"]
    n_comps, n_tokens = len(llama_mag.norms), len(llama_mag.tokens)
    assert len(df) == n_comps * m.n_layers * (n_tokens + len(llama_mag.comparisons))
    plain = df[df.comparison == "none"]
    assert plain.ratio.isna().all() and len(plain) == n_comps * m.n_layers * n_tokens
    row = df[(df.comparison == "subject_last") & (df.component == "mlp_out") & (df.layer == 1)].iloc[0]
    assert row.position == llama_mag.subject_range[1] - 1 and bool(row.is_subject)
    assert row.z_score == pytest.approx(float(llama_mag.z_score["mlp_out"][1, 1]))
    last = df[(df.comparison == "last") & (df.component == "resid_post")]
    assert (last.position == n_tokens - 1).all() and len(last) == m.n_layers


def test_plot(llama_mag):
    fig = llama_mag.plot()
    assert isinstance(fig, go.Figure)
    heats = [t for t in fig.data if t.type == "heatmap"]
    bars = [t for t in fig.data if t.type == "bar"]
    assert [h.name for h in heats] == list(llama_mag.norms)
    assert len(bars) == len(llama_mag.norms) * len(llama_mag.comparisons)
    assert list(bars[0].y) == pytest.approx(llama_mag.ratio[list(llama_mag.norms)[0]][0].tolist())
    assert not any(math.isnan(v) for b in bars for v in b.y)


def test_result_records_model_and_prompt(models, llama_mag):
    m = models("llama")
    assert llama_mag.model_fingerprint == m.fingerprint() and llama_mag.model_name == m.name
    assert llama_mag.tokens == m.token_strings(m.encode(PROMPT))
    assert llama_mag.baseline_prompts == BASELINES
    assert "".join(llama_mag.tokens[slice(*llama_mag.subject_range)]).strip() == SUBJECT
