"""Attribution patching: a first-order estimate of every activation patch at once (2 forwards, 1 backward).

Nanda, "Attribution Patching: Activation Patching At Industrial Scale" (2023); Syed, Rager and Conmy,
"Attribution Patching Outperforms Automated Circuit Discovery" (2023). Compared against exact patching as in
Heimersheim and Nanda (2024).

The idea. Activation patching runs the model once per patched entry. If the metric m were linear in an
activation a, patching a from its base value to its source value would change m by exactly

    m(patched) - m(base)  =  ∇_a m |_base · (a_source - a_base)

and one backward pass gives ∇_a m for every activation at once. Attribution patching uses that first-order
Taylor estimate for every site, head and neuron: the gradient at the run being patched into, dotted with the
difference the patch would make, summed over the patched slice (a (layer, position) vector, one head's
(position, d_head) block, one neuron over positions, ...).

Which run and which sign. With ``direction="denoise"`` (the default) the *corrupted* run is patched into, so
the gradient is taken on the corrupted run and the difference is clean − corrupted::

    estimate  =  ∇_a m |_corrupted · (a_clean - a_corrupted)   ≈  m(corrupted, a ← clean) - m(corrupted)

With ``direction="noise"`` the gradient is taken on the clean run and the difference is corrupted − clean.
A positive estimate says the patch raises the metric. ``values`` holds the estimated metric after the patch
(``m(base) + estimate``) and ``scores`` the same normalisation as :mod:`mechedit.tracing.patching` (1 = the
clean run's metric, 0 = the corrupted run's), so the two results compare entry by entry.

When it is exact, and when not. The estimate is exact wherever the map from the activation to the metric is
affine: ``logit_diff`` of the final residual stream with a linear final norm, for instance. Non-linearities
(norms, softmax, attention patterns, GELU) make it an approximation, usually good for small activations such
as single heads and neurons and poor for large ones (the residual stream at the subject's tokens, early
layers) or where the metric saturates (``prob`` near 1). Under ``kl`` when noising, the gradient at the clean
run is zero (KL's minimum): every estimate is 0. :func:`agreement` measures how far to trust it against exact
patching where both were run.

>>> import mechedit
>>> from mechedit.tracing import attribution_patching, activation_patching, agreement
>>> m = mechedit.load()
>>> clean, corrupted = "Voupeis Draexmir was born in the city of", "Lodum Fideth was born in the city of"
>>> est = attribution_patching(m, clean, corrupted, components=("z", "mlp_post"))
>>> exact = activation_patching(m, clean, corrupted, components=("z",))
>>> agreement(est, exact).to_frame()                        # Spearman and top-k overlap per component
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from mechedit.errors import InputError
from mechedit.model import LoadedModel
from mechedit.results import JsonResult
from mechedit.sites import Site
from mechedit.tracing.patching import (
    Component, Contrast, PatchingConfig, SiteScores, axis_sizes, base_and_source, check_components, normalise,
    patched_hooks, prepare_contrast, resolve_config, site_scores_fields,
)

FORMAT = "mechedit.attribution/1"
AGREEMENT_FORMAT = "mechedit.attribution_agreement/1"


@dataclass(frozen=True, eq=False)
class AttributionResult(SiteScores):
    """What :func:`attribution_patching` estimated: the fields, axes and normalisation of a
    :class:`~mechedit.tracing.patching.PatchingResult`, with ``values`` the *estimated* metric after each patch.
    ``config.batch_size`` is not used."""

    FORMAT: ClassVar[str] = FORMAT

    def plot(self):
        from mechedit.viz.attribution import plot_attribution

        return plot_attribution(self)


def attribution_patching(model: LoadedModel, clean_prompt: str, corrupted_prompt: str | None = None, *,
                         subject: str | None = None, target: str | None = None, foil: str | None = None,
                         components: Sequence[str] | None = None,
                         config: PatchingConfig = PatchingConfig()) -> AttributionResult:
    """Estimate every activation patch of ``components`` from one gradient.

    Arguments are those of :func:`~mechedit.tracing.patching.activation_patching` (same prompts, answer, foil,
    components, direction, metric, noise). Under noise every sample's run is differentiated (one batch) and the
    estimates are averaged over samples, as exact patching averages its metric.

    Returns:
        An :class:`AttributionResult`; ``scores[c]`` has the axes of ``COMPONENTS[c]``.
    """
    config = resolve_config(config, components)
    comps = check_components(model, config)
    base, source = base_and_source(config.direction)
    names = patched_hooks(model, comps, config)
    c = prepare_contrast(model, clean_prompt, corrupted_prompt, subject=subject, target=target, foil=foil,
                         config=config, cache={"clean": names, "corrupted": names}, grad_side=base)
    grads = _gradients(c, base, names)  # hook -> (R_base, T, ...)
    base_metric = c.metric_of(base)
    values = {}
    for comp in comps:
        est = _estimate(model, comp, c, base, source, grads, config)  # (n_layers, *axes)
        values[comp.name] = base_metric + est
    clean, corrupted = c.metric_of("clean"), c.metric_of("corrupted")
    scores = {k: normalise(v, clean, corrupted) for k, v in values.items()}
    return AttributionResult(**site_scores_fields(model, c, config, scores, values, clean_prompt, corrupted_prompt))


def _gradients(c: Contrast, base: str, names: list[str]) -> dict[str, torch.Tensor]:
    """∂(sum of the base rows' metric)/∂activation for every hook: each row's gradient of its own metric (the
    rows are independent runs). ``torch.autograd.grad`` leaves the weights' ``.grad`` untouched."""
    acts = [c.acts[base][n] for n in names]
    total = c.values[base].sum()
    grads = torch.autograd.grad(total, acts, allow_unused=True)
    return {n: (torch.zeros_like(a) if g is None else g).detach() for n, a, g in zip(names, acts, grads)}


def _estimate(model: LoadedModel, comp: Component, c: Contrast, base: str, source: str,
              grads: dict[str, torch.Tensor], config: PatchingConfig) -> torch.Tensor:
    """grad · (source − base) summed over each entry's patched slice, averaged over noise samples:
    (n_layers, *axis sizes), NaN in layers and heads not asked for."""
    n_tokens = len(c.prompt.input_ids)
    out = torch.full((model.n_layers, *axis_sizes(model, comp, n_tokens)), float("nan"))
    layers = config.layers if config.layers is not None else range(model.n_layers)
    kept = sorted(comp.act_dims)  # activation axes that survive the sum, in activation order
    for layer in sorted(set(layers)):
        hook = Site(layer, comp.site).hook_name
        a_base, a_src = c.acts[base][hook].detach(), c.acts[source][hook]  # (R_base, ...), (R_src, ...)
        prod = (grads[hook] * (a_src - a_base)).float()  # (S, ...): one side has S rows, the other 1
        summed = [d + 1 for d in range(prod.dim() - 1) if d not in comp.act_dims]
        per = prod.sum(dim=summed) if summed else prod  # (S, *kept axes in activation order)
        per = per.permute(0, *(1 + kept.index(d) for d in comp.act_dims))  # (S, *score axes)
        out[layer] = per.mean(dim=0).cpu()
    if config.heads is not None and "head" in comp.axes:
        axis = 1 + comp.axes.index("head")
        drop = [h for h in range(out.shape[axis]) if h not in set(config.heads)]
        out.index_fill_(axis, torch.tensor(drop, dtype=torch.long), float("nan"))
    return out


# -- agreement with exact patching ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentAgreement:
    """How well attribution patching ranked one component's entries, against exact activation patching."""

    component: str
    n: int  # entries compared (finite in both)
    spearman: float  # rank correlation of the two scores (ties averaged); NaN with fewer than 2 entries
    k: int  # size of the top sets compared
    top_k_overlap: float  # |top-k by estimate ∩ top-k by exact| / k, ranking by effect
    max_abs_diff: float  # largest |estimate - exact| of the normalised scores


@dataclass(frozen=True, eq=False)
class AgreementReport(JsonResult):
    """:func:`agreement`'s answer, per component present in both results."""

    FORMAT: ClassVar[str] = AGREEMENT_FORMAT

    components: dict[str, ComponentAgreement]
    estimate: dict[str, torch.Tensor]  # component -> attribution scores of the compared entries (flat)
    exact: dict[str, torch.Tensor]  # component -> exact patching scores of the same entries (flat)
    direction: str
    metric: str
    model_name: str
    model_fingerprint: str
    extra: dict = field(default_factory=dict)

    def to_frame(self):
        """One row per component: component, n, spearman, k, top_k_overlap, max_abs_diff."""
        import pandas as pd

        cols = [f.name for f in fields(ComponentAgreement)]
        return pd.DataFrame([[getattr(a, col) for col in cols] for a in self.components.values()], columns=cols)

    def plot(self):
        """Estimate against exact score, one scatter panel per component (a plotly Figure)."""
        from mechedit.viz.attribution import plot_agreement

        return plot_agreement(self)

    def to_json_dict(self) -> dict:
        return {
            "components": {k: {f.name: _finite(getattr(a, f.name)) for f in fields(a)}
                           for k, a in self.components.items()},
            "estimate": {k: v.tolist() for k, v in self.estimate.items()},
            "exact": {k: v.tolist() for k, v in self.exact.items()},
            "direction": self.direction, "metric": self.metric, "model_name": self.model_name,
            "model_fingerprint": self.model_fingerprint, "extra": self.extra,
        }

    @classmethod
    def from_json_dict(cls, d: dict) -> "AgreementReport":
        comps = {k: ComponentAgreement(**{f: (float("nan") if v is None else v) for f, v in a.items()})
                 for k, a in d["components"].items()}
        return cls(components=comps,
                   estimate={k: torch.tensor(v, dtype=torch.float32) for k, v in d["estimate"].items()},
                   exact={k: torch.tensor(v, dtype=torch.float32) for k, v in d["exact"].items()},
                   direction=d["direction"], metric=d["metric"], model_name=d["model_name"],
                   model_fingerprint=d["model_fingerprint"], extra=d.get("extra", {}))


def agreement(attribution: AttributionResult, exact: SiteScores, k: int | None = None) -> AgreementReport:
    """Compare attribution estimates with exact patching, per component present in both.

    Both must come from the same model, prompts, answer, direction and metric. Entries NaN in either (layers or
    heads not patched) are left out.

    Args:
        k: size of the top sets compared (default: ``exact.config.top_k``; capped at the entries compared).
    """
    if not isinstance(attribution, AttributionResult) or not isinstance(exact, SiteScores):
        raise InputError("agreement(attribution, exact) takes an AttributionResult and a PatchingResult")
    for what in ("direction", "metric"):
        a, e = getattr(attribution.config, what), getattr(exact.config, what)
        if a != e:
            raise InputError(f"the two results use different {what}s ({a!r} and {e!r}); run both with the same")
    for what in ("model_fingerprint", "tokens", "corrupted_tokens", "answer_ids", "foil_id"):
        if getattr(attribution, what) != getattr(exact, what):
            raise InputError(f"the two results differ in {what.replace('_', ' ')}: they do not estimate the same "
                             "patches; run both on the same model, prompts, answer and foil")
    common = [name for name in exact.scores if name in attribution.scores]
    if not common:
        raise InputError(f"no component in both results: attribution has {list(attribution.scores)}, exact "
                         f"patching {list(exact.scores)}")
    k = exact.config.top_k if k is None else k
    if not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    rows, est_out, exact_out = {}, {}, {}
    for name in common:
        a, e = attribution.effect(name).flatten(), exact.effect(name).flatten()  # higher = matters more
        ok = a.isfinite() & e.isfinite()
        a, e = a[ok].double(), e[ok].double()
        kk = min(k, len(a))
        top_a = set(a.argsort(descending=True, stable=True)[:kk].tolist())
        top_e = set(e.argsort(descending=True, stable=True)[:kk].tolist())
        rows[name] = ComponentAgreement(
            component=name, n=len(a), spearman=spearman(a, e), k=kk,
            top_k_overlap=len(top_a & top_e) / kk if kk else float("nan"),
            max_abs_diff=float((a - e).abs().max()) if len(a) else float("nan"),
        )
        est_out[name] = attribution.scores[name].flatten()[ok].float()
        exact_out[name] = exact.scores[name].flatten()[ok].float()
    return AgreementReport(components=rows, estimate=est_out, exact=exact_out, direction=exact.config.direction,
                           metric=exact.config.metric, model_name=exact.model_name,
                           model_fingerprint=exact.model_fingerprint)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (ties get their average rank); NaN when either is constant
    or has fewer than 2 entries."""
    if len(a) < 2:
        return float("nan")
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of ``x`` (n,), tied values sharing their average rank."""
    order = x.argsort(stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    _, inverse = torch.unique(x, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    sums = torch.zeros(n_groups, dtype=x.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros(n_groups, dtype=x.dtype).index_add_(0, inverse, torch.ones_like(x))
    return (sums / counts)[inverse]


def _finite(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v
