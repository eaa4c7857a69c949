"""Attention patterns (mechedit.viz.attention) and `mechedit attention` on a tiny random Llama: the pattern read
through the bridge is a causal attention distribution, no hook remains, bad input is one clear error, and the
page works offline (circuitsvis's JavaScript inlined, nothing from a CDN). The page drawing in a browser is
tested in test_browser.py."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import mechedit
from mechedit.cli import app
from mechedit.errors import InputError, SiteError
from mechedit.tracing.common import live_hooks
from mechedit.viz.attention import attention_page, attention_patterns, read_patterns

PROMPT = "Voupeis Draexmir was born in the city of"


@pytest.fixture(scope="module")
def model_dir(tiny_dir) -> str:
    return str(tiny_dir("llama"))


@pytest.fixture(scope="module")
def model(model_dir) -> mechedit.LoadedModel:
    return mechedit.load(model_dir)


def test_read_patterns_is_a_causal_distribution(model):
    tokens, pattern = read_patterns(model, PROMPT, [0, 2])
    n = len(model.encode(PROMPT))
    assert tokens == model.token_strings(model.encode(PROMPT))
    assert pattern.shape == (2, model.n_heads, n, n)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, model.n_heads, n))
    assert float(pattern.triu(diagonal=1).abs().max()) == 0.0  # no token looks ahead
    _, again = read_patterns(model, PROMPT, [2])
    torch.testing.assert_close(again[0], pattern[1])
    assert live_hooks(model) == []


def test_bad_input(model):
    with pytest.raises(SiteError, match="layer 3 is out of range"):
        read_patterns(model, PROMPT, [3])
    with pytest.raises(InputError, match="empty"):
        attention_patterns(model, " ", 0)
    with pytest.raises(InputError, match="no layers"):
        read_patterns(model, PROMPT, [])
    assert live_hooks(model) == []


def test_page_is_offline(model):
    html = attention_page(attention_patterns(model, PROMPT, 1), "layer <1>")
    assert "CircuitsVis.render" in html and "L1H0" in html and "L1H3" in html
    assert "unpkg.com" not in html and "<script src=" not in html
    assert "<title>layer &lt;1&gt;</title>" in html


def test_cli_writes_the_page(model_dir, tmp_path):
    res = CliRunner().invoke(app, ["attention", "--model", model_dir, "--prompt", PROMPT, "--layer", "0,2",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "layer 0: H0" in res.stdout and "layer 2: H0" in res.stdout
    html = (tmp_path / "attention.html").read_text()
    assert "L0H3" in html and "L2H0" in html and "L1H0" not in html


@pytest.mark.parametrize("layer, needle", [("5", "layer 5 is out of range"), ("one", "comma-separated layer")])
def test_cli_bad_layer(model_dir, tmp_path, layer, needle):
    res = CliRunner().invoke(app, ["attention", "--model", model_dir, "--prompt", PROMPT, "--layer", layer,
                                   "--out", str(tmp_path)])
    assert res.exit_code == 2, res.output
    assert needle in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "attention.html").exists()
