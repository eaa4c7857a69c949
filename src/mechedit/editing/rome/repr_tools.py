"""Reading MLP keys: the input of a layer's MLP output projection (ROME's ``repr_tools``).

A *key* ``k`` is what the MLP output projection ``W`` (``model.module(layer, "mlp_out")``: GPT-2's
``mlp.c_proj``, Llama's ``mlp.down_proj``) multiplies: the MLP's hidden activation after the non-linearity (and
the gate, in gated MLPs). ROME treats ``W`` as a linear associative memory ``v = W k``; the key at the subject's
last token selects what the model recalls about the subject.

Keys are read with a forward *pre*-hook on that HF module (the real parameter the editor rewrites, found through
the architecture table), removed in a ``finally``. A forward that only needs keys stops right after the layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from mechedit.model import LoadedModel
from mechedit.tracing.common import Prompt, find_subject_range


class _StopForward(Exception):
    """Raised inside a hook to end a forward once the wanted activation is read."""


@contextmanager
def capture_keys(model: LoadedModel, layer: int, stop: bool = False) -> Iterator[dict]:
    """While active, every forward stores the keys of ``layer`` - (B, T, d_mlp) - in the yielded dict under
    ``"keys"``; with ``stop`` the forward then raises :class:`_StopForward` (see :func:`mlp_keys`)."""
    module = model.module(layer, "mlp_out")
    box: dict[str, torch.Tensor] = {}

    def hook(mod, args):  # args[0]: (B, T, d_mlp)
        box["keys"] = args[0].detach()
        if stop:
            raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def mlp_keys(model: LoadedModel, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """Keys of ``layer`` for a batch of token ids (B, T): (B, T, d_mlp). Layers above ``layer`` are not run."""
    with torch.no_grad(), capture_keys(model, layer, stop=True) as box:
        try:
            model.hf_model(input_ids=ids.to(model.device), use_cache=False)
        except _StopForward:
            pass
    return box["keys"]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> torch.Tensor:
    """(B, T) token ids, right-padded with ``pad_id``. Under causal attention a position never sees the padding
    after it, so positions before each row's end need no attention mask."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return out


def subject_prompt(model: LoadedModel, text: str, subject: str) -> tuple[list[int], tuple[int, int]]:
    """Token ids of ``text`` as the model reads it, and the [start, end) token range of ``subject`` in it."""
    ids = model.encode(text)
    return ids, find_subject_range(model.token_strings(ids), subject)


def lookup_index(n_prompt_tokens: int, subject_range: tuple[int, int], key_position: str) -> int:
    """The token whose key ROME reads/rewrites (``key_position`` as in :class:`ROMEHyperParams`)."""
    start, end = subject_range
    return {"subject_last": end - 1, "subject_first": start, "prompt_last": n_prompt_tokens - 1}[key_position]


def prompt_lookup_index(prompt: Prompt, key_position: str) -> int:
    return lookup_index(len(prompt.ids), prompt.subject_range, key_position)
