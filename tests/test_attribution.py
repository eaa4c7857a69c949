"""Attribution patching (mechedit.tracing.attribution) and its agreement with exact activation patching.

Exactness. The first-order estimate grad · (source − base) equals the exact patch effect whenever the map from
the patched activation to the metric is affine. Every model here has one non-linearity between its last
block and the logits: the final norm. ``linear_final_norm`` replaces it, for the duration of a test, by a
fixed scale (a hook on ``ln_final.hook_in`` keeps the input, one on ``ln_final.hook_out`` returns it times
a constant, large enough that the random models' logit differences are of order 1). Then ``logit_diff`` is
affine in the last layer's ``resid_post``, ``mlp_out`` and ``mlp_post`` (and, in GPT-NeoX's parallel blocks,
in its ``attn_out`` and ``z`` too), and the estimates there must equal exact patching to float precision,
while earlier layers (attention, MLP non-linearities downstream) must not.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import mechedit
from mechedit.errors import DataFormatError, InputError
from mechedit.tracing import (
    AgreementReport, AttributionResult, PatchingConfig, activation_patching, agreement, attribution_patching, hooks,
    live_hooks,
)
from mechedit.tracing import attribution as attribution_module
from mechedit.tracing.attribution import spearman
from mechedit.tracing.patching import COMPONENTS

ARCHS = ("gpt2", "llama", "qwen2", "gpt_neox")
TEMPLATE = "{} was born in the city of"
SUBJECT = "Voupeis Draexmir"
CLEAN = TEMPLATE.format(SUBJECT)
LINEAR_IN_LAST_LAYER = ("resid_post", "mlp_out", "mlp_post")
PARALLEL_EXTRA = ("attn_out", "z")  # GPT-NeoX: attention output bypasses the MLP


@pytest.fixture(scope="module")
def corrupted(sharp) -> str:
    """Another world subject's prompt with as many tokens as CLEAN (the tiny models share one tokenizer)."""
    m = sharp("llama")
    n = len(m.encode(CLEAN))
    for subject in mechedit.World.generate(0).subjects:
        prompt = TEMPLATE.format(subject)
        if subject != SUBJECT and len(m.encode(prompt)) == n:
            return prompt
    raise AssertionError("no world subject gives a prompt as long as CLEAN")  # pragma: no cover


@contextmanager
def linear_final_norm(m, scale: float = 500.0):
    """Replace the final norm by ``x * scale`` (hooks, removed on exit): everything after the last block is
    then linear."""
    kept = {}

    def keep(x, hook):
        kept["x"] = x
        return x

    def linear(y, hook):
        return kept.pop("x") * scale

    with hooks(m, [("ln_final.hook_in", keep), ("ln_final.hook_out", linear)]):
        yield


# -- exactness on a linear toy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_exact_where_the_metric_is_linear_in_the_activation(sharp, corrupted, arch, direction):
    m = sharp(arch)
    comps = LINEAR_IN_LAST_LAYER + PARALLEL_EXTRA
    linear = LINEAR_IN_LAST_LAYER + (PARALLEL_EXTRA if arch == "gpt_neox" else ())
    cfg = PatchingConfig(components=comps, direction=direction)
    with linear_final_norm(m):
        est = attribution_patching(m, CLEAN, corrupted, config=cfg)
        exact = activation_patching(m, CLEAN, corrupted, config=cfg)
    assert abs(exact.clean_metric - exact.corrupted_metric) > 0.05
    tol = 2e-5 * max(1.0, abs(exact.clean_metric), abs(exact.corrupted_metric))  # float32 rounding
    for c in linear:
        diff = (est.values[c] - exact.values[c]).abs()  # (n_layers, ...)
        assert float(diff[-1].max()) <= tol, c
    # the test can tell: before the last layer the residual stream passes attention and MLP non-linearities,
    # and there the estimate is off by far more than the tolerance
    assert float((est.values["resid_post"] - exact.values["resid_post"])[:-1].abs().max()) > 100 * tol
    # equal values, equal normalised scores
    torch.testing.assert_close(est.scores["mlp_post"][-1], exact.scores["mlp_post"][-1], atol=1e-4, rtol=0)
    assert live_hooks(m) == []


def test_exact_under_noise_corruption_too(sharp):
    m = sharp("llama")
    cfg = PatchingConfig(components=("mlp_post", "resid_post"), samples=3)
    with linear_final_norm(m):
        est = attribution_patching(m, CLEAN, None, subject=SUBJECT, config=cfg)
        exact = activation_patching(m, CLEAN, None, subject=SUBJECT, config=cfg)
    # the same noise: the same corrupted runs (up to float rounding: activation patching runs them in a batch
    # with its patched rows, and a matrix product's rounding may depend on the batch size)
    assert est.noise_scale == exact.noise_scale
    assert est.corrupted_metric == pytest.approx(exact.corrupted_metric, abs=1e-5)
    for c in cfg.components:
        torch.testing.assert_close(est.values[c][-1], exact.values[c][-1], atol=1e-5, rtol=0)


# -- on an ordinary (non-linear) model -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_every_component_estimated_and_close_to_exact_for_small_activations(sharp, corrupted, arch):
    m = sharp(arch)
    comps = tuple(c for c in COMPONENTS if not (arch == "gpt_neox" and c == "resid_mid"))
    cfg = PatchingConfig(components=comps)
    est = attribution_patching(m, CLEAN, corrupted, config=cfg)
    exact = activation_patching(m, CLEAN, corrupted, config=cfg)
    for c in comps:
        assert est.scores[c].shape == exact.scores[c].shape, c
        assert est.values[c].isfinite().all(), c
    report = agreement(est, exact)
    assert set(report.components) == set(comps)
    # single neurons and attention patterns are small patches: the linear estimate ranks them well
    assert report.components["mlp_post"].spearman > 0.9
    assert report.components["pattern"].top_k_overlap == 1.0
    assert live_hooks(m) == []


def test_weights_gradients_untouched_and_frozen_weights_work(sharp, corrupted):
    m = sharp("llama")
    cfg = PatchingConfig(components=("z", "resid_pre"))
    before = attribution_patching(m, CLEAN, corrupted, config=cfg)
    assert all(p.grad is None for p in m.hf_model.parameters())
    flags = [p.requires_grad for p in m.hf_model.parameters()]
    try:
        for p in m.hf_model.parameters():
            p.requires_grad_(False)
        frozen = attribution_patching(m, CLEAN, corrupted, config=cfg)
    finally:
        for p, f in zip(m.hf_model.parameters(), flags):
            p.requires_grad_(f)
    for c in cfg.components:
        torch.testing.assert_close(frozen.values[c], before.values[c], atol=1e-6, rtol=0)


def test_seeded_and_kl_noising_gives_zero(sharp):
    m = sharp("gpt2")
    cfg = PatchingConfig(components=("z",), samples=2)
    a = attribution_patching(m, CLEAN, None, subject=SUBJECT, config=cfg)
    b = attribution_patching(m, CLEAN, None, subject=SUBJECT, config=cfg)
    c = attribution_patching(m, CLEAN, None, subject=SUBJECT, config=PatchingConfig(components=("z",), samples=2,
                                                                                  seed=5))
    assert torch.equal(a.values["z"], b.values["z"]) and not torch.equal(a.values["z"], c.values["z"])
    # KL(clean || clean) is KL's minimum: its gradient at the clean run is zero, so noising estimates nothing
    kl = attribution_patching(m, CLEAN, None, subject=SUBJECT,
                              config=PatchingConfig(components=("z",), metric="kl", direction="noise", samples=2))
    assert kl.values["z"].abs().max() < 1e-6


def test_layers_and_heads_restrict(sharp, corrupted):
    m = sharp("llama")
    full = attribution_patching(m, CLEAN, corrupted, components=("k", "resid_pre"))
    part = attribution_patching(m, CLEAN, corrupted, config=PatchingConfig(components=("k", "resid_pre"), layers=(1,),
                                                                           heads=(0,)))
    assert part.values["k"][:, 1].isnan().all() and part.values["k"][[0, 2]].isnan().all()
    assert float(part.values["k"][1, 0]) == pytest.approx(float(full.values["k"][1, 0]), abs=1e-6)
    torch.testing.assert_close(part.values["resid_pre"][1], full.values["resid_pre"][1])


# -- hooks ---------------------------------------------------------------------------------------------------------


def test_no_hook_remains_after_a_failure(sharp, corrupted, monkeypatch):
    m = sharp("qwen2")

    def boom(*args, **kwargs):
        raise RuntimeError("backward failed")

    monkeypatch.setattr(attribution_module, "_gradients", boom)
    with pytest.raises(RuntimeError, match="backward failed"):
        attribution_patching(m, CLEAN, corrupted)
    assert live_hooks(m) == []

    def bad_metric(*args, **kwargs):
        def metric(logits):
            raise ValueError("metric failed")
        return metric

    monkeypatch.setattr("mechedit.tracing.patching.make_metric", bad_metric)
    with pytest.raises(ValueError, match="metric failed"):
        attribution_patching(m, CLEAN, corrupted)
    assert live_hooks(m) == []


def test_bad_input(sharp, corrupted):
    m = sharp("llama")
    with pytest.raises(InputError, match="align"):
        attribution_patching(m, CLEAN, "Lo was born in the city of")
    with pytest.raises(InputError, match="one answer token"):
        attribution_patching(m, CLEAN, corrupted, target="Paris London")
    with pytest.raises(mechedit.MecheditError, match="out of range"):
        attribution_patching(m, CLEAN, corrupted, config=PatchingConfig(layers=(3,)))


# -- agreement -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(sharp, corrupted):
    m = sharp("llama")
    cfg = PatchingConfig(components=("z", "mlp_post", "resid_pre"), top_k=5)
    return (attribution_patching(m, CLEAN, corrupted, config=cfg),
            activation_patching(m, CLEAN, corrupted, config=PatchingConfig(components=("z", "mlp_post", "v"),
                                                                           top_k=5)))


def test_agreement_report(pair):
    est, exact = pair
    r = agreement(est, exact)
    assert list(r.components) == ["z", "mlp_post"]  # only components present in both
    z = r.components["z"]
    assert z.n == 12 and z.k == 5 and -1 <= z.spearman <= 1 and 0 <= z.top_k_overlap <= 1
    assert z.spearman == pytest.approx(spearman(est.scores["z"].flatten(), exact.scores["z"].flatten()))
    assert z.max_abs_diff == pytest.approx(float((est.scores["z"] - exact.scores["z"]).abs().max()))
    top_est = {(h.site, h.position) for h in est.top("z", 5)}
    top_exact = {(h.site, h.position) for h in exact.top("z", 5)}
    assert z.top_k_overlap == len(top_est & top_exact) / 5
    assert agreement(est, exact, k=100).components["z"].k == 12  # capped at the entries compared
    df = r.to_frame()
    assert list(df.columns) == ["component", "n", "spearman", "k", "top_k_overlap", "max_abs_diff"]
    assert len(df) == 2
    fig = r.plot()
    assert len(fig.data) == 4  # a diagonal and a scatter per component


def test_agreement_of_exact_with_itself_is_perfect(pair):
    _, exact = pair
    as_estimate = AttributionResult(**exact.__dict__)
    r = agreement(as_estimate, exact)
    for a in r.components.values():
        assert a.spearman == pytest.approx(1.0) and a.top_k_overlap == 1.0 and a.max_abs_diff == 0.0


def test_agreement_rejects_mismatched_results(sharp, pair, corrupted):
    est, exact = pair
    m = sharp("llama")
    other_metric = activation_patching(m, CLEAN, corrupted, config=PatchingConfig(components=("z",), metric="prob"))
    with pytest.raises(InputError, match="different metrics"):
        agreement(est, other_metric)
    noised = activation_patching(m, CLEAN, None, subject=SUBJECT, config=PatchingConfig(components=("z",),
                                                                                      samples=1))
    with pytest.raises(InputError, match="corrupted tokens"):
        agreement(est, noised)
    only_q = activation_patching(m, CLEAN, corrupted, components=("q",))
    with pytest.raises(InputError, match="no component in both"):
        agreement(est, only_q)
    with pytest.raises(InputError, match="AttributionResult"):
        agreement(exact, est)


def test_spearman_with_ties():
    a = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0])
    b = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0])
    # ranks of a with ties averaged: 0, 1.5, 1.5, 3, 4; Pearson with 0..4 = 0.9746794
    assert spearman(a, b) == pytest.approx(0.9746794, abs=1e-6)
    assert spearman(b, -b) == pytest.approx(-1.0)
    assert spearman(torch.ones(4), b[:4]) != spearman(torch.ones(4), b[:4])  # NaN: constant input
    assert spearman(torch.tensor([1.0]), torch.tensor([2.0])) != spearman(a, b)  # NaN for one entry


# -- persistence and figures ---------------------------------------------------------------------------------------


def test_save_load_round_trips(pair, tmp_path):
    est, exact = pair
    back = AttributionResult.load(est.save(tmp_path / "attr.json"))
    assert back.to_json_dict() == est.to_json_dict()
    for c in est.scores:
        assert torch.equal(back.scores[c], est.scores[c])
    report = agreement(est, exact)
    again = AgreementReport.load(report.save(tmp_path / "agree.json"))
    assert again.to_json_dict() == report.to_json_dict()
    assert again.components == report.components
    with pytest.raises(DataFormatError, match="not a AttributionResult|not an AttributionResult"):
        AttributionResult.load(exact.save(tmp_path / "exact.json"))


def test_frame_and_plot(pair):
    est, _ = pair
    df = est.to_frame()
    assert set(df.component) == {"z", "mlp_post", "resid_pre"}
    assert len(df) == sum(v.numel() for v in est.values.values())
    fig = est.plot()
    assert "Attribution patching" in fig.layout.title.text
    assert len(fig.data) == 3
