"""Text sampled from the model itself: ROME's context prefixes, and statistics text when no corpus is given.

ROME's ``generate_fast`` samples from the top-k tokens starting at the model's BOS/EOS token; this does the same
with the HF model's ``generate`` (KV cache, batched), seeded through a forked RNG so the global random state is
left alone and the same seed always gives the same text.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from mechedit.errors import InputError
from mechedit.model import LoadedModel


def start_token(model: LoadedModel) -> int:
    """The token sampling starts from: BOS, or EOS where there is no BOS (GPT-2's ``<|endoftext|>``)."""
    tok = model.tokenizer
    for tid in (tok.bos_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    raise InputError("the tokenizer has neither a BOS nor an EOS token to start sampling from; give the text "
                     "yourself (context_prefixes, or a statistics text file)")


def iter_sampled_texts(model: LoadedModel, n: int, length: int, *, top_k: int = 5, seed: int = 0,
                       batch_size: int = 64) -> Iterator[str]:
    """Yield ``n`` texts of up to ``length`` new tokens each, sampled from the top ``top_k`` tokens.

    Batch ``b`` is sampled with seed ``(seed, b)``, so the first ``m`` texts do not depend on ``n``. Special
    tokens are dropped from the decoded text; a text that decodes to nothing is yielded as ``""`` (callers skip it).
    """
    if n < 0 or length < 1:
        raise InputError(f"cannot sample {n} texts of {length} tokens")
    if length + 1 > model.n_ctx:
        raise InputError(f"cannot sample {length} tokens after the start token: the model's context is "
                         f"{model.n_ctx} tokens")
    model.check_kv_cache()  # generation reuses each step's keys and values
    start = start_token(model)
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else start
    done = 0
    for b in range((n + batch_size - 1) // batch_size):
        size = min(batch_size, n - done)
        ids = torch.full((size, 1), start, dtype=torch.long, device=model.device)  # (B, 1)
        with torch.random.fork_rng(devices=[] if model.device.type == "cpu" else [model.device]), torch.no_grad():
            torch.manual_seed(seed * 1_000_003 + b)
            out = model.hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=top_k,
                                          top_p=1.0, temperature=1.0, max_new_tokens=length,
                                          min_new_tokens=length, pad_token_id=pad, eos_token_id=None)
        for row in out[:, 1:].tolist():  # (B, length)
            yield tok.decode(row, skip_special_tokens=True)
        done += size


def sample_texts(model: LoadedModel, n: int, length: int, *, top_k: int = 5, seed: int = 0) -> list[str]:
    """``n`` sampled texts as a list (see :func:`iter_sampled_texts`)."""
    return list(iter_sampled_texts(model, n, length, top_k=top_k, seed=seed))


def cached_sampled_texts(model: LoadedModel, n: int, length: int, *, top_k: int = 5, seed: int = 0) -> Iterator[str]:
    """:func:`iter_sampled_texts`, remembered on disk per model weights and sampling settings.

    Statistics of several layers read the same sampled text (MEMIT's layer range, a layer sweep); sampling it is
    most of their cost on a real model (SmolLM2: minutes per layer), and the same weights with the same seed
    always sample the same text. The first call streams the texts as they are sampled and writes them once all
    ``n`` are out; later calls read the file. The file is keyed by ``n`` too, since a shorter last batch samples
    different text.
    """
    path = sampled_texts_path(model, n, length, top_k, seed)
    try:
        texts = json.loads(path.read_text())
        if isinstance(texts, list) and len(texts) == n and all(isinstance(t, str) for t in texts):
            yield from texts
            return
    except (OSError, ValueError):
        pass  # not cached yet, or an unreadable file: sample (and overwrite it)
    texts = []
    for t in iter_sampled_texts(model, n, length, top_k=top_k, seed=seed):
        texts.append(t)
        yield t
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(texts, f)
    os.replace(tmp, path)


def sampled_texts_path(model: LoadedModel, n: int, length: int, top_k: int, seed: int) -> Path:
    from mechedit.hub import cache_dir

    return cache_dir() / "texts" / model.fingerprint() / f"len{length}-top{top_k}-seed{seed}-n{n}.json"
