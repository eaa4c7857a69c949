"""Sites: one small type for "a place in the model", printed and parsed as TransformerLens hook names.

A site is a layer, a component and optionally one head or one neuron. Tracers report results per site, the
locator ranks sites, ROME and the (IA)³ adapter take sites as targets: everybody speaks this vocabulary.

    blocks.3.hook_resid_pre            residual stream before layer 3
    blocks.3.hook_mlp_out              MLP output of layer 3
    blocks.3.attn.hook_z[head=2]       attention head 2's mixed values (before the output projection)
    blocks.3.mlp.hook_post[neuron=17]  neuron 17 of layer 3's MLP, after the non-linearity
    hook_embed                         token embeddings (no layer)

>>> Site.parse("blocks.3.attn.hook_z[head=2]")
Site(layer=3, component='z', head=2, neuron=None)
>>> str(Site(3, "mlp_out"))
'blocks.3.hook_mlp_out'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from mechedit.errors import SiteError

# component -> hook name template (``{L}`` is the layer)
HOOKS: dict[str, str] = {
    "embed": "hook_embed",
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "resid_mid": "blocks.{L}.hook_resid_mid",
    "resid_post": "blocks.{L}.hook_resid_post",
    "attn_out": "blocks.{L}.hook_attn_out",
    "mlp_out": "blocks.{L}.hook_mlp_out",
    "q": "blocks.{L}.attn.hook_q",
    "k": "blocks.{L}.attn.hook_k",
    "v": "blocks.{L}.attn.hook_v",
    "z": "blocks.{L}.attn.hook_z",
    "pattern": "blocks.{L}.attn.hook_pattern",
    "mlp_pre": "blocks.{L}.mlp.hook_pre",
    "mlp_post": "blocks.{L}.mlp.hook_post",
}
HEAD_COMPONENTS = frozenset({"q", "k", "v", "z", "pattern"})  # activations with a head axis
KV_COMPONENTS = frozenset({"k", "v"})  # head axis has n_kv_heads entries (grouped-query attention)
NEURON_COMPONENTS = frozenset({"mlp_pre", "mlp_post"})
RESIDUAL_COMPONENTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")

_HOOK_RE = re.compile(r"^(?:blocks\.(?P<layer>-?\d+)\.)?(?P<body>[a-z_.]+?)(?:\[(?P<key>head|neuron)=(?P<idx>-?\d+)\])?$")
_BY_BODY = {t.replace("blocks.{L}.", ""): c for c, t in HOOKS.items()}


class ModelShape(Protocol):
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int


@dataclass(frozen=True, order=True)
class Site:
    layer: int | None
    component: str
    head: int | None = None
    neuron: int | None = None

    def __post_init__(self) -> None:
        if self.component not in HOOKS:
            raise SiteError(f"unknown site component {self.component!r}; known: {', '.join(HOOKS)}")
        if (self.component == "embed") != (self.layer is None):
            raise SiteError("'embed' is the only site without a layer" if self.layer is None
                            else "the embedding site 'hook_embed' takes no layer")
        if self.head is not None and self.component not in HEAD_COMPONENTS:
            raise SiteError(f"{self.component!r} has no heads; heads exist on {sorted(HEAD_COMPONENTS)}")
        if self.neuron is not None and self.component not in NEURON_COMPONENTS:
            raise SiteError(f"{self.component!r} has no neurons; neurons exist on {sorted(NEURON_COMPONENTS)}")

    # -- names ----------------------------------------------------------------------------------------------
    @property
    def hook_name(self) -> str:
        """The TransformerLens hook this site reads (without the head/neuron index)."""
        return HOOKS[self.component].format(L=self.layer)

    def __str__(self) -> str:
        if self.head is not None:
            return f"{self.hook_name}[head={self.head}]"
        if self.neuron is not None:
            return f"{self.hook_name}[neuron={self.neuron}]"
        return self.hook_name

    @classmethod
    def parse(cls, text: str) -> "Site":
        m = _HOOK_RE.match(text.strip())
        if not m or m["body"] not in _BY_BODY:
            raise SiteError(
                f"cannot read site {text!r}: expected a TransformerLens hook name such as "
                "'blocks.3.hook_mlp_out', 'blocks.3.attn.hook_z[head=2]' or 'blocks.3.mlp.hook_post[neuron=17]'"
            )
        layer = int(m["layer"]) if m["layer"] is not None else None
        idx = int(m["idx"]) if m["idx"] is not None else None
        return cls(layer, _BY_BODY[m["body"]], head=idx if m["key"] == "head" else None,
                   neuron=idx if m["key"] == "neuron" else None)

    # -- validation -----------------------------------------------------------------------------------------
    def validate(self, shape: ModelShape) -> "Site":
        """Check this site exists in a model of ``shape``; returns self so it chains."""
        if self.layer is not None and not 0 <= self.layer < shape.n_layers:
            raise SiteError(f"site {self}: layer {self.layer} is out of range; the model has layers "
                            f"0..{shape.n_layers - 1}")
        if self.head is not None:
            n = shape.n_kv_heads if self.component in KV_COMPONENTS else shape.n_heads
            kind = "key/value heads" if self.component in KV_COMPONENTS else "heads"
            if not 0 <= self.head < n:
                raise SiteError(f"site {self}: head {self.head} is out of range; the model has {n} {kind} "
                                f"(0..{n - 1})")
        if self.neuron is not None and not 0 <= self.neuron < shape.d_mlp:
            raise SiteError(f"site {self}: neuron {self.neuron} is out of range; the MLP has {shape.d_mlp} "
                            f"neurons (0..{shape.d_mlp - 1})")
        return self


def as_site(site: "Site | str") -> Site:
    return site if isinstance(site, Site) else Site.parse(site)


def layer_sites(component: str, n_layers: int) -> list[Site]:
    """One site per layer for a layered component."""
    return [Site(layer, component) for layer in range(n_layers)]
