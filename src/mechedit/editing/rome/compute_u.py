"""The key ``k*`` and the update direction ``u = C⁻¹ k* / ‖C⁻¹ k*‖`` (ROME, Meng et al. 2022, Eq. 2 and §3.1).

The key is the input of the MLP output projection at the lookup token (by default the subject's last token),
read not from the bare prompt alone but averaged over the prompt preceded by short random contexts,

    k* = 1/N Σ_j k(x_j + prompt)        (x_0 = "", x_1..x_N = model-generated or given prefixes)

so that the edit fires whatever comes before the subject. ``u`` is the direction in key space along which the
rank-one update is written: ``C⁻¹ k*`` rather than ``k*`` itself, so the keys the model normally meets (whose
second moment is ``C``, see :mod:`~mechedit.editing.rome.layer_stats`) are disturbed least.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mechedit.data import EditRecord
from mechedit.editing.rome.layer_stats import LayerStats
from mechedit.editing.rome.repr_tools import lookup_index, mlp_keys, pad_right, subject_prompt
from mechedit.errors import MecheditError
from mechedit.model import LoadedModel


@dataclass(frozen=True, eq=False)
class Keys:
    """The keys of one request at one layer."""

    per_template: torch.Tensor  # (N, d_mlp): one key per context template; row 0 is the bare prompt
    positions: tuple[int, ...]  # lookup token position in each template's tokens
    token: str  # the lookup token of the bare prompt, decoded

    @property
    def mean(self) -> torch.Tensor:
        """k*: the prefix-averaged key, (d_mlp,)."""
        return self.per_template.mean(dim=0)

    @property
    def bare(self) -> torch.Tensor:
        """The key of the bare prompt (original ROME's denominator), (d_mlp,)."""
        return self.per_template[0]


def compute_keys(model: LoadedModel, request: EditRecord, layer: int, templates: Sequence[str],
                 key_position: str) -> Keys:
    """Keys at the lookup token of ``request.prompt`` placed into each of ``templates`` (``"{}"``: the bare
    prompt; ``"Some text. {}"``: with a prefix), in one batched forward up to ``layer``."""
    rows, positions = [], []
    for t in templates:
        ids, subject_range = subject_prompt(model, t.replace("{}", request.prompt), request.subject)
        rows.append(ids)
        positions.append(lookup_index(len(ids), subject_range, key_position))
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    keys = mlp_keys(model, layer, pad_right(rows, pad))  # (N, T, d_mlp)
    per_template = keys[torch.arange(len(rows)), torch.tensor(positions)].float()  # (N, d_mlp)
    token = model.tokenizer.decode([rows[0][positions[0]]])
    return Keys(per_template=per_template, positions=tuple(positions), token=token)


def compute_u(k_star: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
    """``u = C⁻¹ k* / ‖C⁻¹ k*‖``, (d_mlp,) float64; with ``stats=None``, ``C = I`` (``u = k*/‖k*‖``).

    ``C⁻¹ k*`` is a linear solve in float64 (never an explicit inverse). A singular ``C`` - fewer key vectors in
    the statistics than key dimensions, or dead MLP units - raises a :class:`MecheditError`.
    """
    direction = whiten(k_star, stats)
    norm = direction.norm()
    if not torch.isfinite(direction).all() or norm == 0:
        raise MecheditError(f"the update direction C⁻¹k* is degenerate (norm {float(norm):.3g}); refusing the edit")
    return direction / norm


def whiten(k: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
    """``C⁻¹ k``, (d_mlp,) float64 (``k`` itself with ``stats=None``); ``k · whiten(k)`` is the key's squared
    whitened norm ``kᵀC⁻¹k``, large for a key unlike the ones ``C`` was read from."""
    k = k.detach().double().cpu()
    if stats is None:
        return k
    if stats.mom2.shape != (k.shape[0], k.shape[0]):
        raise MecheditError(f"statistics of shape {tuple(stats.mom2.shape)} do not fit keys of width {k.shape[0]}")
    if stats.n_tokens < k.shape[0]:
        raise MecheditError(
            f"the key statistics of layer {stats.layer} are singular: {stats.n_tokens} key vectors for "
            f"{k.shape[0]} dimensions (source {stats.source}); read more samples")
    try:
        return torch.linalg.solve(stats.mom2.double().cpu(), k)
    except RuntimeError as e:  # torch.linalg.LinAlgError: singular matrix
        raise MecheditError(
            f"the key statistics of layer {stats.layer} are singular ({stats.n_tokens} key vectors for "
            f"{k.shape[0]} dimensions, source {stats.source}); read more samples") from e
