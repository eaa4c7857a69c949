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
from dataclasses import dataclass

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


@dataclass(frozen=True, eq=False)
class SplitBatch:
    """Rows of token ids cut in two at one position each, laid out so every row's cut lands on one column.

    The part before each cut is left-padded to ``P`` columns, the rest right-padded to ``S``: column ``P + j`` of
    the whole holds token ``cut_i + j`` of row ``i``. Position ids are each token's position in its own row, and
    the attention mask hides the left padding, so every real token computes what it computes in its row alone
    (up to floating-point noise). Run ``prefix`` once with a KV cache, then ``suffix`` against that cache.
    """

    prefix: torch.Tensor  # (B, P) long: tokens before each row's cut, left-padded
    suffix: torch.Tensor  # (B, S) long: the cut token and after, right-padded
    attention_mask: torch.Tensor  # (B, P + S) long: 0 on the prefix's left padding, else 1
    positions: torch.Tensor  # (B, P + S) long: each token's position in its own row (0 on padding)
    cuts: tuple[int, ...]  # the cut position in each row

    @property
    def width(self) -> int:
        """P: the columns before the cut."""
        return self.prefix.shape[1]

    def column(self, row: int, position: int) -> int:
        """The suffix column of token ``position`` of ``row`` (which must be at or after the row's cut)."""
        j = position - self.cuts[row]
        if not 0 <= j < self.suffix.shape[1]:
            raise ValueError(f"position {position} of row {row} is before its cut {self.cuts[row]}")
        return j


def split_rows(seqs: Sequence[Sequence[int]], cuts: Sequence[int], pad_id: int = 0) -> SplitBatch:
    """Lay out ``seqs`` as a :class:`SplitBatch` cut at ``cuts`` (``0 <= cut < len(row)``)."""
    if any(not 0 <= c < len(s) for s, c in zip(seqs, cuts, strict=True)):
        raise ValueError("every cut must fall inside its row")
    width = max(cuts)
    tail = max(len(s) - c for s, c in zip(seqs, cuts))
    ids = torch.full((len(seqs), width + tail), pad_id, dtype=torch.long)  # (B, P + S)
    mask = torch.zeros_like(ids)
    positions = torch.zeros_like(ids)
    for i, (s, c) in enumerate(zip(seqs, cuts)):
        off = width - c  # left padding of this row
        ids[i, off: off + len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, off:] = 1  # right padding after the row's end may be attended: nothing real comes after it
        positions[i, off:] = torch.arange(width + tail - off)
    return SplitBatch(prefix=ids[:, :width], suffix=ids[:, width:], attention_mask=mask, positions=positions,
                      cuts=tuple(cuts))


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


@contextmanager
def add_to_mlp_output(model: LoadedModel, layer: int, fn) -> Iterator[None]:
    """While active, the output of ``layer``'s MLP output projection - (B, T, d_model) - is replaced by
    ``fn(output)`` in every forward (a forward hook on that HF module, removed in a ``finally``). In every
    supported architecture nothing but (inactive) dropout follows that projection inside the MLP, so this is
    the MLP's output: the bridge's ``blocks.L.hook_mlp_out``."""
    handle = model.module(layer, "mlp_out").register_forward_hook(lambda mod, args, out: fn(out))
    try:
        yield
    finally:
        handle.remove()
