"""Activation patching (mechedit.tracing.patching) on tiny random models of each architecture.

As in test_causal_trace, the ``sharp`` fixture multiplies the final norm's weight by 20 so that the random
models' next-token distributions are peaked and patches move the metrics by far more than the tolerances.
"""

from __future__ import annotations

import math

import pytest
import torch

import mechedit
from mechedit.errors import DataFormatError, InputError, SiteError
from mechedit.sites import Site
from mechedit.tracing import PatchingConfig, PatchingResult, activation_patching, live_hooks
from mechedit.tracing import patching as patching_module
from mechedit.tracing.patching import COMPONENTS, Hit

ARCHS = ("gpt2", "llama", "qwen2", "gpt_neox")
TEMPLATE = "{} was born in the city of"
SUBJECT = "Voupeis Draexmir"
CLEAN = TEMPLATE.format(SUBJECT)
ALL = tuple(COMPONENTS)
SEQUENTIAL_ONLY = {"resid_mid"}  # GPT-NeoX runs attention and MLP in parallel: no residual stream between


def components_for(arch: str) -> tuple[str, ...]:
    return tuple(c for c in ALL if not (arch == "gpt_neox" and c in SEQUENTIAL_ONLY))


def other_subject(m, same_length: bool) -> str:
    """A prompt about another of the world's subjects, with the same number of tokens as CLEAN (or not)."""
    n = len(m.encode(CLEAN))
    for subject in mechedit.World.generate(0).subjects:
        prompt = TEMPLATE.format(subject)
        if subject != SUBJECT and (len(m.encode(prompt)) == n) == same_length:
            return prompt
    raise AssertionError("no suitable subject in the world")  # pragma: no cover


@pytest.fixture(scope="module")
def corrupted(sharp) -> str:
    """The corrupted prompt: another subject whose prompt has as many tokens (all tiny models share the toy
    tokenizer, so one choice serves every architecture)."""
    return other_subject(sharp("llama"), same_length=True)


@pytest.fixture(scope="module")
def llama_result(sharp, corrupted) -> PatchingResult:
    return activation_patching(sharp("llama"), CLEAN, corrupted, config=PatchingConfig(components=ALL, batch_size=50))


# -- against transformer_lens.patching on the same bridge ----------------------------------------------------------

# our component -> (transformer_lens.patching function, how its axes map onto ours)
TL_FUNCTIONS = {
    "resid_pre": ("get_act_patch_resid_pre", None),
    "attn_out": ("get_act_patch_attn_out", None),
    "mlp_out": ("get_act_patch_mlp_out", None),
    "z": ("get_act_patch_attn_head_out_all_pos", None),
    "q": ("get_act_patch_attn_head_q_all_pos", None),
    "k": ("get_act_patch_attn_head_k_all_pos", None),
    "v": ("get_act_patch_attn_head_v_all_pos", None),
    "pattern": ("get_act_patch_attn_head_pattern_all_pos", None),
    "pattern_by_pos": ("get_act_patch_attn_head_pattern_by_pos", None),  # (layer, head, dest_pos) both
    "z_by_pos": ("get_act_patch_attn_head_out_by_pos", (0, 2, 1)),  # TL: (layer, pos, head)
    "q_by_pos": ("get_act_patch_attn_head_q_by_pos", (0, 2, 1)),
    "k_by_pos": ("get_act_patch_attn_head_k_by_pos", (0, 2, 1)),
    "v_by_pos": ("get_act_patch_attn_head_v_by_pos", (0, 2, 1)),
}


def tl_patch(m, result: PatchingResult, component: str, direction: str) -> torch.Tensor:
    """What transformer_lens.patching gives for ``component`` on the same bridge and metric (raw logit diff)."""
    import transformer_lens.patching as tlp

    name, perm = TL_FUNCTIONS[component]
    clean = torch.tensor([m.encode(CLEAN)])
    corrupted = torch.tensor([m.encode(result.corrupted_prompt)])
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    answer, foil = result.answer_ids[0], result.foil_id

    def metric(logits):
        return logits[0, -1, answer] - logits[0, -1, foil]

    with torch.no_grad():
        _, cache = m.bridge.run_with_cache(source)
        out = getattr(tlp, name)(m.bridge, base, cache, metric)
    return out.permute(*perm) if perm else out


@pytest.mark.parametrize("arch", ARCHS)
def test_equals_transformer_lens_patching(sharp, arch, corrupted):
    m = sharp(arch)
    comps = ("resid_pre", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern")
    if arch in ("llama", "gpt2"):  # by-position head sweeps: GQA and a fused-qkv model (the slow part of TL)
        comps += ("z_by_pos", "k_by_pos", "pattern_by_pos")
    r = activation_patching(m, CLEAN, corrupted, config=PatchingConfig(components=comps, batch_size=40))
    for c in comps:
        ours, theirs = r.values[c], tl_patch(m, r, c, "denoise")
        assert ours.shape == theirs.shape, c
        torch.testing.assert_close(ours, theirs.float().cpu(), atol=2e-4, rtol=0, msg=c)
    spread = max(float(v.max() - v.min()) for v in r.values.values())
    assert spread > 0.1  # the comparison means something
    assert live_hooks(m) == []


def test_noising_equals_transformer_lens_with_roles_swapped(sharp, corrupted):
    m = sharp("llama")
    comps = ("resid_pre", "mlp_out", "z", "v")
    r = activation_patching(m, CLEAN, corrupted, config=PatchingConfig(components=comps, direction="noise"))
    for c in comps:
        torch.testing.assert_close(r.values[c], tl_patch(m, r, c, "noise").float(), atol=2e-4, rtol=0, msg=c)


def test_gqa_shapes(sharp, llama_result):
    m = sharp("llama")
    assert (m.n_heads, m.n_kv_heads) == (4, 2)
    n_tokens = len(llama_result.tokens)
    shapes = {c: tuple(s.shape) for c, s in llama_result.scores.items()}
    assert shapes["resid_pre"] == (3, n_tokens)
    assert shapes["z"] == shapes["q"] == shapes["pattern"] == (3, 4)
    assert shapes["k"] == shapes["v"] == (3, 2)  # key/value heads
    assert shapes["k_by_pos"] == (3, 2, n_tokens) and shapes["z_by_pos"] == (3, 4, n_tokens)
    assert shapes["mlp_pre"] == shapes["mlp_post"] == (3, m.d_mlp)


# -- invariants ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("metric", ["logit_diff", "prob", "kl"])
def test_clean_into_clean_gives_the_clean_metric(sharp, arch, metric, corrupted):
    m = sharp(arch)
    for direction in ("denoise", "noise"):
        cfg = PatchingConfig(components=components_for(arch), metric=metric, direction=direction, batch_size=100)
        r = activation_patching(m, CLEAN, CLEAN, config=cfg)
        assert r.corrupted_metric == pytest.approx(r.clean_metric, abs=1e-5)
        for c, v in r.values.items():
            torch.testing.assert_close(v, torch.full_like(v, r.clean_metric), atol=1e-4, rtol=0, msg=c)
            assert r.scores[c].isnan().all()  # 0/0: clean and corrupted score the same
    assert live_hooks(m) == []


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("metric", ["logit_diff", "prob", "kl"])
def test_normalised_one_at_clean_zero_at_corrupted(sharp, arch, metric, corrupted):
    """The final residual stream at the last token decides the next token: patching it gives exactly the
    source run's metric, 1 when denoising and 0 when noising. Positions before the first differing token carry
    identical activations: patching them changes nothing."""
    m = sharp(arch)
    comps = ("resid_pre", "resid_post") + (() if arch == "gpt_neox" else ("resid_mid",))
    for direction, expected in (("denoise", 1.0), ("noise", 0.0)):
        r = activation_patching(m, CLEAN, corrupted, config=PatchingConfig(components=comps, metric=metric,
                                                                           direction=direction))
        assert abs(r.clean_metric - r.corrupted_metric) > 1e-3
        assert float(r.scores["resid_post"][-1, -1]) == pytest.approx(expected, abs=1e-4)
        if "resid_mid" in comps:  # the residual stream between attention and MLP, carried past the MLP
            assert float(r.scores["resid_mid"][-1, -1]) == pytest.approx(expected, abs=1e-4)
        first = r.differing[0]
        assert first > 0
        torch.testing.assert_close(r.scores["resid_pre"][:, :first], torch.full((m.n_layers, first), 1 - expected),
                                   atol=1e-4, rtol=0)


def test_resid_mid_is_the_residual_stream_not_only_the_mlp_input(sharp, corrupted):
    """On a TransformerBridge blocks.L.hook_resid_mid is ln2.hook_in; a hook there alone changes the MLP's
    input but not the residual stream past the MLP. mechedit's resid_mid patch carries the change through."""
    m = sharp("gpt2")
    last = m.n_layers - 1
    r = activation_patching(m, CLEAN, corrupted, components=("resid_mid",))
    tl_style = tl_resid_mid_last(m, r, last)
    assert float(r.scores["resid_mid"][last, -1]) == pytest.approx(1.0, abs=1e-4)
    assert abs(tl_style - r.clean_metric) > 1e-2  # the hook alone does not restore the clean run


def tl_resid_mid_last(m, r: PatchingResult, layer: int) -> float:
    from mechedit.tracing import hooks

    name = f"blocks.{layer}.hook_resid_mid"
    with torch.no_grad():
        _, cache = m.bridge.run_with_cache(torch.tensor([m.encode(CLEAN)]))

    def put(act, hook):
        act = act.clone()
        act[:, -1] = cache[name][:, -1]
        return act

    with torch.no_grad(), hooks(m, [(name, put)]):
        logits = m.bridge(torch.tensor([m.encode(r.corrupted_prompt)]))
    return float(logits[0, -1, r.answer_ids[0]] - logits[0, -1, r.foil_id])


def test_batch_size_does_not_change_the_result(sharp, llama_result, corrupted):
    again = activation_patching(sharp("llama"), CLEAN, corrupted, config=PatchingConfig(components=ALL, batch_size=7))
    for c in ALL:
        torch.testing.assert_close(again.values[c], llama_result.values[c], atol=1e-5, rtol=0, msg=c)


def test_layers_and_heads_restrict_what_is_patched(sharp, llama_result, corrupted):
    r = activation_patching(sharp("llama"), CLEAN, corrupted,
                            config=PatchingConfig(components=("resid_pre", "z", "v"), layers=(0, 2), heads=(1,)))
    assert r.values["resid_pre"][1].isnan().all() and not r.values["resid_pre"][[0, 2]].isnan().any()
    assert r.values["z"][:, [0, 2, 3]].isnan().all()
    torch.testing.assert_close(r.values["z"][[0, 2], 1], llama_result.values["z"][[0, 2], 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(r.values["resid_pre"][2], llama_result.values["resid_pre"][2], atol=1e-5, rtol=0)
    assert len(r.to_frame()) == 2 * len(r.tokens) + 2 + 2  # NaN entries are not rows


# -- corruption by noise, seeds ------------------------------------------------------------------------------------


def test_noise_corruption_is_seeded(sharp):
    m = sharp("llama")
    cfg = PatchingConfig(components=("resid_pre", "z"), samples=3, batch_size=16)
    a = activation_patching(m, CLEAN, None, subject=SUBJECT, config=cfg)
    b = activation_patching(m, CLEAN, None, subject=SUBJECT, config=cfg)
    c = activation_patching(m, CLEAN, None, subject=SUBJECT, config=PatchingConfig(components=("resid_pre", "z"),
                                                                                 samples=3, seed=1))
    for k in a.values:
        assert torch.equal(a.values[k], b.values[k])
    assert a.corrupted_metric == b.corrupted_metric != c.corrupted_metric
    assert not torch.equal(a.values["z"], c.values["z"])
    assert a.noise_scale > 0 and a.corrupted_prompt is None
    start, end = a.subject_range
    assert a.differing == list(range(start, end)) and a.corrupted_tokens == a.tokens
    # positions outside the subject are identical in both runs at the embeddings
    assert a.scores["resid_pre"][0, :start].abs().max() < 1e-5
    assert a.scores["resid_pre"][0, end:].abs().max() < 1e-5
    # restoring the whole final state at the last token undoes any corruption, for every sample
    r = activation_patching(m, CLEAN, None, subject=SUBJECT, config=PatchingConfig(components=("resid_post",),
                                                                                 samples=3))
    assert float(r.scores["resid_post"][-1, -1]) == pytest.approx(1.0, abs=1e-4)


def test_noising_with_noise_corruption(sharp):
    m = sharp("gpt2")
    r = activation_patching(m, CLEAN, None, subject=SUBJECT,
                            config=PatchingConfig(components=("resid_post", "mlp_post"), direction="noise", samples=2))
    assert float(r.scores["resid_post"][-1, -1]) == pytest.approx(0.0, abs=1e-4)
    assert r.top("mlp_post", 3)[0].score <= r.top("mlp_post", 3)[-1].score  # noising: lowest score matters most


# -- answers and metrics -------------------------------------------------------------------------------------------


def test_logit_diff_uses_the_corrupted_top_token_as_default_foil(sharp, corrupted):
    m = sharp("llama")
    r = activation_patching(m, CLEAN, corrupted, components=("z",))
    with torch.no_grad():
        clean = m.hf_model(torch.tensor([m.encode(CLEAN)])).logits[0, -1]
        corrupted_logits = m.hf_model(torch.tensor([m.encode(corrupted)])).logits[0, -1]
    answer = int(clean.argmax())
    corrupted_logits[answer] = -float("inf")
    assert r.answer_ids == [answer] and r.foil_id == int(corrupted_logits.argmax())
    assert r.clean_metric == pytest.approx(float(clean[answer] - clean[r.foil_id]), abs=1e-4)
    chosen = activation_patching(m, CLEAN, corrupted, foil="Paris", components=("z",))
    assert chosen.foil_id == m.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]


def test_multi_token_answers(sharp, corrupted):
    m = sharp("llama")
    with pytest.raises(InputError, match="one answer token") as e:
        activation_patching(m, CLEAN, corrupted, target="Paris London")
    assert "metric='prob'" in str(e.value)
    r = activation_patching(m, CLEAN, corrupted, target="Paris London", config=PatchingConfig(
        components=("resid_post",), metric="prob"))
    assert len(r.answer_ids) == 2 and len(r.tokens) == len(m.encode(CLEAN)) + 1  # teacher forcing
    assert float(r.scores["resid_post"][-1, -1]) != pytest.approx(1.0, abs=1e-3)  # one position is not enough
    with pytest.raises(InputError, match="one-token foil"):
        activation_patching(m, CLEAN, corrupted, foil="Paris London")
    with pytest.raises(InputError, match="only used by metric='logit_diff'"):
        activation_patching(m, CLEAN, corrupted, foil="Paris", config=PatchingConfig(metric="prob"))


# -- hooks ---------------------------------------------------------------------------------------------------------


def test_no_hook_remains_after_a_hook_raises(sharp, monkeypatch, corrupted):
    m = sharp("llama")

    def exploding(*args, **kwargs):
        def fn(act, hook):
            raise RuntimeError("boom inside a hook")
        return fn

    monkeypatch.setattr(patching_module, "_copy_slice", exploding)
    with pytest.raises(RuntimeError, match="boom"):
        activation_patching(m, CLEAN, corrupted, components=("resid_mid",))
    assert live_hooks(m) == []


def test_no_hook_remains_after_progress_raises_and_progress_counts(sharp, corrupted):
    m = sharp("llama")
    calls = []

    def bad(done, total):
        calls.append((done, total))
        if done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        activation_patching(m, CLEAN, None, subject=SUBJECT, config=PatchingConfig(samples=2, batch_size=5),
                            progress=bad)
    assert live_hooks(m) == []
    assert calls[1][0] == 5
    seen = []
    r = activation_patching(m, CLEAN, corrupted, components=("z", "resid_pre"), config=PatchingConfig(batch_size=9),
                            progress=lambda d, t: seen.append((d, t)))
    total = m.n_layers * (m.n_heads + len(r.tokens))
    assert seen[0] == (0, total) and seen[-1] == (total, total) and len(seen) == 1 + -(-total // 9)


# -- bad input -----------------------------------------------------------------------------------------------------


def test_prompts_of_different_lengths(sharp):
    m = sharp("llama")
    longer = other_subject(m, same_length=False)
    with pytest.raises(InputError, match="align token for token") as e:
        activation_patching(m, CLEAN, longer)
    assert f"{len(m.encode(CLEAN))} tokens" in str(e.value) and str(len(m.encode(longer))) in str(e.value)
    assert repr(m.token_strings(m.encode(longer))[1]) in str(e.value)  # the message shows both tokenizations
    assert "corrupted_prompt=None" in str(e.value)


def test_layer_and_head_out_of_range(sharp, corrupted):
    m = sharp("llama")
    with pytest.raises(SiteError, match="layer 7 is out of range"):
        activation_patching(m, CLEAN, corrupted, config=PatchingConfig(layers=(7,)))
    with pytest.raises(SiteError, match="head 9 is out of range"):
        activation_patching(m, CLEAN, corrupted, config=PatchingConfig(components=("z",), heads=(9,)))
    with pytest.raises(SiteError, match="2 key/value heads"):
        activation_patching(m, CLEAN, corrupted, config=PatchingConfig(components=("v",), heads=(3,)))
    assert live_hooks(m) == []


def test_missing_site_subject_and_components(sharp, corrupted):
    with pytest.raises(InputError, match="no hook 'blocks.0.hook_resid_mid'.*parallel"):
        activation_patching(sharp("gpt_neox"), CLEAN, corrupted, components=("resid_mid",))
    m = sharp("llama")
    with pytest.raises(InputError, match="subject="):
        activation_patching(m, CLEAN, None)
    with pytest.raises(InputError, match="not in the prompt"):
        activation_patching(m, CLEAN, None, subject="Lodum")
    with pytest.raises(InputError, match="components must be"):
        activation_patching(m, CLEAN, corrupted, components=("attn_heads",))
    with pytest.raises(InputError, match="PatchingConfig"):
        activation_patching(m, CLEAN, corrupted, config={"metric": "prob"})


@pytest.mark.parametrize("bad", [dict(direction="both"), dict(metric="loss"), dict(batch_size=0), dict(top_k=0),
                                 dict(samples=0), dict(noise=-1.0), dict(components=()), dict(layers=()),
                                 dict(components=("z", "z")), dict(heads=("a",))])
def test_config_rejects_bad_values(bad):
    with pytest.raises(InputError):
        PatchingConfig(**bad)


def test_config_round_trips():
    cfg = PatchingConfig(components=["z", "mlp_post"], direction="noise", metric="kl", batch_size=3, top_k=4,
                         layers=[1], heads=[0, 2], samples=2, noise=0.5, seed=3)
    assert cfg.components == ("z", "mlp_post") and cfg.layers == (1,)
    assert PatchingConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(DataFormatError, match="unknown"):
        PatchingConfig.from_dict({"metrc": "kl"})


# -- the result object ---------------------------------------------------------------------------------------------


def test_top_score_and_sites(llama_result, sharp):
    r = llama_result
    hits = r.top("z_by_pos", 5)
    assert len(hits) == 5 and all(isinstance(h, Hit) for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    best = hits[0]
    assert best.score == pytest.approx(float(r.scores["z_by_pos"].max()))
    assert r.score(best.site, best.position) == best.score
    assert r.score(str(best.site), best.position) == best.score
    site, score, pos = r.top("z", 1)[0]
    assert site.component == "z" and site.head is not None and pos is None
    assert r.score(site) == score == float(r.scores["z"][site.layer, site.head])
    neuron = r.top("mlp_post")[0]
    assert len(r.top("mlp_post")) == r.config.top_k and neuron.site.neuron is not None
    assert r.score(f"blocks.{neuron.site.layer}.mlp.hook_post[neuron={neuron.site.neuron}]") == neuron.score
    assert r.score("blocks.1.hook_resid_pre", 3) == float(r.scores["resid_pre"][1, 3])
    with pytest.raises(SiteError, match="head 4 is out of range"):
        r.score(Site(1, "z", head=4))
    with pytest.raises(SiteError, match="2 key/value heads"):
        r.score(Site(1, "k", head=2))
    with pytest.raises(InputError, match="needs a position"):
        r.score("blocks.1.hook_resid_pre")
    with pytest.raises(InputError, match="no component"):
        llama_result.top("heads")


def test_to_frame(llama_result):
    df = llama_result.to_frame()
    assert list(df.columns) == ["component", "site", "layer", "head", "position", "neuron", "token", "score", "value"]
    assert len(df) == sum(v.numel() for v in llama_result.values.values())
    z = df[df.component == "z_by_pos"]
    row = z.iloc[5]
    layer, head, pos = int(row["layer"]), int(row["head"]), int(row["position"])
    assert row.score == pytest.approx(float(llama_result.scores["z_by_pos"][layer, head, pos]))
    assert row.site == f"blocks.{layer}.attn.hook_z[head={head}]"
    assert row.token == llama_result.tokens[pos]
    assert df[df.component == "mlp_post"].position.isna().all()


def test_save_load_round_trip(sharp, tmp_path, corrupted):
    r = activation_patching(sharp("llama"), CLEAN, corrupted,
                            config=PatchingConfig(components=("resid_pre", "k_by_pos", "mlp_pre"), layers=(1,)))
    path = r.save(tmp_path / "patching.json")
    text = path.read_text()
    assert "NaN" not in text  # strict JSON: unpatched entries are null
    back = PatchingResult.load(path)
    assert back.to_json_dict() == r.to_json_dict()
    for c in r.scores:
        torch.testing.assert_close(back.scores[c], r.scores[c], equal_nan=True, atol=0, rtol=0)
    assert back.config == r.config and back.subject_range is None and back.differing == r.differing
    (tmp_path / "other.json").write_text('{"format": "mechedit.causal_trace/1"}')
    with pytest.raises(DataFormatError, match="not a PatchingResult"):
        PatchingResult.load(tmp_path / "other.json")


def test_plot(llama_result):
    fig = llama_result.plot()
    assert len(fig.data) == len(llama_result.scores)
    kinds = {t.name: t.type for t in fig.data}
    assert kinds["resid_pre"] == "heatmap" and kinds["mlp_post"] == "bar" and kinds["z"] == "heatmap"
    first = next(t for t in fig.data if t.name == "resid_pre")
    assert len(first.z) == len(llama_result.tokens)  # rows = positions
    zbp = next(t for t in fig.data if t.name == "z_by_pos")
    assert len(zbp.x) == 3 * 4  # (layer, head) columns
    assert any(label.endswith("*") for label in fig.layout.yaxis.ticktext)  # differing tokens marked


def test_result_records_model_and_config(sharp, llama_result, corrupted):
    m = sharp("llama")
    r = llama_result
    assert r.model_fingerprint == m.fingerprint() and r.model_name == m.name
    assert r.model_shape == {"n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "d_mlp": m.d_mlp}
    assert r.tokens == m.token_strings(m.encode(CLEAN)) and r.corrupted_tokens == m.token_strings(m.encode(corrupted))
    assert r.subject is None and r.subject_range is None and r.corrupted_prompt == corrupted
    assert r.config.components == ALL and math.isfinite(r.clean_metric)


def test_noise_corruption_equals_transformer_lens_under_the_same_noise(sharp):
    """Under noise every forward carries its own sample's corrupted reference row (all samples in the first
    forward): per-sample transformer_lens patching under a hook adding that sample's noise, averaged, agrees.
    A small batch size makes several forwards per sample."""
    import transformer_lens.patching as tlp

    from mechedit.tracing.causal import EMBED_HOOK, _add_noise
    from mechedit.tracing.common import draw_noise, hooks

    m = sharp("llama")
    comps = ("resid_pre", "z")
    r = activation_patching(m, CLEAN, None, subject=SUBJECT, config=PatchingConfig(
        components=comps, samples=3, batch_size=5, seed=4))
    start, end = r.subject_range
    noise = draw_noise(3, end - start, m.d_model, r.noise_scale, 4)  # what the tracer drew
    clean = torch.tensor([m.encode(CLEAN)])
    answer, foil = r.answer_ids[0], r.foil_id

    def metric(logits):
        return logits[0, -1, answer] - logits[0, -1, foil]

    with torch.no_grad():
        _, cache = m.bridge.run_with_cache(clean)
        for c in comps:
            per_sample = []
            for s in range(3):
                with hooks(m, [(EMBED_HOOK, _add_noise(noise[s: s + 1], start, end))]):
                    name, perm = TL_FUNCTIONS[c]
                    out = getattr(tlp, name)(m.bridge, clean, cache, metric)
                per_sample.append(out.permute(*perm) if perm else out)
            theirs = torch.stack(per_sample).mean(0).float()
            torch.testing.assert_close(r.values[c], theirs, atol=2e-4, rtol=0, msg=c)
    assert float(r.values["z"].max() - r.values["z"].min()) > 0.1  # the comparison means something
    assert live_hooks(m) == []
