"""Attention patterns through circuitsvis: every head of one or more layers on one prompt.

The pattern is read at ``blocks.L.attn.hook_pattern`` on the bridge (through :func:`mechedit.tracing.common.hooks`,
so no hook outlives the call) and drawn by circuitsvis's ``attention_heads``: a thumbnail per head, a click
shows it full size with the tokens (destination down the side, source along the top; the causal mask leaves
the upper triangle empty).

circuitsvis's ``RenderedHTML`` shows itself in a notebook; its ``str()`` loads circuitsvis's JavaScript from a
CDN. :func:`attention_page` writes the *local* variant instead (circuitsvis's own bundle inlined, about 1.3 MB),
so the page opens offline.

>>> from pathlib import Path                                         # doctest: +SKIP
>>> import mechedit
>>> from mechedit.viz.attention import attention_page, attention_patterns
>>> m = mechedit.load()
>>> html = attention_patterns(m, "Dalo Frenwick was born in", layer=2)  # shows itself in Jupyter
>>> Path("attention.html").write_text(attention_page(html, "layer 2"))
"""

from __future__ import annotations

import html as html_lib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from mechedit.errors import InputError
from mechedit.sites import Site
from mechedit.tracing.common import HookFn, hooks

if TYPE_CHECKING:
    from circuitsvis.utils.render import RenderedHTML

    from mechedit.model import LoadedModel


def read_patterns(model: "LoadedModel", prompt: str, layers: Sequence[int]) -> tuple[list[str], torch.Tensor]:
    """The prompt's tokens and the attention patterns of ``layers``, (n_layers_asked, n_heads, T_dest, T_src)
    float32 on the CPU, in one forward.

    Raises :class:`~mechedit.errors.SiteError` for a layer out of range and
    :class:`~mechedit.errors.InputError` for an empty prompt or one longer than the context."""
    layers = list(layers)
    if not layers:
        raise InputError("no layers asked for")
    sites = [model.site(Site(layer, "pattern")) for layer in layers]  # layer out of range -> SiteError
    ids = model.encode(prompt)  # empty / too long -> InputError
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> HookFn:
        def fn(act: torch.Tensor, hook) -> torch.Tensor:  # act (1, H, T, T)
            seen[name] = act[0].detach().float().cpu().clone()
            return act
        return fn

    names = list(dict.fromkeys(s.hook_name for s in sites))
    with torch.no_grad(), hooks(model, [(n, keep(n)) for n in names]):
        model.bridge(torch.tensor([ids], device=model.device))
    return model.token_strings(ids), torch.stack([seen[s.hook_name] for s in sites])


def attention_patterns(model: "LoadedModel", prompt: str, layer: int | Sequence[int]) -> "RenderedHTML":
    """Every head's attention pattern in layer ``layer`` (or in each of several layers, drawn together) on
    ``prompt``, as circuitsvis HTML: a ``RenderedHTML``, which displays itself in Jupyter; pass it to
    :func:`attention_page` for a file. Heads are named ``L{layer}H{head}``."""
    layers = [layer] if isinstance(layer, int) else list(layer)
    tokens, pattern = read_patterns(model, prompt, layers)
    return draw_patterns(tokens, pattern, layers)


def draw_patterns(tokens: list[str], pattern: torch.Tensor, layers: Sequence[int]) -> "RenderedHTML":
    """circuitsvis's ``attention_heads`` for patterns read by :func:`read_patterns`.

    Args:
        pattern: (len(layers), n_heads, T, T) attention patterns.
    """
    import circuitsvis

    names = [f"L{lyr}H{h}" for lyr in layers for h in range(pattern.shape[1])]
    return circuitsvis.attention.attention_heads(attention=pattern.flatten(0, 1), tokens=tokens,
                                                 attention_head_names=names, mask_upper_tri=True)


def attention_page(rendered: "RenderedHTML", title: str = "Attention patterns") -> str:
    """A complete HTML page around circuitsvis output, with circuitsvis's JavaScript inlined (works offline)."""
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html_lib.escape(title)}</title></head>\n"
            f"<body style=\"font-family: sans-serif\">\n<h3>{html_lib.escape(title)}</h3>\n"
            f"{rendered.local_src}\n</body></html>\n")
