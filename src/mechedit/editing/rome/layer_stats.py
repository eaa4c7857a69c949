"""Second-moment statistics of MLP keys, ``C = E[k kᵀ]``: what ROME's update must disturb least.

ROME (Meng et al. 2022, §3 and Appendix) views the MLP output projection ``W`` as a linear associative memory
that stores many key-value pairs ``W k_i ≈ v_i``. Inserting a new pair ``(k*, v*)`` with the least change to the
old ones gives the rank-one update ``ΔW ∝ (v* - W k*) (C⁻¹ k*)ᵀ`` where ``C = K Kᵀ / n`` is the uncentred
second moment of the keys the model meets in ordinary text. This module estimates ``C`` for one layer:

* text comes from a *source*: a list of strings, a text file (one sample per non-empty line), the embedded
  world's training corpus, text sampled from the model itself, or a HuggingFace dataset (needs a hub);
* each sample is tokenized as the model reads it (BOS included), truncated to ``max_tokens``, and run up to the
  layer (layers above it are skipped); every token's key adds to ``Σ k kᵀ`` (float64);
* the result is cached on disk under ``mechedit.hub.cache_dir() / "stats"``, keyed by a fingerprint of the
  weights the keys depend on (see :func:`key_fingerprint`), the layer, the source and the sample count.

ROME read 100,000 Wikipedia records for GPT-2 XL; :class:`~mechedit.editing.rome.hparams.ROMEHyperParams`
explains the CPU-sized default.

>>> import mechedit
>>> m = mechedit.load()                                                    # doctest: +SKIP
>>> stats = layer_stats(m, 3, "world", n_samples=2000)                     # doctest: +SKIP
>>> stats.mom2.shape                                                       # doctest: +SKIP
torch.Size([512, 512])
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from mechedit.editing.rome.repr_tools import mlp_keys, pad_right
from mechedit.errors import DataFormatError, InputError, MecheditError
from mechedit.hub import cache_dir
from mechedit.model import LoadedModel, canonical_param_name, resolve_module

Progress = Callable[[int, int], None]  # (samples done, samples in all)
STATS_FORMAT = "mechedit.layer_stats/1"


@dataclass(frozen=True, eq=False)
class LayerStats:
    """Key statistics of one layer (keys = inputs of the MLP output projection, d_mlp wide)."""

    layer: int
    mom2: torch.Tensor  # (d_mlp, d_mlp) float64: E[k kᵀ] over every token read (ROME's "mom2")
    mean: torch.Tensor  # (d_mlp,) float64: E[k]
    n_samples: int  # text samples read
    n_tokens: int  # key vectors averaged (tokens, BOS included)
    source: str  # source id (see text_source)
    key_fingerprint: str  # fingerprint of the weights the keys depend on (see key_fingerprint)
    path: Path | None = None  # cache file it was read from / written to

    def covariance(self) -> torch.Tensor:
        """Centred covariance E[(k - μ)(k - μ)ᵀ], (d_mlp, d_mlp) float64."""
        return self.mom2 - torch.outer(self.mean, self.mean)


# -- sources ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSource:
    """Where statistics text comes from. ``texts(n)`` yields up to ``n`` non-empty samples."""

    id: str  # short, filename-safe, identifies the text (part of the cache key)
    description: str
    n_available: int | None  # None: as many as asked (sampled from the model, streamed from a dataset)
    texts: Callable[[int], Iterator[str]]


# The world corpus last read for a model (dropped with the model): (world.json's digest, its texts).
_WORLD_CORPORA: weakref.WeakKeyDictionary[LoadedModel, tuple[str, list[str]]] = weakref.WeakKeyDictionary()


def text_source(model: LoadedModel, source: str | Path | Sequence[str] = "auto", *, max_tokens: int = 128,
                seed: int = 0, top_k: int = 5) -> TextSource:
    """Resolve a source spec: a list of strings, ``"auto"``, ``"world"``, ``"model"``, ``"hf:NAME[:CONFIG]"``, or
    a text file path. ``"auto"`` is the world corpus when ``model.path`` holds a ``world.json``, else text
    sampled from the model (``max_tokens`` per sample, top-``top_k`` sampling seeded by ``seed``)."""
    if isinstance(source, (list, tuple)):
        texts = [t for t in source if isinstance(t, str) and t.strip()]
        if len(texts) != len(source):
            raise InputError("a statistics text list must hold non-empty strings only")
        if not texts:
            raise InputError("the statistics text list is empty")
        digest = _sha(b"\x00".join(t.encode() for t in texts))
        return TextSource(f"texts-{digest}", f"{len(texts)} given texts", len(texts),
                          lambda n: iter(texts[:n]))
    if not isinstance(source, (str, Path)) or not str(source).strip():
        raise InputError(f"unknown statistics source {source!r}: give 'auto', 'world', 'model', "
                         "'hf:NAME[:CONFIG]', a text file path, or a list of strings")
    spec = str(source)
    world_file = model.path / "world.json" if model.path is not None else None
    if spec == "auto":
        spec = "world" if world_file is not None and world_file.is_file() else "model"
    if spec == "world":
        if world_file is None or not world_file.is_file():
            raise InputError(f"model {model.name!r} has no world.json beside its weights, so there is no world "
                             "corpus; use source 'model', a text file, or a list of strings")
        from mechedit.toy.world import World

        digest = _sha(world_file.read_bytes())
        memo = _WORLD_CORPORA.get(model)
        if memo is not None and memo[0] == digest:
            corpus = memo[1]  # every edit asks; building the corpus costs more than a small model's edit step
        else:
            try:
                corpus = [t for t in World.load(world_file).corpus() if t.strip()]
            except (ValueError, KeyError, TypeError) as e:
                raise DataFormatError(f"{world_file} is not a readable world file ({type(e).__name__}: {e})") from e
            _WORLD_CORPORA[model] = (digest, corpus)
        return TextSource(f"world-{digest}", f"world corpus of {world_file}", len(corpus),
                          lambda n: iter(corpus[:n]))
    if spec == "model":
        from mechedit.editing.generate import cached_sampled_texts

        # BOS + sampled tokens fill max_tokens, and never more than the model's context (GPT-2's learned positions
        # end there).
        length = max(1, min(max_tokens, model.n_ctx) - 1)
        return TextSource(f"model-len{length}-top{top_k}-seed{seed}",
                          f"text sampled from the model (top-{top_k}, {length} tokens, seed {seed})", None,
                          lambda n: (t for t in cached_sampled_texts(model, n, length, top_k=top_k, seed=seed)
                                     if t.strip()))
    if spec.startswith("hf:"):
        return _hf_source(spec[3:])
    path = Path(spec).expanduser()
    if not path.is_file():
        raise InputError(f"statistics source {spec!r} is not 'auto', 'world', 'model' or 'hf:NAME', and no "
                         "such text file exists")
    raw = path.read_bytes()
    try:
        lines = [ln for ln in raw.decode("utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not lines:
        raise InputError(f"{path} holds no text")
    return TextSource(f"file-{_safe(path.stem)}-{_sha(raw)}", f"lines of {path}", len(lines),
                      lambda n: iter(lines[:n]))


def _hf_source(spec: str) -> TextSource:
    name, _, config = spec.partition(":")
    if not name:
        raise InputError("give a dataset name after 'hf:', e.g. 'hf:wikitext:wikitext-103-raw-v1'")
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise MecheditError("reading a HuggingFace dataset needs the `datasets` package") from e
    try:
        ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
        first = next(iter(ds))
    except Exception as e:  # offline, no such dataset, no train split ...: one clear message
        raise MecheditError(
            f"could not read the HuggingFace dataset {name!r}{f' ({config})' if config else ''}: "
            f"{type(e).__name__}: {str(e)[:200]}. This source needs a reachable hub; offline, save the text to a "
            "file (one sample per line) and pass its path instead") from e
    column = "text" if "text" in first else next((k for k, v in first.items() if isinstance(v, str)), None)
    if column is None:
        raise MecheditError(f"the HuggingFace dataset {name!r} has no text column")

    def texts(n: int) -> Iterator[str]:
        return islice((r[column] for r in ds if isinstance(r[column], str) and r[column].strip()), n)

    return TextSource(f"hf-{_safe(name)}-{_safe(config or 'default')}", f"HuggingFace dataset {spec}", None, texts)


# -- streaming ----------------------------------------------------------------------------------------------------


def stream_keys(model: LoadedModel, layer: int, texts: Iterable[str], *, max_tokens: int, total: int | None = None,
                batch_tokens: int = 4096, progress: Progress | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Run ``texts`` through the model up to ``layer`` and sum its keys.

    Returns:
        (Σ k kᵀ (d_mlp, d_mlp) float64, Σ k (d_mlp,) float64, tokens, samples).
    """
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    mom2 = torch.zeros(model.d_mlp, model.d_mlp, dtype=torch.float64, device=model.device)
    ksum = torch.zeros(model.d_mlp, dtype=torch.float64, device=model.device)
    n_tokens = n_samples = 0
    batch: list[list[int]] = []

    def run(batch: list[list[int]]) -> None:
        nonlocal n_tokens
        x = pad_right(batch, pad)  # (B, T)
        keys = mlp_keys(model, layer, x)  # (B, T, d_mlp)
        lengths = torch.tensor([len(s) for s in batch], device=keys.device)
        real = torch.arange(x.shape[1], device=keys.device)[None, :] < lengths[:, None]  # (B, T)
        k = keys[real].double()  # (N, d_mlp)
        mom2.addmm_(k.T, k)
        ksum.add_(k.sum(dim=0))
        n_tokens += k.shape[0]

    if progress is not None:
        progress(0, total or 0)
    it = iter(texts)
    while group := list(islice(it, 256)):
        for ids in tok(group, truncation=True, max_length=min(max_tokens, model.n_ctx))["input_ids"]:
            if not ids:
                continue
            width = max([len(ids), *map(len, batch)])
            if batch and width * (len(batch) + 1) > batch_tokens:
                run(batch)
                batch = []
            batch.append(ids)
            n_samples += 1
        if progress is not None:
            progress(n_samples, total or n_samples)
    if batch:
        run(batch)
    return mom2, ksum, n_tokens, n_samples


# -- the cache ----------------------------------------------------------------------------------------------------


# key_fingerprint's memo per model (dropped with the model): versions of the hashed parameters -> fingerprint.
_KEY_FINGERPRINTS: weakref.WeakKeyDictionary[LoadedModel, dict[tuple, str]] = weakref.WeakKeyDictionary()


def key_fingerprint(model: LoadedModel, layer: int) -> str:
    """A hash of the weights that ``layer``'s keys depend on: the embeddings, every layer below, and ``layer``
    itself except its MLP output projection - not the layers above, the final norm or the unembedding.

    So editing the output projection of ``layer`` or any later layer (what ROME and MEMIT do) leaves the cached
    statistics of ``layer`` valid, and sequential edits do not recompute them; editing anything upstream does.
    Parameters are told apart by identity, so the bridge's aliases of a parameter cannot leak it back in.
    """
    arch, root = model.arch, model.hf_model
    downstream = [model.module(layer, "mlp_out")]
    downstream += [resolve_module(root, f"{arch.layers}.{i}") for i in range(layer + 1, model.n_layers)]
    downstream += [resolve_module(root, arch.final_norm), resolve_module(root, arch.unembed)]
    embedding = {id(p) for p in resolve_module(root, arch.embed).parameters()}  # tied unembedding: still upstream
    skip = {id(p) for mod in downstream for p in mod.parameters()} - embedding
    params = sorted(((canonical_param_name(n), p) for n, p in root.named_parameters() if id(p) not in skip),
                    key=lambda t: t[0])
    # Hashing is a pass over most of the weights (an embedding-sized one at least); it is remembered against the
    # parameters' identities and in-place version counters, as LoadedModel.fingerprint is, so an edit and its
    # restore at this layer or above - which never touch these parameters - do not hash them again.
    versions = (layer, len(model.tokenizer), tuple((name, id(p), p._version) for name, p in params))
    memo = _KEY_FINGERPRINTS.setdefault(model, {})
    if versions in memo:
        return memo[versions]
    h = hashlib.sha256(f"{model.architecture}|layer {layer}|vocab {len(model.tokenizer)}".encode())
    for name, p in params:
        h.update(name.encode())
        h.update(p.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    if len(memo) >= 4 * model.n_layers:
        memo.pop(next(iter(memo)))  # the oldest
    memo[versions] = h.hexdigest()[:16]
    return memo[versions]


def stats_path(key_fp: str, layer: int, source_id: str, n_samples: int, max_tokens: int) -> Path:
    return cache_dir() / "stats" / key_fp / f"layer{layer:03d}-{source_id}-n{n_samples}-t{max_tokens}.safetensors"


def layer_stats(model: LoadedModel, layer: int, source: str | Path | Sequence[str] = "auto",
                n_samples: int = 10_000, *, max_tokens: int = 128, seed: int = 0, top_k: int = 5,
                progress: Progress | None = None, recompute: bool = False, batch_tokens: int = 4096) -> LayerStats:
    """Key statistics of ``layer``, read from the cache or computed (and cached) from ``source``.

    Args:
        source: see :func:`text_source`.
        n_samples: text samples to read (a finite source gives at most what it has; the cache key uses the
            count actually read, so asking a 10,356-text corpus for 20,000 or 50,000 shares one file).
        max_tokens: tokens per sample (longer samples are truncated).
        progress: called with (samples done, samples in all) while streaming; not called on a cache hit.
        recompute: ignore (and overwrite) a cached file.
    """
    model.module(layer, "mlp_out")  # validates the layer
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise InputError(f"n_samples must be a positive integer, got {n_samples!r}")
    src = text_source(model, source, max_tokens=max_tokens, seed=seed, top_k=top_k)
    n = n_samples if src.n_available is None else min(n_samples, src.n_available)
    kfp = key_fingerprint(model, layer)
    path = stats_path(kfp, layer, src.id, n, max_tokens)
    if not recompute and path.is_file():
        cached = _read(path, layer, model)
        if cached is not None:
            return cached
    mom2, ksum, n_tokens, n_read = stream_keys(model, layer, src.texts(n), max_tokens=max_tokens, total=n,
                                               batch_tokens=batch_tokens, progress=progress)
    if n_tokens == 0:
        raise InputError(f"the statistics source ({src.description}) gave no tokens")
    stats = LayerStats(layer=layer, mom2=(mom2 / n_tokens).cpu(), mean=(ksum / n_tokens).cpu(), n_samples=n_read,
                       n_tokens=n_tokens, source=src.id, key_fingerprint=kfp, path=path)
    _write(path, stats, src.description, model.name)
    return stats


def _write(path: Path, stats: LayerStats, description: str, model_name: str) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": STATS_FORMAT, "layer": str(stats.layer), "n_samples": str(stats.n_samples),
            "n_tokens": str(stats.n_tokens), "source": stats.source, "description": description,
            "key_fingerprint": stats.key_fingerprint, "model_name": model_name}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({"mom2": stats.mom2.contiguous(), "mean": stats.mean.contiguous()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path, layer: int, model: LoadedModel) -> LayerStats | None:
    """The cached statistics, or None when the file is unreadable or not what the key promises (recomputed)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            mom2, mean = f.get_tensor("mom2"), f.get_tensor("mean")
        if meta.get("format") != STATS_FORMAT or int(meta["layer"]) != layer:
            return None
        if mom2.shape != (model.d_mlp, model.d_mlp) or mean.shape != (model.d_mlp,):
            return None
        return LayerStats(layer=layer, mom2=mom2, mean=mean, n_samples=int(meta["n_samples"]),
                          n_tokens=int(meta["n_tokens"]), source=meta["source"],
                          key_fingerprint=meta["key_fingerprint"], path=path)
    except Exception:  # corrupt or truncated cache file: recompute
        return None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:60] or "_"


def describe(stats: LayerStats) -> dict:
    """The statistics' provenance as plain data (recorded in an edit handle's evidence)."""
    return {"layer": stats.layer, "source": stats.source, "n_samples": stats.n_samples, "n_tokens": stats.n_tokens,
            "key_fingerprint": stats.key_fingerprint, "path": str(stats.path) if stats.path else None}


__all__ = ["LayerStats", "TextSource", "describe", "key_fingerprint", "layer_stats", "stats_path",
           "stream_keys", "text_source"]
