"""Shared fixtures: tiny random-weight models of each architecture (built here, nothing downloaded), the
embedded model, and the shared data directory."""

from __future__ import annotations

import importlib.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("MECHEDIT_TEST_THREADS", "1")))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_ARCHS = ("gpt2", "llama", "qwen2", "gpt_neox")
ANALYSES = Path(__file__).resolve().parents[1] / "analyses"


@pytest.fixture(scope="session")
def analysis_script():
    """``load(name)``: the script ``analyses/NAME.py`` as a module, loaded once per session (the studies are
    scripts, not a package; registered in ``sys.modules`` because dataclasses look their module up there)."""
    loaded: dict[str, object] = {}

    def load(name: str):
        if name not in loaded:
            spec = importlib.util.spec_from_file_location(f"analysis_{name}", ANALYSES / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
            loaded[name] = mod
        return loaded[name]

    yield load
    for name in loaded:
        sys.modules.pop(f"analysis_{name}", None)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A directory holding the embedded model's tokenizer (byte-level BPE, BOS-prepending)."""
    from mechedit.model import embedded_model_dir

    d = embedded_model_dir()
    if (d / "tokenizer.json").exists():
        return d
    from mechedit.toy.tokenizer import build_tokenizer
    from mechedit.toy.world import World

    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(World.generate(0)).save_pretrained(out)
    return out


def make_tiny(arch: str, vocab_size: int, seed: int = 0, n_layers: int = 3):
    """A tiny random-weight HF causal LM of ``arch`` (GQA on Llama and Qwen2: 4 query heads, 2 KV heads)."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=n_layers, n_head=4, n_positions=64,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=1)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch in ("llama", "qwen2"):
        cls_cfg, cls = ((tf.LlamaConfig, tf.LlamaForCausalLM) if arch == "llama"
                        else (tf.Qwen2Config, tf.Qwen2ForCausalLM))
        cfg = cls_cfg(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = cls(cfg)
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=n_layers, num_attention_heads=4, max_position_embeddings=64)
        model = tf.GPTNeoXForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer_dir):
    """``tiny_dir(arch)`` -> a saved HF directory with a tiny random model of ``arch`` and the toy tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            d = tmp_path_factory.mktemp(f"tiny-{arch}")
            make_tiny(arch, len(tok)).save_pretrained(d)
            tok.save_pretrained(d)
            made[arch] = d
        return made[arch]

    return make


@pytest.fixture(scope="session")
def embedded():
    """The embedded world model, loaded once per test session (treat as read-only, or restore what you edit)."""
    import mechedit

    return mechedit.load()


def load_sharp(path):
    """Load a tiny random model with its final norm scaled by 20, so that it predicts something definite
    (a random tiny model is near-uniform over the vocabulary, and every score would tie)."""
    import mechedit
    from mechedit.model import resolve_module

    m = mechedit.load(path)
    norm = resolve_module(m.hf_model, m.arch.final_norm)
    with torch.no_grad():
        norm.weight.mul_(20)
        if getattr(norm, "bias", None) is not None:
            norm.bias.mul_(20)
    return m


@pytest.fixture(scope="module")
def sharp(tiny_dir):
    """``sharp(arch)`` -> a sharpened tiny model of ``arch`` (see :func:`load_sharp`), loaded once per module."""
    loaded: dict = {}

    def get(arch: str):
        if arch not in loaded:
            loaded[arch] = load_sharp(tiny_dir(arch))
        return loaded[arch]

    return get


@pytest.fixture(scope="module")
def models(tiny_dir):
    """``models(arch)`` -> a tiny model of ``arch`` as built (not sharpened), loaded once per module."""
    import mechedit

    loaded: dict = {}

    def get(arch: str):
        if arch not in loaded:
            loaded[arch] = mechedit.load(tiny_dir(arch))
        return loaded[arch]

    return get


@contextmanager
def exploding_mlp(m, after: int = 0):
    """A plain torch forward hook (not a TransformerLens hook) on the last MLP that raises mid-forward, on call
    ``after + 1`` (the first call by default)."""
    calls = []

    def boom(module, args, output):
        calls.append(1)
        if len(calls) > after:
            raise RuntimeError("boom inside the forward")

    handle = m.module(m.n_layers - 1, "mlp_out").register_forward_hook(boom)
    try:
        yield
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def stats_cache(tmp_path_factory):
    """Key statistics go to a temporary cache, never to the user's (module-wide: ``pytestmark =
    pytest.mark.usefixtures("stats_cache")``)."""
    old = os.environ.get("MECHEDIT_CACHE")
    path = tmp_path_factory.mktemp("cache")
    os.environ["MECHEDIT_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MECHEDIT_CACHE", None)
    else:
        os.environ["MECHEDIT_CACHE"] = old


def snapshot(m) -> dict[str, torch.Tensor]:
    """A copy of every parameter under its HF name (bridge wrappers left out of the names)."""
    from mechedit.model import canonical_param_name

    return {canonical_param_name(n): p.detach().clone() for n, p in m.hf_model.named_parameters()}


def same_weights(m, snap) -> bool:
    """Every parameter of ``m`` bit-identical to ``snap`` (from :func:`snapshot`)."""
    from mechedit.model import canonical_param_name

    return all(torch.equal(snap[canonical_param_name(n)], p) for n, p in m.hf_model.named_parameters())
