"""Keys and residuals of many requests at once (MEMIT, Meng et al. 2023, §4.3 "compute_ks").

For every request ``i`` and context template ``j`` the prompt ``x_j + prompt_i`` is tokenized once
(:class:`Prepared`); then

* ``K_l`` (n, d_mlp): the key of layer ``l`` (input of its MLP output projection) at each request's lookup token,
  averaged over the templates, as ROME's ``k*`` (:func:`mechedit.editing.rome.compute_u.compute_keys`) but for
  every request in a few right-padded batches;
* ``z`` (n, d_model): the residual stream after layer ``L`` (the last edited layer) at the lookup token of the
  bare prompt: where MEMIT's target values live.

Forwards stop right after the layer they read (keys: ROME's :func:`~mechedit.editing.rome.repr_tools.mlp_keys`;
residuals: a forward hook on the decoder block, removed in a ``finally``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mechedit.data import EditRecord
from mechedit.editing.rome.repr_tools import mlp_keys, pad_right, prompt_lookup_index
from mechedit.model import LoadedModel, resolve_module
from mechedit.tracing.common import Prompt, prepare_prompt

ROWS_PER_FORWARD = 512  # rows per no-grad reading forward (bounds memory only)


@dataclass(frozen=True, eq=False)
class Prepared:
    """Every request in every template, tokenized once."""

    requests: tuple[EditRecord, ...]
    templates: tuple[str, ...]  # "{}" first: the bare prompt
    prompts: tuple[tuple[Prompt, ...], ...]  # [request][template]: prompt + new target (teacher forcing)
    lookups: torch.Tensor  # (n, n_templates) long: lookup token position in each prompt

    @property
    def n(self) -> int:
        return len(self.requests)

    def subset(self, index: Sequence[int]) -> Prepared:
        """The requests at ``index`` (in that order), already tokenized."""
        index = list(index)
        return Prepared(tuple(self.requests[i] for i in index), self.templates,
                        tuple(self.prompts[i] for i in index), self.lookups[index])


def prepare(model: LoadedModel, requests: Sequence[EditRecord], templates: Sequence[str],
            key_position: str) -> Prepared:
    """Tokenize every (request, template); raises :class:`~mechedit.errors.InputError` when a subject is not
    in its prompt or a prompt does not fit the context."""
    prompts, lookups = [], []
    for r in requests:
        row = tuple(prepare_prompt(model, t.replace("{}", r.prompt), r.subject, r.target_new) for t in templates)
        prompts.append(row)
        lookups.append([prompt_lookup_index(p, key_position) for p in row])
    return Prepared(tuple(requests), tuple(templates), tuple(prompts), torch.tensor(lookups, dtype=torch.long))


def _pad_id(model: LoadedModel) -> int:
    return model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0


def _at_lookups(rows: list[list[int]], pos: torch.Tensor, read, pad: int) -> torch.Tensor:
    """``read(ids)`` (B, T, d) at each row's position ``pos``: (len(rows), d) float64. Under causal attention
    nothing after a row's lookup token changes what is read there, so rows are cut right after it, and they run
    sorted by length in batches of ``ROWS_PER_FORWARD`` (little padding); the result is in the rows' order."""
    cut = [row[:int(p) + 1] for row, p in zip(rows, pos)]
    order = sorted(range(len(cut)), key=lambda i: len(cut[i]))
    out = [None] * len(cut)
    for s in range(0, len(order), ROWS_PER_FORWARD):
        idx = order[s:s + ROWS_PER_FORWARD]
        got = read(pad_right([cut[i] for i in idx], pad))  # (B, T, d); right padding is never seen (causal)
        at = got[torch.arange(len(idx)), pos[idx].to(got.device)].double().cpu()  # (B, d)
        for k, i in enumerate(idx):
            out[i] = at[k]
    return torch.stack(out)


def read_keys(model: LoadedModel, prep: Prepared, layer: int) -> torch.Tensor:
    """K: (n, d_mlp) float64, each request's key at ``layer`` averaged over the templates (MEMIT's compute_ks)."""
    return read_template_keys(model, prep, layer).mean(dim=1)


def read_template_keys(model: LoadedModel, prep: Prepared, layer: int) -> torch.Tensor:
    """(n, n_templates, d_mlp) float64: each request's key at ``layer`` in each template, bare prompt first."""
    rows = [list(p.ids) for ps in prep.prompts for p in ps]  # request-major: (n * n_templates) rows
    keys = _at_lookups(rows, prep.lookups.reshape(-1), lambda ids: mlp_keys(model, layer, ids), _pad_id(model))
    return keys.reshape(prep.n, len(prep.templates), -1)


class _Stop(Exception):
    pass


@contextmanager
def capture_block_output(model: LoadedModel, layer: int, stop: bool = False) -> Iterator[dict]:
    """While active, every forward stores the residual stream after block ``layer`` ((B, T, d_model)) in the
    yielded dict under ``"resid"``; with ``stop`` the forward then ends (see :func:`read_resid`)."""
    block = resolve_module(model.hf_model, f"{model.arch.layers}.{layer}")
    box: dict[str, torch.Tensor] = {}

    def hook(mod, args, output):
        box["resid"] = (output[0] if isinstance(output, tuple) else output).detach()
        if stop:
            raise _Stop

    handle = block.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def read_resid(model: LoadedModel, prep: Prepared, layer: int) -> torch.Tensor:
    """z: (n, d_model) float64, the residual stream after ``layer`` at the bare prompt's lookup token."""
    def read(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), capture_block_output(model, layer, stop=True) as box:
            try:
                model.hf_model(input_ids=ids.to(model.device), use_cache=False)
            except _Stop:
                pass
        return box["resid"]

    return _at_lookups([list(ps[0].ids) for ps in prep.prompts], prep.lookups[:, 0], read, _pad_id(model))
