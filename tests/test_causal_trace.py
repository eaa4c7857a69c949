"""Causal tracing with noise (mechedit.tracing.causal) on tiny random models of each architecture.

Random tiny models predict almost uniformly (p ≈ 1/vocab), so every score would agree with every other within
any absolute tolerance. The ``sharp`` fixture multiplies the final norm's weight by 20, which makes the
next-token distribution peaked and the scores differ from cell to cell by far more than the tolerances below.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import mechedit
from mechedit.errors import DataFormatError, InputError
from mechedit.model import resolve_module
from mechedit.tracing import (
    CausalTraceConfig, CausalTraceResult, causal_trace, causal_trace_reference, find_subject_range, hooks,
    live_hooks, noise_scale, prepare_prompt, scaled_window, trace_restore_set, window_layers,
)
from mechedit.tracing.causal import resolve_noise

# the package re-exports the function causal_trace under the submodule's name; fetch the module itself
ct_module = importlib.import_module("mechedit.tracing.causal")

ARCHS = ("gpt2", "llama", "qwen2", "gpt_neox")
PROMPT = "Voupeis Draexmir was born in the city of"
SUBJECT = "Voupeis Draexmir"
# small and fast; window 2 on 3 layers makes the three window centres restore different layer sets, and a
# batch of 7 rows makes chunks straddle cells and samples
FAST = CausalTraceConfig(samples=2, window=2, batch_size=7)


@pytest.fixture(scope="module")
def llama_trace(sharp) -> CausalTraceResult:
    return causal_trace(sharp("llama"), PROMPT, SUBJECT, config=FAST)


# -- batched == reference -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_equals_reference(sharp, arch):
    m = sharp(arch)
    fast = causal_trace(m, PROMPT, SUBJECT, config=FAST)
    ref = causal_trace_reference(m, PROMPT, SUBJECT, config=FAST)
    assert set(fast.scores) == {"hidden", "mlp", "attn"}
    assert fast.high_score == pytest.approx(ref.high_score, abs=1e-6)
    assert fast.low_score == pytest.approx(ref.low_score, abs=1e-5)
    for kind in fast.scores:
        assert fast.scores[kind].shape == (m.n_layers, len(fast.tokens))
        torch.testing.assert_close(fast.scores[kind], ref.scores[kind], atol=1e-5, rtol=0)
    # the comparison means something: restorations move the score by much more than the tolerance
    spread = max(float(s.max() - s.min()) for s in fast.scores.values())
    assert spread > 1e-3
    assert live_hooks(m) == []


@pytest.mark.parametrize("arch", ARCHS)
def test_wide_window_batched_equals_reference(sharp, arch):
    """A window wider than the model: centres 1 and 2 restore the same layers (run once), and centre 0's
    layers are a prefix of centre 1's (their rows share layers 0-1, then branch)."""
    m = sharp(arch)
    cfg = CausalTraceConfig(samples=2, window=4, batch_size=11)
    assert [list(window_layers(c, 4, m.n_layers)) for c in range(3)] == [[0, 1], [0, 1, 2], [0, 1, 2]]
    fast = causal_trace(m, PROMPT, SUBJECT, config=cfg)
    ref = causal_trace_reference(m, PROMPT, SUBJECT, config=cfg)
    assert fast.low_score == pytest.approx(ref.low_score, abs=1e-5)
    for kind in fast.scores:
        torch.testing.assert_close(fast.scores[kind], ref.scores[kind], atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.scores["mlp"][1], fast.scores["mlp"][2], atol=0, rtol=0)
    assert live_hooks(m) == []


def test_multi_token_answer_batched_equals_reference(sharp):
    m = sharp("llama")
    fast = causal_trace(m, PROMPT, SUBJECT, target="Paris London", config=FAST)
    ref = causal_trace_reference(m, PROMPT, SUBJECT, target="Paris London", config=FAST)
    for kind in fast.scores:
        torch.testing.assert_close(fast.scores[kind], ref.scores[kind], atol=1e-12, rtol=1e-4)


# -- restoring -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("target", [None, "Paris London"])
def test_restoring_every_hidden_state_recovers_clean(sharp, arch, target):
    m = sharp(arch)
    p = prepare_prompt(m, PROMPT, SUBJECT, target)
    everything = [(f"blocks.{layer}.hook_resid_post", pos)
                  for layer in range(m.n_layers) for pos in range(len(p.input_ids))]
    cfg = CausalTraceConfig(samples=3)
    restored = trace_restore_set(m, PROMPT, SUBJECT, everything, target=target, config=cfg)
    nothing = trace_restore_set(m, PROMPT, SUBJECT, [], target=target, config=cfg)
    r = causal_trace(m, PROMPT, SUBJECT, target=target, config=CausalTraceConfig(samples=3, kinds=("hidden",)))
    assert restored == pytest.approx(r.high_score, rel=1e-5, abs=1e-9)
    assert nothing == pytest.approx(r.low_score, rel=1e-5, abs=1e-9)
    assert abs(r.high_score - r.low_score) > 10 * 1e-5 * r.high_score  # the corruption did something


def test_restore_set_matches_grid_cell(sharp, llama_trace):
    m = sharp("llama")
    pos = llama_trace.subject_range[1] - 1  # last subject token
    single = trace_restore_set(m, PROMPT, SUBJECT, [("blocks.1.hook_resid_post", pos)], config=FAST)
    assert single == pytest.approx(float(llama_trace.scores["hidden"][1, pos]), abs=1e-6)
    # a window centred on layer 2 (window 2) restores layers 1 and 2
    window = [(f"blocks.{layer}.hook_mlp_out", pos) for layer in window_layers(2, 2, m.n_layers)]
    assert trace_restore_set(m, PROMPT, SUBJECT, window, config=FAST) == pytest.approx(
        float(llama_trace.scores["mlp"][2, pos]), abs=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_restoring_resid_mid_restores_the_residual_stream_not_only_the_mlp_input(sharp, arch):
    """``blocks.L.hook_resid_mid`` names the residual stream between attention and MLP. On the bridge that hook
    is the MLP norm's input: a value put back there alone reaches the MLP but not the residual stream that
    bypasses it. Restored as a state, it is the whole residual stream at that position; the MLP acts position by
    position, so that is the same as restoring ``resid_post`` of the layer there."""
    m = sharp(arch)
    last = m.n_layers - 1
    for layer, pos in ((1, 3), (last, -1), (0, -1)):
        mid = trace_restore_set(m, PROMPT, SUBJECT, [(f"blocks.{layer}.hook_resid_mid", pos)], config=FAST)
        post = trace_restore_set(m, PROMPT, SUBJECT, [(f"blocks.{layer}.hook_resid_post", pos)], config=FAST)
        assert mid == pytest.approx(post, abs=1e-6)
    # the bridge's hook alone (one plain forward per noise sample) does not restore the clean run
    p, _, noise = ct_module._setup(m, PROMPT, SUBJECT, None, FAST)
    hook = f"blocks.{last}.hook_resid_mid"
    _, clean = ct_module.clean_run(m, p, [hook])
    hook_alone = sum(ct_module.reference_cell(m, p, n, clean, [(hook, len(p.input_ids) - 1)]) for n in noise)
    high = ct_module.clean_run(m, p, [])[0]
    assert trace_restore_set(m, PROMPT, SUBJECT, [(hook, -1)], config=FAST) == pytest.approx(high, abs=1e-6)
    assert abs(hook_alone / len(noise) - high) > 1e-3
    assert live_hooks(m) == []


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_after_a_layer_is_the_residual_before_the_next(sharp, arch):
    """Restoring ``blocks.1.hook_resid_pre`` (where the batched run swaps in the noised residual stream, so the
    restoration must follow the swap) equals restoring the same state as ``blocks.0.hook_resid_post``."""
    m = sharp(arch)
    for pos in (0, 3, -1):
        pre = trace_restore_set(m, PROMPT, SUBJECT, [("blocks.1.hook_resid_pre", pos)], config=FAST)
        post = trace_restore_set(m, PROMPT, SUBJECT, [("blocks.0.hook_resid_post", pos)], config=FAST)
        assert pre == pytest.approx(post, abs=1e-6)
    assert live_hooks(m) == []


def test_restore_set_heads_neurons_and_bad_sites(sharp):
    m = sharp("llama")
    s = trace_restore_set(m, PROMPT, SUBJECT, [("blocks.0.attn.hook_z[head=1]", -1),
                                               ("blocks.1.mlp.hook_post[neuron=3]", 3), ("hook_embed", 2)],
                          config=FAST)
    assert 0.0 <= s <= 1.0
    # restoring the clean embeddings of the subject undoes the corruption exactly
    p = prepare_prompt(m, PROMPT, SUBJECT)
    clean_embeds = [("hook_embed", pos) for pos in range(*p.subject_range)]
    r = causal_trace(m, PROMPT, SUBJECT, config=CausalTraceConfig(samples=2, kinds=("hidden",)))
    assert trace_restore_set(m, PROMPT, SUBJECT, clean_embeds, config=FAST) == pytest.approx(r.high_score, rel=1e-5)
    with pytest.raises(InputError, match="out of range"):
        trace_restore_set(m, PROMPT, SUBJECT, [("blocks.0.hook_resid_post", 99)], config=FAST)
    with pytest.raises(InputError, match="pattern"):
        trace_restore_set(m, PROMPT, SUBJECT, [("blocks.0.attn.hook_pattern", 0)], config=FAST)
    with pytest.raises(mechedit.MecheditError, match="out of range"):
        trace_restore_set(m, PROMPT, SUBJECT, [("blocks.7.hook_mlp_out", 0)], config=FAST)
    assert live_hooks(m) == []


def test_window_layers_is_romes_formula():
    def rome(center, window, num_layers):  # experiments/causal_trace.py, trace_important_window
        return list(range(max(0, center - window // 2), min(num_layers, center - (-window // 2))))

    for n in (1, 3, 12, 30):
        for w in (1, 2, 3, 10, 11):
            for c in range(n):
                assert list(window_layers(c, w, n)) == rome(c, w, n)
    assert list(window_layers(0, 10, 30)) == [0, 1, 2, 3, 4]  # clipped at the bottom
    assert list(window_layers(29, 10, 30)) == list(range(24, 30))  # and at the top
    assert list(window_layers(15, 10, 30)) == list(range(10, 20))


def test_scaled_window_keeps_romes_proportion():
    """A fifth of the layers (ROME: 10 of GPT-2 XL's 48), at least 1, as locate's default: on the embedded
    model's 8 layers a window of 10 would restore every layer for centres 3 to 5."""
    from mechedit.locating import LocateConfig

    assert [scaled_window(n) for n in (1, 3, 8, 12, 28, 30, 48)] == [1, 1, 2, 2, 6, 6, 10]
    assert all(scaled_window(n) == LocateConfig().window_for(n) for n in range(1, 100))
    assert [len(window_layers(c, 10, 8)) for c in range(8)] == [5, 6, 7, 8, 8, 8, 7, 6]
    assert [len(window_layers(c, scaled_window(8), 8)) for c in range(8)] == [1, 2, 2, 2, 2, 2, 2, 2]


def test_window_one_restores_a_single_sublayer(sharp):
    m = sharp("llama")
    r = causal_trace(m, PROMPT, SUBJECT, config=CausalTraceConfig(samples=2, window=1, kinds=("mlp",)))
    pos = r.subject_range[1] - 1
    one = trace_restore_set(m, PROMPT, SUBJECT, [("blocks.0.hook_mlp_out", pos)], config=FAST)
    assert float(r.scores["mlp"][0, pos]) == pytest.approx(one, abs=1e-6)


# -- seeds, noise --------------------------------------------------------------------------------------------------


def test_same_seed_same_result_different_seed_different(sharp, llama_trace):
    m = sharp("llama")
    again = causal_trace(m, PROMPT, SUBJECT, config=FAST)
    other = causal_trace(m, PROMPT, SUBJECT, config=CausalTraceConfig(samples=2, window=2, batch_size=7, seed=1))
    for kind in llama_trace.scores:
        assert torch.equal(again.scores[kind], llama_trace.scores[kind])
    assert again.low_score == llama_trace.low_score
    assert not torch.equal(other.scores["hidden"], llama_trace.scores["hidden"])
    assert other.low_score != llama_trace.low_score


def test_batch_size_does_not_change_the_result(sharp, llama_trace):
    big = causal_trace(sharp("llama"), PROMPT, SUBJECT,
                       config=CausalTraceConfig(samples=2, window=2, batch_size=1000))
    for kind in big.scores:
        torch.testing.assert_close(big.scores[kind], llama_trace.scores[kind], atol=1e-6, rtol=0)


def test_noise_scale_and_default(sharp, tmp_path, monkeypatch):
    m = sharp("llama")
    emb = resolve_module(m.hf_model, m.arch.embed)
    ids = m.tokenizer(SUBJECT, add_special_tokens=False)["input_ids"]
    expected = 3 * float(emb.weight.detach()[ids].std())
    assert noise_scale(m, [SUBJECT]) == pytest.approx(expected, rel=1e-5)
    assert noise_scale(m, [SUBJECT], multiplier=1.5) == pytest.approx(expected / 2, rel=1e-5)
    # default: the prompt's own subject; with a world.json beside the model: the world's subjects
    assert resolve_noise(m, CausalTraceConfig(), SUBJECT) == pytest.approx(expected, rel=1e-5)
    assert resolve_noise(m, CausalTraceConfig(noise=0.25), SUBJECT) == 0.25
    world = mechedit.World.generate(0)
    world.save(tmp_path / "world.json")
    monkeypatch.setattr(m, "path", tmp_path)
    assert resolve_noise(m, CausalTraceConfig(), SUBJECT) == pytest.approx(noise_scale(m, list(world.subjects)))
    r = causal_trace(m, PROMPT, SUBJECT, config=CausalTraceConfig(samples=1, kinds=("hidden",)))
    assert r.noise_scale == pytest.approx(noise_scale(m, list(world.subjects)))


def test_explicit_noise_is_used(sharp):
    m = sharp("llama")
    small = causal_trace(m, PROMPT, SUBJECT, config=CausalTraceConfig(samples=2, noise=1e-6, kinds=("hidden",)))
    assert small.noise_scale == 1e-6
    assert small.low_score == pytest.approx(small.high_score, rel=1e-3)  # barely corrupted


# -- answers -------------------------------------------------------------------------------------------------------


def test_multi_token_answer_is_product_of_teacher_forced_probs(sharp):
    m = sharp("llama")
    r = causal_trace(m, PROMPT, SUBJECT, target="Paris London", config=CausalTraceConfig(samples=1, kinds=("hidden",)))
    assert r.answer_ids == m.tokenizer(" Paris London", add_special_tokens=False)["input_ids"]
    assert len(r.answer_ids) == 2
    prompt_ids = m.encode(PROMPT)
    with torch.no_grad():
        logits = m.hf_model(torch.tensor([prompt_ids + r.answer_ids[:-1]])).logits[0]  # (T, V)
    probs = logits.softmax(-1)
    n = len(prompt_ids)
    expected = float(probs[n - 1, r.answer_ids[0]] * probs[n, r.answer_ids[1]])
    assert r.high_score == pytest.approx(expected, rel=1e-4)
    assert r.scores["hidden"].shape[1] == len(prompt_ids)  # the grid covers the prompt's tokens


def test_default_target_is_greedy_and_leading_space_rule(sharp):
    m = sharp("llama")
    ids = m.encode(PROMPT)
    with torch.no_grad():
        top = int(m.hf_model(torch.tensor([ids])).logits[0, -1].argmax())
    p = prepare_prompt(m, PROMPT, SUBJECT)
    assert p.answer_ids == (top,)
    spaced = m.tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    assert list(prepare_prompt(m, PROMPT, SUBJECT, "Paris").answer_ids) == spaced
    assert list(prepare_prompt(m, PROMPT, SUBJECT, " Paris").answer_ids) == spaced
    bare = m.tokenizer("Paris", add_special_tokens=False)["input_ids"]
    assert list(prepare_prompt(m, PROMPT + " ", SUBJECT, "Paris").answer_ids) == bare


def test_subject_range():
    tokens = ["<|bos|>", "V", "ou", "peis", " Draex", "mir", " was", " born"]
    assert find_subject_range(tokens, "Voupeis Draexmir") == (1, 6)
    assert find_subject_range(tokens, "Draexmir") == (4, 6)  # partial tokens count as the subject's
    assert find_subject_range(tokens, "peis Dr") == (3, 5)
    # the last occurrence is the one traced
    assert find_subject_range(["<s>", " Ann", " met", " Ann"], "Ann") == (3, 4)


# -- hooks ---------------------------------------------------------------------------------------------------------


def test_no_hook_remains_after_a_hook_raises(sharp, monkeypatch):
    m = sharp("llama")

    def exploding_restore(clean, entries):
        def fn(act, hook):
            raise RuntimeError("boom inside a hook")
        return fn

    monkeypatch.setattr(ct_module, "_restore", exploding_restore)
    with pytest.raises(RuntimeError, match="boom inside a hook"):
        causal_trace(m, PROMPT, SUBJECT, config=FAST)
    assert live_hooks(m) == []


def test_no_hook_remains_after_progress_raises(sharp):
    m = sharp("llama")
    calls = []

    def bad_progress(done, total):
        calls.append((done, total))
        if done > 0:
            raise KeyboardInterrupt  # what a user's Ctrl-C during a progress bar looks like

    with pytest.raises(KeyboardInterrupt):
        causal_trace(m, PROMPT, SUBJECT, config=FAST, progress=bad_progress)
    assert calls == [(0, calls[0][1]), (7, calls[0][1])]
    assert live_hooks(m) == []


def test_hooks_context_removes_on_exception(sharp):
    m = sharp("gpt2")

    def nothing(act, hook):
        return None

    with pytest.raises(ValueError):
        with hooks(m, [("blocks.0.hook_mlp_out", nothing), ("hook_embed", nothing)]):
            assert len(live_hooks(m)) == 2
            raise ValueError
    assert live_hooks(m) == []
    with pytest.raises(InputError, match="no hook"):
        with hooks(m, [("blocks.0.hook_nonsense", nothing)]):
            pass
    assert live_hooks(m) == []


def test_progress_counts_rows(sharp):
    m = sharp("llama")
    calls = []
    r = causal_trace(m, PROMPT, SUBJECT, config=FAST, progress=lambda d, t: calls.append((d, t)))
    total = FAST.samples * (1 + 3 * m.n_layers * len(r.tokens))
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert len(calls) == 1 + -(-total // FAST.batch_size)


def test_progress_counts_distinct_rows(sharp):
    """Equal cells run once: with window 4 on 3 layers, mlp and attn centres 1 and 2 are one cell each."""
    m = sharp("llama")
    calls = []
    cfg = CausalTraceConfig(samples=2, window=4, batch_size=16)
    r = causal_trace(m, PROMPT, SUBJECT, config=cfg, progress=lambda d, t: calls.append((d, t)))
    n_tokens = len(r.tokens)
    total = cfg.samples * (1 + 3 * m.n_layers * n_tokens - 2 * n_tokens)
    assert calls[0] == (0, total) and calls[-1] == (total, total)


def test_patches_met_shares_prefixes():
    def cell(*layers):
        return tuple(ct_module.Patch(f"blocks.{layer}.hook_mlp_out", 2) for layer in layers)

    cells = [cell(0, 1), cell(0, 1, 2), cell(1, 2), ()]
    layer_of = {p: p.layer for c in cells for p in c}
    met, prefixes = ct_module.patches_met(cells, layer_of, 3)
    assert met[0][:2] == met[1][:2]  # equal up to layer 1
    assert met[0][2] == met[0][1] != met[1][2]  # cell 0 has nothing at layer 2; cell 1 branches there
    assert met[2][0] == met[3][0] == met[3][2]  # nothing restored yet: the noised run's history
    assert prefixes[met[1][2]] == cells[1] and prefixes[met[2][1]] == cell(1)
    rows = [(0, 0), (1, 0), (0, 1), (1, 1)]  # (cell, sample)
    assert len(ct_module.histories(rows, met, 1)) == 2  # one per sample
    assert ct_module.histories(rows, met, 2) == [(s, met[c][2]) for c, s in rows]


# -- bad input -----------------------------------------------------------------------------------------------------


def test_subject_not_in_prompt_shows_tokens(sharp):
    m = sharp("llama")
    with pytest.raises(InputError, match="not in the prompt") as e:
        causal_trace(m, PROMPT, "Kexpir Cheldrel", config=FAST)
    assert "' born'" in str(e.value) and "' city'" in str(e.value)  # the message lists the prompt's tokens
    with pytest.raises(InputError, match="subject is empty"):
        causal_trace(m, PROMPT, " ", config=FAST)


def test_empty_and_too_long_prompts(sharp):
    m = sharp("llama")
    with pytest.raises(InputError, match="empty"):
        causal_trace(m, "", SUBJECT, config=FAST)
    long_prompt = SUBJECT + " was born in" * 40
    with pytest.raises(InputError, match="context"):
        causal_trace(m, long_prompt, SUBJECT, config=FAST)
    with pytest.raises(InputError, match="target is empty"):
        causal_trace(m, PROMPT, SUBJECT, target="", config=FAST)


@pytest.mark.parametrize("bad", [dict(noise=0.0), dict(noise=-1.0), dict(samples=0), dict(window=0),
                                 dict(kinds=("mlp", "resid")), dict(kinds=()), dict(batch_size=0)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(InputError):
        CausalTraceConfig(**bad)


def test_config_round_trips():
    cfg = CausalTraceConfig(samples=3, noise=0.5, window=4, kinds=("mlp", "hidden"), seed=7, batch_size=32)
    assert CausalTraceConfig.from_dict(cfg.to_dict()) == cfg
    assert CausalTraceConfig.from_dict({"kinds": ["attn"]}).kinds == ("attn",)
    with pytest.raises(DataFormatError, match="unknown"):
        CausalTraceConfig.from_dict({"smaples": 3})


# -- the result object ---------------------------------------------------------------------------------------------


def test_save_load_round_trip(llama_trace, tmp_path):
    path = tmp_path / "trace.json"
    llama_trace.save(path)
    back = CausalTraceResult.load(path)
    assert back.to_json_dict() == llama_trace.to_json_dict()
    for kind, s in llama_trace.scores.items():
        assert torch.equal(back.scores[kind], s)
    assert back.config == llama_trace.config
    assert back.subject_range == llama_trace.subject_range
    d = llama_trace.to_json_dict()
    assert d["subject_range"] == list(llama_trace.subject_range)
    assert d["scores"]["mlp"][2][3] == float(llama_trace.scores["mlp"][2, 3])  # [layer][position]
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(DataFormatError):
        CausalTraceResult.load(tmp_path / "bad.json")


def test_to_frame_and_peak(llama_trace):
    df = llama_trace.to_frame()
    assert list(df.columns) == ["kind", "layer", "position", "token", "is_subject", "score", "indirect_effect"]
    n_layers, n_tokens = llama_trace.scores["hidden"].shape
    assert len(df) == 3 * n_layers * n_tokens
    start, end = llama_trace.subject_range
    assert df.loc[df.kind == "hidden", "is_subject"].sum() == n_layers * (end - start)
    assert (df.indirect_effect - (df.score - llama_trace.low_score)).abs().max() < 1e-12
    layer, pos, score = llama_trace.peak("attn")
    assert score == float(llama_trace.scores["attn"].max())
    assert float(llama_trace.scores["attn"][layer, pos]) == score
    with pytest.raises(InputError):
        llama_trace.peak("neurons")


def test_plot(llama_trace):
    fig = llama_trace.plot()
    assert len(fig.data) == 3
    assert [t.name for t in fig.data] == ["hidden", "mlp", "attn"]
    heat = fig.data[0]
    assert heat.zmin == pytest.approx(llama_trace.low_score)
    start, _ = llama_trace.subject_range
    assert fig.layout.yaxis.ticktext[start].endswith("*")
    one = CausalTraceResult(**{**llama_trace.__dict__, "scores": {"mlp": llama_trace.scores["mlp"]}})
    assert len(one.plot().data) == 1


def test_result_records_model_and_config(sharp, llama_trace):
    m = sharp("llama")
    assert llama_trace.model_fingerprint == m.fingerprint()
    assert llama_trace.config == FAST
    assert llama_trace.tokens == m.token_strings(m.encode(PROMPT))
    assert "".join(llama_trace.tokens[slice(*llama_trace.subject_range)]).strip() == SUBJECT
