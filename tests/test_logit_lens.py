"""Logit lens (mechedit.tracing.lens) on tiny random models of each architecture."""

from __future__ import annotations


import plotly.graph_objects as go
import pytest
import torch

import mechedit
from conftest import exploding_mlp
from mechedit.errors import DataFormatError, InputError
from mechedit.model import resolve_module
from mechedit.tracing import LogitLensConfig, LogitLensResult, hooks, live_hooks, logit_lens, prepare_prompt
from mechedit.tracing.common import answer_prob
from mechedit.tracing.lens import decode, lens_sites

ARCHS = ("gpt2", "llama", "qwen2", "gpt_neox")
PROMPT = "Voupeis Draexmir was born in the city of"
SUBJECT = "Voupeis Draexmir"


@pytest.fixture(scope="module")
def llama_lens(models) -> LogitLensResult:
    return logit_lens(models("llama"), PROMPT, subject=SUBJECT)


# -- the lens is the model at the last depth ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_decoding_the_last_residual_gives_the_models_logits_exactly(models, arch):
    m = models(arch)
    x = torch.tensor([m.encode(PROMPT)])
    last: dict[str, torch.Tensor] = {}

    def keep(act, hook):
        last["resid"] = act[0].detach().clone()

    with torch.no_grad(), hooks(m, [(f"blocks.{m.n_layers - 1}.hook_resid_post", keep)]):
        logits = m.bridge(x)[0]  # (T, V)
    assert torch.equal(decode(m, last["resid"]), logits.float().log_softmax(dim=-1))
    with torch.no_grad():
        hf_logits = m.hf_model(x).logits[0]
    torch.testing.assert_close(decode(m, last["resid"]), hf_logits.float().log_softmax(dim=-1), atol=1e-5, rtol=0)
    assert live_hooks(m) == []


@pytest.mark.parametrize("arch", ARCHS)
def test_last_depth_equals_the_models_distribution(models, arch):
    m = models(arch)
    r = logit_lens(m, PROMPT, top_k=7)
    x = torch.tensor([m.encode(PROMPT)])
    with torch.no_grad():
        probs = m.bridge(x)[0].softmax(dim=-1)  # (T, V)
    top = probs.topk(7, dim=-1)
    assert r.top_ids.shape == (m.n_layers + 1, len(r.tokens), 7)
    assert torch.equal(r.top_ids[-1], top.indices)
    torch.testing.assert_close(r.top_probs[-1], top.values, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r.answer_token_prob[-1], probs[:, r.answer_ids[0]], atol=1e-6, rtol=1e-5)
    # the default answer is the model's own top token at the last position
    assert r.answer_ids == [int(top.indices[-1, 0])]
    assert int(r.answer_rank[-1, -1]) == 1
    assert r.sites == lens_sites(m.n_layers)
    assert live_hooks(m) == []


@pytest.mark.parametrize("arch", ARCHS)
def test_every_depth_equals_hf_hidden_states_through_hf_norm_and_head(models, tiny_dir, arch):
    """Independent of the bridge: a fresh, un-bridged HF model's hidden states (the input of each layer) decoded
    with its own final norm and output head."""
    from transformers import AutoModelForCausalLM

    m = models(arch)
    r = logit_lens(m, PROMPT, top_k=3)
    x = torch.tensor([m.encode(PROMPT)])
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir(arch), attn_implementation="eager").eval()
    norm = resolve_module(hf, m.arch.final_norm)
    head = hf.get_output_embeddings()
    with torch.no_grad():
        hidden = hf(x, output_hidden_states=True).hidden_states  # n_layers + 1, each (1, T, d)
        for depth in range(m.n_layers):  # HF's last entry is already normed on some families: skip it
            probs = head(norm(hidden[depth]))[0].softmax(dim=-1)  # (T, V)
            torch.testing.assert_close(r.top_probs[depth], probs.topk(3, dim=-1).values, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(r.answer_token_prob[depth], probs[:, r.answer_ids[0]], atol=1e-6, rtol=1e-4)


def test_multi_token_answer_prob_is_teacher_forced_product(models):
    m = models("qwen2")
    r = logit_lens(m, PROMPT, target="Paris London")
    p = prepare_prompt(m, PROMPT, None, "Paris London")
    assert len(r.answer_ids) == len(p.answer_ids) > 1
    with torch.no_grad():
        logits = m.bridge(torch.tensor([p.input_ids]))
    assert float(r.answer_prob[-1]) == pytest.approx(float(answer_prob(logits, p)[0]), rel=1e-4)
    assert r.answer_prob.shape == (m.n_layers + 1,)
    # the grid covers the prompt's tokens only, and ranks the answer's first token
    assert r.answer_token_prob.shape == (m.n_layers + 1, len(p.ids))
    torch.testing.assert_close(r.answer_token_prob[-1, -1], logits[0, len(p.ids) - 1].softmax(-1)[p.answer_ids[0]])


# -- ranks and probabilities agree -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_ranks_are_consistent_with_probabilities(models, arch):
    m = models(arch)
    k = 4
    r = logit_lens(m, PROMPT, top_k=k, subject=SUBJECT)
    first = r.answer_ids[0]
    assert (r.answer_rank >= 1).all()
    assert (r.top_probs[..., :-1] >= r.top_probs[..., 1:]).all()  # most probable first
    n_depths, n_tokens = r.answer_rank.shape
    for d in range(n_depths):
        for pos in range(n_tokens):
            rank, p_ans = int(r.answer_rank[d, pos]), float(r.answer_token_prob[d, pos])
            assert (rank == 1) == (int(r.top_ids[d, pos, 0]) == first) or float(r.top_probs[d, pos, 0]) == p_ans
            if rank <= k:
                assert float(r.top_probs[d, pos, rank - 1]) == pytest.approx(p_ans, rel=1e-6)
            else:
                assert p_ans <= float(r.top_probs[d, pos, -1])
    # brute force at one cell: rank = 1 + number of tokens strictly more probable
    cache: dict[str, torch.Tensor] = {}

    def keep(act, hook):
        cache["r"] = act[0].detach().clone()

    with torch.no_grad(), hooks(m, [("blocks.1.hook_resid_post", keep)]):
        m.bridge(torch.tensor([m.encode(PROMPT)]))
    probs = decode(m, cache["r"]).exp()  # (T, V)
    for pos in range(n_tokens):
        assert int(r.answer_rank[2, pos]) == 1 + int((probs[pos] > probs[pos, first]).sum())


def test_emergence(llama_lens):
    e = llama_lens.emergence()
    assert e is not None  # the default answer is the top token at the last depth
    assert int(llama_lens.answer_rank[e, -1]) == 1
    assert all(int(llama_lens.answer_rank[d, -1]) > 1 for d in range(e))


# -- hooks, inputs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_no_hook_remains_after_a_call_that_raised(models, arch):
    m = models(arch)
    with exploding_mlp(m), pytest.raises(RuntimeError, match="boom"):
        logit_lens(m, PROMPT, target="Paris")  # a given target: the first forward is the hooked one
    assert live_hooks(m) == []
    logit_lens(m, PROMPT)  # and the model still works


def test_bad_input(models):
    m = models("llama")
    with pytest.raises(InputError, match="empty"):
        logit_lens(m, "   ")
    with pytest.raises(InputError, match="not in the prompt"):
        logit_lens(m, PROMPT, subject="Nobody Atall")
    with pytest.raises(InputError, match="target is empty"):
        logit_lens(m, PROMPT, target="")
    with pytest.raises(InputError, match="top_k"):
        logit_lens(m, PROMPT, top_k=0)
    with pytest.raises(InputError, match="vocabulary"):
        logit_lens(m, PROMPT, top_k=m.d_vocab + 1)
    assert live_hooks(m) == []


# -- the result object -----------------------------------------------------------------------------------------


def test_save_load_round_trip(llama_lens, tmp_path):
    path = llama_lens.save(tmp_path / "lens.json")
    back = LogitLensResult.load(path)
    assert back.to_json_dict() == llama_lens.to_json_dict()
    assert back.top_ids.dtype == torch.int64 and back.answer_rank.dtype == torch.int64
    assert torch.equal(back.top_probs, llama_lens.top_probs)
    assert back.config == llama_lens.config and back.subject_range == llama_lens.subject_range
    (tmp_path / "bad.json").write_text('{"format": "mechedit.causal_trace/1"}')
    with pytest.raises(DataFormatError):
        LogitLensResult.load(tmp_path / "bad.json")


def test_config_round_trips():
    c = LogitLensConfig(top_k=3)
    assert LogitLensConfig.from_dict(c.to_dict()) == c
    with pytest.raises(DataFormatError):
        LogitLensConfig.from_dict({"top_k": 3, "temperature": 2})


def test_to_frame(llama_lens):
    df = llama_lens.to_frame()
    assert list(df.columns) == ["depth", "site", "position", "token", "is_subject", "k", "top_token",
                                "top_token_id", "top_prob", "answer_token_prob", "answer_rank"]
    n_depths, n_tokens, k = llama_lens.top_ids.shape
    assert len(df) == n_depths * n_tokens * k
    start, end = llama_lens.subject_range
    assert df.is_subject.sum() == n_depths * k * (end - start)
    top1 = df[(df.depth == n_depths - 1) & (df.k == 1)]
    assert top1.top_token_id.tolist() == llama_lens.top_ids[-1, :, 0].tolist()
    assert set(df.site) == set(llama_lens.sites)


def test_plot(llama_lens):
    fig = llama_lens.plot()
    assert isinstance(fig, go.Figure) and len(fig.data) == 1
    heat = fig.data[0]
    n_depths, n_tokens = llama_lens.answer_token_prob.shape
    assert len(heat.z) == n_depths and len(heat.z[0]) == n_tokens
    assert heat.text[-1][-1] == repr(llama_lens.top_tokens[-1][-1][0])[1:-1]
    start, _ = llama_lens.subject_range
    assert fig.layout.xaxis.ticktext[start].endswith("*")


def test_result_records_model_and_prompt(models, llama_lens):
    m = models("llama")
    assert llama_lens.model_fingerprint == m.fingerprint()
    assert llama_lens.model_name == m.name
    assert llama_lens.tokens == m.token_strings(m.encode(PROMPT))
    assert llama_lens.config == LogitLensConfig(top_k=5)
    assert llama_lens.top_tokens[0][0] == m.token_strings(llama_lens.top_ids[0, 0].tolist())


# -- a real model ----------------------------------------------------------------------------------------------


@pytest.mark.real
def test_real_model_answer_emerges_late():
    """SmolLM2-135M-Instruct (de-quantised from Q4_1; skipped when not fetched): " Paris" is the model's answer
    (p ≈ 0.70) and the lens finds it only in the last few blocks, as the logit lens typically shows."""
    from mechedit.fetch import is_cached, model_dir

    if not is_cached("smollm2-135m"):
        pytest.skip(f"smollm2-135m is not in the cache ({model_dir('smollm2-135m')}); run "
                    "`mechedit models fetch smollm2-135m` once")
    m = mechedit.load("smollm2-135m")
    r = logit_lens(m, "The Eiffel Tower is located in the city of", subject="The Eiffel Tower")
    assert r.answer == " Paris" and float(r.answer_prob[-1]) == pytest.approx(0.70, abs=0.05)
    assert r.n_depths == m.n_layers + 1
    assert r.emergence() is not None and r.emergence() > m.n_layers // 2
    assert int(r.answer_rank[0, -1]) > 100  # the embeddings know nothing of Paris
    assert live_hooks(m) == []
