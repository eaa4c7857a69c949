"""The real SmolLM2-135M-Instruct checkpoint (de-quantised from Q4_1), fetched by `mechedit models fetch
smollm2-135m`. Skipped when it is not in the cache. The model is loaded once for the module (~5 s)."""

from __future__ import annotations

import json

import pytest
import torch

from mechedit.fetch import SOURCE_FILE, is_cached, model_dir

pytestmark = pytest.mark.real

NAME = "smollm2-135m"
PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def smol():
    if not is_cached(NAME):
        pytest.skip(f"{NAME} is not in the cache ({model_dir(NAME)}); run `mechedit models fetch {NAME}` once")
    import mechedit

    return mechedit.load(NAME)


def test_architecture_facts(smol):
    assert smol.architecture == "llama"
    assert (smol.n_layers, smol.n_heads, smol.n_kv_heads) == (30, 9, 3)
    assert (smol.d_model, smol.d_head, smol.d_mlp, smol.d_vocab) == (576, 64, 1536, 49152)
    assert smol.tied_embeddings


def test_provenance_is_recorded(smol):
    source = json.loads((smol.path / SOURCE_FILE).read_text())
    assert source["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(source["gguf_sha256"]) == 64
    assert "de-quantised from Q4_1" in source["note"]


def test_greedy_knows_paris(smol):
    ids = torch.tensor([smol.encode(PROMPT)])
    with torch.no_grad():
        logits = smol.hf_model(ids).logits[0, -1]  # (d_vocab,)
    assert smol.tokenizer.decode([int(logits.argmax())]) == " Paris"


def test_bridge_matches_hf(smol):
    ids = torch.tensor([smol.encode("Danielle Darrieux's mother tongue is")])
    with torch.no_grad():
        hf = smol.hf_model(ids).logits  # (1, T, d_vocab)
        bridged = smol.bridge(ids)  # (1, T, d_vocab)
    assert bridged.shape == hf.shape
    assert (bridged - hf).abs().max().item() < 1e-3


def test_cli_info_json(smol):
    from typer.testing import CliRunner

    from mechedit.cli import app

    result = CliRunner().invoke(app, ["info", "--model", NAME, "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["path"] == str(model_dir(NAME))
    assert (facts["architecture"], facts["n_layers"], facts["n_heads"], facts["d_model"]) == ("llama", 30, 9, 576)


def test_causal_trace_of_one_fact(smol):
    """ROME's causal trace runs on the real model: clean > corrupted, and restoring the last token's hidden
    state at the last layer recovers the clean probability."""
    from mechedit.tracing import CausalTraceConfig, causal_trace

    cfg = CausalTraceConfig(samples=3, kinds=("hidden", "mlp"), window=10, batch_size=128)
    r = causal_trace(smol, PROMPT, "The Eiffel Tower", " Paris", cfg)
    assert r.answer == " Paris" and r.high_score > 0.5
    assert r.low_score < r.high_score / 2
    assert r.scores["hidden"].shape == (30, len(r.tokens))
    assert abs(float(r.scores["hidden"][-1, -1]) - r.high_score) < 1e-4
    layer, pos, _ = r.peak("mlp")
    assert 0 <= layer < 30 and 0 <= pos < len(r.tokens)
