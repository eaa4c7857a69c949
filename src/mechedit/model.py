"""Loading a model: one handle with the HF model, its tokenizer, a TransformerBridge over the same weights, and
the architecture facts as data.

>>> import mechedit
>>> m = mechedit.load()                       # the embedded world model, offline
>>> m.n_layers, m.architecture
(8, 'llama')
>>> m.module(3, "mlp_out")                    # ROME's rewrite module, found through the architecture table
Linear(in_features=512, out_features=128, bias=False)

``model`` may be nothing (the embedded default), a local HF directory, ``smollm2-135m`` (after
``mechedit models fetch smollm2-135m``), or a hub name (needs a reachable hub).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mechedit.arch import ARCHITECTURES, ArchSpec
from mechedit.errors import InputError, MecheditError, ModelLoadError
from mechedit.hub import KNOWN_MODELS, cache_dir
from mechedit.sites import Site, as_site

EMBEDDED_NAMES = ("embedded", "toy", "default")


def embedded_model_dir() -> Path:
    """Directory of the shipped embedded world model (an ordinary HF checkpoint)."""
    return Path(__file__).parent / "assets" / "toy-llama"


@dataclass(eq=False)
class LoadedModel:
    """A loaded causal LM. ``hf_model`` and ``bridge`` share one set of weights: an in-place weight edit is seen
    by both at once."""

    name: str  # what the user asked for
    path: Path | None  # checkpoint directory on disk (None for a hub name served from the hub cache)
    hf_model: torch.nn.Module
    tokenizer: object
    bridge: object  # transformer_lens.model_bridge.TransformerBridge
    arch: ArchSpec
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    tied_embeddings: bool
    _fingerprint_cache: tuple | None = field(default=None, repr=False, compare=False)
    _kv_cache_checked: bool = field(default=False, repr=False, compare=False)

    # -- facts ----------------------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return self.arch.model_type

    @property
    def conv1d(self) -> bool:
        return self.arch.conv1d

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    def info(self) -> dict:
        """The handle's facts as plain data (what ``mechedit info --json`` prints)."""
        layer0 = {kind: self.arch.layer_path(0, p) for kind, p in self.arch.modules().items() if p}
        return {
            "name": self.name, "path": str(self.path) if self.path else None, "architecture": self.architecture,
            "n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "d_model": self.d_model, "d_head": self.d_head, "d_mlp": self.d_mlp, "d_vocab": self.d_vocab,
            "n_ctx": self.n_ctx, "conv1d": self.conv1d, "tied_embeddings": self.tied_embeddings,
            "n_params": sum(p.numel() for p in self.hf_model.parameters()),
            "modules_layer0": layer0, "fingerprint": self.fingerprint(),
        }

    # -- modules through the architecture table -----------------------------------------------------------
    def module(self, layer: int, kind: str) -> torch.nn.Module:
        """The HF module of ``kind`` (``mlp_out``, ``attn_out``, ``attn_q`` ..., see ``ArchSpec.modules``) in
        ``layer``, unwrapped from the bridge's wrappers so its ``.weight`` is the real parameter."""
        paths = self.arch.modules()
        if kind not in paths or paths[kind] is None:
            have = [k for k, p in paths.items() if p]
            raise InputError(f"{self.architecture} has no module kind {kind!r}; it has {', '.join(have)}")
        if not 0 <= layer < self.n_layers:
            raise InputError(f"layer {layer} is out of range; the model has layers 0..{self.n_layers - 1}")
        return resolve_module(self.hf_model, self.arch.layer_path(layer, paths[kind]))

    def module_name(self, layer: int, kind: str) -> str:
        """HF module name (as in an un-bridged model's ``named_modules``) of ``kind`` in ``layer``."""
        self.module(layer, kind)  # validates
        return self.arch.layer_path(layer, self.arch.modules()[kind])

    def site(self, site: Site | str) -> Site:
        """Parse and validate a site against this model."""
        return as_site(site).validate(self)

    # -- tokens ---------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` exactly as the model reads a prompt (BOS included when the tokenizer adds one)."""
        if not isinstance(text, str) or not text.strip():
            raise InputError("the prompt is empty")
        ids = self.tokenizer(text)["input_ids"]
        if len(ids) > self.n_ctx:
            raise InputError(f"the prompt is {len(ids)} tokens long; the model's context is {self.n_ctx}")
        return ids

    def token_strings(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]

    def check_kv_cache(self) -> None:
        """Raise :class:`MecheditError` unless a cached forward through this model keeps its keys and values
        (see :func:`prefix_cache`); checked once per model, on two tokens. Generation calls it first."""
        if not self._kv_cache_checked:
            ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)  # any two tokens
            with torch.no_grad():
                prefix_cache(self.hf_model, ids)
            self._kv_cache_checked = True

    def fingerprint(self) -> str:
        """A short hash of every weight as they are now: identifies "the same model" for saved edits and cached
        statistics. Cached against the tensors' in-place version counters, so it follows in-place edits and
        costs one pass over the weights only when something changed. (Writes through ``param.data`` bypass
        the counters; mechedit edits never use it.)"""
        state = self.hf_model.state_dict(keep_vars=True)  # the parameters themselves: stable ids and versions
        versions = tuple((id(t), t._version) for t in state.values())
        if self._fingerprint_cache is not None and self._fingerprint_cache[0] == versions:
            return self._fingerprint_cache[1]
        h = hashlib.sha256()
        for name, p in sorted(state.items()):
            h.update(canonical_param_name(name).encode())
            h.update(p.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
        digest = h.hexdigest()[:16]
        self._fingerprint_cache = (versions, digest)
        return digest


def prefix_cache(forward, input_ids: torch.Tensor, **kwargs):
    """``forward(input_ids=..., use_cache=True, **kwargs)`` (an HF model or its base model) and the KV cache it
    returns, checked to hold every one of ``input_ids``' (B, P) positions.

    ROME's and MEMIT's value optimisations run the tokens before the lookup token once and reuse their keys and
    values at every step; generation does the same token by token. Through TransformerBridge that needs the
    cache argument to reach the bridged attention: transformers 5.24 renamed it (``past_key_values`` ->
    ``cache``) and transformer-lens 4.3.0's attention bridge reads only ``past_key_values``, so the cache stays
    empty and every later forward silently ignores the prefix (edits that do not take, garbage generations).
    This check turns that into one clear error before anything is changed."""
    out = forward(input_ids=input_ids, use_cache=True, **kwargs)
    cache = out["past_key_values"] if "past_key_values" in out else out.get("cache")
    if cache is None or cache.get_seq_length() != input_ids.shape[1]:
        import transformers

        raise MecheditError(
            f"this transformers ({transformers.__version__}) does not pass the KV cache through TransformerBridge: "
            f"a cached forward kept {0 if cache is None else cache.get_seq_length()} of {input_ids.shape[1]} "
            "positions (transformers 5.24 renamed past_key_values to cache; transformer-lens 4.3.0 reads only "
            "past_key_values). Install a compatible one: pip install 'transformers>=5.9,<5.24'. Nothing was "
            "changed")
    return cache


def canonical_param_name(name: str) -> str:
    """A parameter name with the bridge's ``._original_component`` segments removed (the HF name)."""
    return name.replace("._original_component", "")


def resolve_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """Follow an HF module path through the bridge's in-place wrappers (``_original_component``)."""
    mod = root
    for part in path.split("."):
        mod = _unwrap(mod)
        if not hasattr(mod, part):
            raise InputError(f"module path {path!r} not found (stopped at {part!r})")
        mod = getattr(mod, part)
    return _unwrap(mod)


def _unwrap(mod: torch.nn.Module) -> torch.nn.Module:
    while "_original_component" in getattr(mod, "_modules", {}):
        mod = mod._modules["_original_component"]
    return mod


# ---------------------------------------------------------------------------------------------------------------


def resolve_model_path(model: str | Path | None) -> tuple[str, Path | None]:
    """Map what the user typed to (display name, local directory or None for a hub name)."""
    if model is None or str(model) in EMBEDDED_NAMES:
        d = embedded_model_dir()
        if not (d / "config.json").exists():
            raise ModelLoadError(f"the embedded model is missing from {d}; rebuild it with `mechedit toy build`")
        return "embedded", d
    text = str(model)
    if text.lower() in KNOWN_MODELS:
        d = cache_dir() / "models" / text.lower()
        if not (d / "config.json").exists():
            raise ModelLoadError(f"{text} is not in the local cache ({d}); fetch it once with "
                                 f"`mechedit models fetch {text.lower()}` (it then works offline)")
        return text.lower(), d
    p = Path(text).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelLoadError(f"{p} exists but is not an HF model directory (no config.json)")
        return text, p
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ModelLoadError(f"no model directory at {text}")
    return text, None


def load(model: str | Path | None = None, *, device: str | torch.device | None = None,
         dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM with its tokenizer and a TransformerBridge over the same weights.

    Args:
        model: None (the embedded world model), a local HF directory, ``smollm2-135m``, or a hub name.
        device: where to put the weights (default: CPU).
        dtype: weight dtype (default float32; tracers and editors compute in it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, path = resolve_model_path(model)
    source = str(path) if path is not None else name
    with _quiet_hf():
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="eager")
        except OSError as e:
            if path is None:
                raise ModelLoadError(
                    f"could not load {name!r} from the HuggingFace hub (offline, or no such model). Download it "
                    "where a hub is reachable and pass the local directory instead: `--model /path/to/dir` or "
                    "mechedit.load('/path/to/dir')"
                ) from e
            raise ModelLoadError(f"could not load the model in {path}: {e}") from e
    return from_hf(hf_model, tokenizer, name=name, path=path, device=device)


def from_hf(hf_model, tokenizer, *, name: str = "model", path: Path | None = None,
            device: str | torch.device | None = None) -> LoadedModel:
    """Wrap an already-built HF causal LM (and its tokenizer, loaded with ``from_pretrained``)."""
    from transformer_lens.model_bridge import TransformerBridge

    cfg = hf_model.config
    arch = ARCHITECTURES.get(cfg.model_type)
    if arch is None:
        raise ModelLoadError(f"architecture {cfg.model_type!r} is not supported; supported: "
                             f"{', '.join(sorted(ARCHITECTURES))}")
    if device is not None:
        hf_model.to(device)
    hf_model.eval()
    source = str(path) if path is not None else name
    with _quiet_hf():
        bridge = TransformerBridge.boot_transformers(source, hf_model=hf_model, tokenizer=tokenizer,
                                                     device=device)
    bridge.eval()
    tc = bridge.cfg
    n_kv = getattr(tc, "n_key_value_heads", None) or tc.n_heads
    in_emb, out_emb = hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
    tied = out_emb is not None and _unwrap(out_emb).weight is _unwrap(in_emb).weight
    return LoadedModel(
        name=name, path=path, hf_model=hf_model, tokenizer=tokenizer, bridge=bridge, arch=arch,
        n_layers=tc.n_layers, n_heads=tc.n_heads, n_kv_heads=n_kv, d_model=tc.d_model, d_head=tc.d_head,
        d_mlp=tc.d_mlp, d_vocab=tc.d_vocab, n_ctx=tc.n_ctx, tied_embeddings=tied,
    )


class _quiet_hf:
    """Silence transformers/TransformerLens chatter (progress bars, warnings) while loading; restores after."""

    def __enter__(self):
        self._prev = logging.root.manager.disable
        logging.disable(logging.WARNING)
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")
        self._env = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        from transformers.utils import logging as hf_logging

        self._bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        if self._bars:
            hf_logging.enable_progress_bar()
        logging.disable(self._prev)
        self._w.__exit__(*exc)
        if self._env is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = self._env
        return False
