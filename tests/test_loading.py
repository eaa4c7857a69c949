"""Loading: every supported architecture through one handle; architecture facts; clear errors."""

import json

import pytest
import torch

import mechedit
from mechedit.errors import InputError, ModelLoadError, SiteError
from mechedit.model import canonical_param_name
from conftest import TINY_ARCHS

EXPECTED = {  # architecture -> (mlp_out module class, conv1d, kv heads)
    "gpt2": ("Conv1D", True, 4),
    "llama": ("Linear", False, 2),
    "qwen2": ("Linear", False, 2),
    "gpt_neox": ("Linear", False, 4),
}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_load_each_architecture(tiny_dir, arch):
    m = mechedit.load(tiny_dir(arch))
    cls, conv1d, kv = EXPECTED[arch]
    assert m.architecture == arch
    assert (m.n_layers, m.n_heads, m.n_kv_heads, m.d_model) == (3, 4, kv, 32)
    assert m.d_head == 8 and m.conv1d is conv1d
    assert type(m.module(1, "mlp_out")).__name__ == cls
    assert type(m.module(0, "attn_out")).__name__ == cls
    # bridge and HF model share weights and agree
    ids = torch.tensor([m.encode("The river is near the bridge.")])
    with torch.no_grad():
        assert torch.allclose(m.bridge(ids), m.hf_model(ids).logits, atol=1e-4)
    info = m.info()
    assert info["path"] == str(tiny_dir(arch)) and info["architecture"] == arch
    assert info["modules_layer0"]["mlp_out"] == m.module_name(0, "mlp_out")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_in_place_edit_is_seen_by_bridge(tiny_dir, arch):
    m = mechedit.load(tiny_dir(arch))
    ids = torch.tensor([m.encode("Hello there")])
    fp = m.fingerprint()
    with torch.no_grad():
        before = m.bridge(ids).clone()
        w = m.module(1, "mlp_out").weight
        saved = w.clone()
        w.add_(0.5)
        after = m.bridge(ids)
        assert not torch.allclose(before, after)
        assert torch.allclose(after, m.hf_model(ids).logits, atol=1e-4)
        assert m.fingerprint() != fp
        w.copy_(saved)
    assert m.fingerprint() == fp


def test_parameter_names_are_canonical():
    assert canonical_param_name("model.layers.0._original_component.mlp._original_component.down_proj."
                                "_original_component.weight") == "model.layers.0.mlp.down_proj.weight"


def test_site_validation_through_model(tiny_dir):
    m = mechedit.load(tiny_dir("qwen2"))
    assert m.site("blocks.2.attn.hook_z[head=3]").head == 3
    with pytest.raises(SiteError, match="layer 3 is out of range"):
        m.site("blocks.3.hook_mlp_out")
    with pytest.raises(SiteError, match="2 key/value heads"):
        m.site("blocks.0.attn.hook_v[head=2]")


def test_bad_module_requests(tiny_dir):
    m = mechedit.load(tiny_dir("gpt2"))
    with pytest.raises(InputError, match="no module kind 'attn_q'"):
        m.module(0, "attn_q")  # GPT-2 fuses q/k/v
    with pytest.raises(InputError, match="out of range"):
        m.module(7, "mlp_out")


def test_encode_rejects_empty_and_too_long(tiny_dir):
    m = mechedit.load(tiny_dir("llama"))
    with pytest.raises(InputError, match="empty"):
        m.encode("   ")
    with pytest.raises(InputError, match="context"):
        m.encode("word " * 200)


@pytest.mark.parametrize("arg,msg", [
    ("/no/such/dir", "no model directory"),
    ("no-such-org/no-such-model", "HuggingFace hub"),
])
def test_load_errors(arg, msg, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: patch it too
    with pytest.raises(ModelLoadError, match=msg):
        mechedit.load(arg)


def test_load_dir_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="not an HF model directory"):
        mechedit.load(tmp_path)


def test_unsupported_architecture(tmp_path, tokenizer_dir):
    import transformers as tf

    cfg = tf.BloomConfig(vocab_size=100, hidden_size=16, n_layer=1, n_head=2)
    tf.BloomForCausalLM(cfg).save_pretrained(tmp_path)
    tf.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not supported"):
        mechedit.load(tmp_path)


def test_info_cli_json(tiny_dir):
    from typer.testing import CliRunner

    from mechedit.cli import app

    res = CliRunner().invoke(app, ["info", "--model", str(tiny_dir("llama")), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert {"path", "architecture", "n_layers", "n_heads", "d_model"} <= set(d)
    assert d["n_layers"] == 3


def test_cli_bad_model_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from mechedit.cli import app

    res = CliRunner().invoke(app, ["info", "--model", str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert "error: no model directory" in res.output
    assert "Traceback" not in res.output


def test_import_does_nothing():
    import subprocess
    import sys

    code = ("import sys, logging; import mechedit; "
            "assert 'torch' not in sys.modules, 'import mechedit imported torch'; "
            "assert not logging.getLogger().handlers")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_modules_import_first():
    """Modules on both sides of the editing <-> evaluation imports load in a fresh interpreter with nothing
    imported before them (a circular import once broke ``import mechedit.evaluation.stats`` on its own)."""
    import subprocess
    import sys

    names = ["mechedit.evaluation.stats", "mechedit.evaluation.counterfact", "mechedit.evaluation.evaluator",
             "mechedit.editing.training", "mechedit.editing.sweep", "mechedit.editing.methods",
             "mechedit.editing.rome.layer_choice", "mechedit.tracing.summary"]
    bad = [n for n in names if subprocess.run([sys.executable, "-c", f"import {n}"], capture_output=True).returncode]
    assert bad == [], f"these modules fail to import first: {bad}"


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_architecture_table_paths_resolve(tiny_dir, arch):
    """Every module the table names exists in the loaded (bridged) model."""
    from mechedit.model import resolve_module

    m = mechedit.load(tiny_dir(arch))
    for path in (m.arch.embed, m.arch.final_norm, m.arch.unembed):
        assert isinstance(resolve_module(m.hf_model, path), torch.nn.Module), path
    for layer in range(m.n_layers):
        for kind, rel in m.arch.modules().items():
            if rel is not None:
                assert hasattr(m.module(layer, kind), "weight"), (layer, kind)


def test_top_level_names_are_the_functions():
    """`mechedit.locate`, `mechedit.answers`, `mechedit.rome`, `mechedit.causal_trace` are callables even after
    every submodule has been imported (a submodule named like its function would shadow it)."""
    import importlib
    import pkgutil

    import mechedit

    for info in pkgutil.walk_packages(mechedit.__path__, "mechedit."):
        if ".cli" not in info.name and not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for name in ("load", "locate", "answers", "rome", "causal_trace", "read_counterfact"):
        assert callable(getattr(mechedit, name)) and not isinstance(getattr(mechedit, name), type(mechedit)), name


def test_fingerprint_is_cached_until_a_weight_changes(tiny_dir, monkeypatch):
    import hashlib

    m = mechedit.load(tiny_dir("llama"))
    fp = m.fingerprint()
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    assert m.fingerprint() == fp and not calls  # cached: no re-hash
    with torch.no_grad():
        m.module(0, "mlp_out").weight.add_(1.0)
    assert m.fingerprint() != fp and calls  # an in-place edit invalidates it


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_a_cached_forward_keeps_its_keys_and_values_through_the_bridge(tiny_dir, arch):
    """ROME's and MEMIT's value optimisations and generation reuse a KV cache through the bridged model. With
    transformers 5.24+ and transformer-lens 4.3.0 the cache stays empty (the argument was renamed): this fails
    there, so an incompatible install is caught here, not by edits that quietly do not take."""
    from mechedit.model import prefix_cache

    m = mechedit.load(tiny_dir(arch))
    ids = torch.tensor([m.encode("The Eiffel Tower is located in the city of")])
    with torch.no_grad():
        whole = m.hf_model(input_ids=ids, use_cache=False).logits[0, 3:]
        cache = prefix_cache(m.hf_model, ids[:, :3])
        assert cache.get_seq_length() == 3
        rest = m.hf_model(input_ids=ids[:, 3:], past_key_values=cache, use_cache=True).logits[0]
    torch.testing.assert_close(rest, whole, atol=1e-4, rtol=1e-4)
    m.check_kv_cache()


def test_a_cache_that_stays_empty_is_one_clear_error():
    from transformers import DynamicCache

    from mechedit.errors import MecheditError
    from mechedit.model import prefix_cache

    with pytest.raises(MecheditError, match=r"transformers>=5.9,<5.24.*Nothing was changed"):
        prefix_cache(lambda **kw: {"cache": DynamicCache()}, torch.zeros(1, 4, dtype=torch.long))
