"""ROME: Rank-One Model Editing (Meng, Bau, Andonian and Belinkov, "Locating and Editing Factual Associations in
GPT", NeurIPS 2022, https://rome.baulab.info), with the r-ROME correction (Gupta, Sajnani and Anumanchipalli,
"Rebuilding ROME", 2024).

ROME reads the MLP output projection ``W`` of one layer as a key-value memory and writes one new association:
the key ``k*`` of the subject (:mod:`.compute_u`) should now give a value ``v*`` that makes the model say the new
target (:mod:`.compute_v`). The least-disturbing rank-one change that does it, with ``C`` the second moment of
ordinary keys (:mod:`.layer_stats`) and ``u = C⁻¹k* / ‖C⁻¹k*‖``, is (in (in, out) layout)

    ΔW = u ⊗ δ / (k* · u)            so that   (W + ΔW) applied to k* = W k* + δ = v*

where ``δ`` is the optimised change of the MLP output. Original ROME put the *bare prompt's* key in the
denominator but the *prefix-averaged* key into ``u``; r-ROME uses the averaged key in both places
(``consistent_keys=True``, the default), which removes the occasional exploding update ("model collapse").
(r-ROME's reference code also re-bases ``v*`` on the bare prompt's output; here ``v* = W k* + δ``: exactly the
change the optimisation asked for, applied at the key it was written for.)

Two options, both off by default: ``update_key="bare"`` builds ``u`` and the denominator on the bare prompt's
key instead of the averaged one (consistently), so the edit prompt gets exactly ``v*``; ``mom2_update_weight``
``λ > 0`` writes ``δ · g / (λ + g)``, ``g = k*ᵀC⁻¹k*`` - MEMIT's covariance-weighted solve for a single key
(``ΔW = u ⊗ δ g / ((λ + g) k* · u)``), which writes less where the key resembles many ordinary keys.

GPT-2's ``Conv1D`` (weight stored (in, out)) and ``nn.Linear`` ((out, in)) are handled by
:func:`mechedit.arch.linear_weight_in_out` through the architecture table. The update is checked before any
weight changes: a tiny denominator, a norm out of proportion with ``W`` or a non-finite value is refused.

>>> import mechedit
>>> from mechedit.editing import rome
>>> m = mechedit.load()                                                          # doctest: +SKIP
>>> req = mechedit.EditRecord(0, "{} was born in the city of", "Dalo Frenwick", "Lisbon")  # doctest: +SKIP
>>> with rome(m, req) as edit:                                                   # doctest: +SKIP
...     print(edit.evidence["layer"], edit.evidence["target_prob"])
"""

from __future__ import annotations

import time
import weakref
from dataclasses import replace
from collections.abc import Callable

import torch

from mechedit.arch import linear_weight_in_out
from mechedit.data import EditRecord
from mechedit.editing.handle import EditHandle
from mechedit.editing.rome.compute_u import compute_keys, compute_u, whiten
from mechedit.editing.rome.compute_v import compute_v
from mechedit.editing.rome.hparams import ROMEHyperParams
from mechedit.editing.rome.layer_choice import choose_layer
from mechedit.editing.rome.layer_stats import LayerStats, describe, layer_stats
from mechedit.errors import InputError, MecheditError
from mechedit.model import LoadedModel
from mechedit.tracing.common import prepare_prompt

Progress = Callable[[str, int, int], None]  # (stage, done, total); stages: "trace", "stats", "value"


def rome(model: LoadedModel, request: EditRecord, hparams: ROMEHyperParams | None = None,
         progress: Progress | None = None, *, stats: LayerStats | None = None) -> EditHandle:
    """Edit ``model`` in place so that ``request.prompt`` continues with ``request.target_new``.

    Args:
        request: the edit (its ``template``, ``subject`` and ``target_new``; ``target_true``, when known, is
            what ``layer="fact"`` traces and must differ from the new target).
        hparams: see :class:`ROMEHyperParams`; None: the defaults for this model (the class's, with the model's
            own ``mechedit-hparams.json`` entries applied: :func:`mechedit.editing.methods.make_hparams`).
        progress: called with (stage, done, total) for the slow stages: ``"trace"`` (layer="auto" or "fact", when not cached), ``"stats"``
            (key statistics, when not cached) and ``"value"`` (optimisation steps).
        stats: key statistics of the edit layer to use instead of reading/computing them from
            ``hparams.mom2_source`` (e.g. from :func:`layer_stats` on your own list of texts).
    Returns:
        An applied :class:`EditHandle` (``restore()`` it, or use it as a context manager).
    Raises:
        InputError: unusable request or layer; MecheditError: a degenerate update. The weights are untouched.
    """
    started = time.perf_counter()
    if not isinstance(request, EditRecord):
        raise InputError(f"request must be an EditRecord, got {type(request).__name__}; build one with "
                         "EditRecord(case_id, template, subject, target_new) or EditRecord.from_dict(d)")
    if hparams is None:
        from mechedit.editing.methods import make_hparams

        hparams = make_hparams("rome", None, model)
    if not isinstance(hparams, ROMEHyperParams):
        raise InputError(f"hparams must be a ROMEHyperParams, got {type(hparams).__name__}")
    fingerprint = model.fingerprint()
    _check_request(model, request)
    layer, layer_evidence = choose_layer(model, request, hparams, progress)

    if hparams.mom2_adjustment and stats is None:
        stats = layer_stats(model, layer, hparams.mom2_source, hparams.mom2_n_samples,
                            max_tokens=hparams.mom2_max_tokens, seed=hparams.seed, top_k=hparams.prefix_top_k,
                            progress=(lambda d, t: progress("stats", d, t)) if progress else None)
    if stats is not None and stats.layer != layer:
        raise InputError(f"the statistics given are for layer {stats.layer}, but the edit is at layer {layer}")
    if not hparams.mom2_adjustment:
        stats = None

    templates = context_templates(model, hparams)
    keys = compute_keys(model, request, layer, templates, hparams.key_position)
    k_star = keys.bare if hparams.update_key == "bare" else keys.mean
    u = compute_u(k_star, stats)  # (d_mlp,) float64, unit norm
    k = (k_star if hparams.consistent_keys else keys.bare).double().cpu()  # (d_mlp,): the key written to
    g = float(k @ whiten(k, stats)) if hparams.mom2_update_weight else None  # kᵀC⁻¹k
    share = 1.0 if g is None else g / (hparams.mom2_update_weight + g)  # of δ written at k (MEMIT's λ weighting)
    weight = model.module(layer, "mlp_out").weight
    clamp, tries = hparams.clamp_norm_factor, []
    while True:
        value = compute_v(model, request, layer, templates, replace(hparams, clamp_norm_factor=clamp),
                          progress=(lambda d, t: progress("value", d, t)) if progress else None)
        update, denominator, alignment, ratio = _rank_one(value.delta * share, k, u, weight, model.conv1d, layer,
                                                          hparams)
        if hparams.clamp_norm_max is None or clamp >= hparams.clamp_norm_max or not value.on_clamp(clamp):
            break
        took = _edited_prob(model, request, weight, update)  # the bare prompt, through the real update
        tries.append({"clamp_norm_factor": clamp, "edited_prob": took})
        if took >= hparams.clamp_retry_prob:
            break
        clamp = min(2 * clamp, hparams.clamp_norm_max)  # the edit did not take inside the ball: widen it
    delta = value.delta.double().cpu()

    name = model.module_name(layer, "mlp_out") + ".weight"
    evidence = {
        **layer_evidence,
        "module": model.module_name(layer, "mlp_out"),
        "key_position": hparams.key_position, "key_token": keys.token, "key_positions": list(keys.positions),
        "templates": templates,
        "consistent_keys": hparams.consistent_keys, "update_key": hparams.update_key,
        "whitened_key_sq_norm": g, "written_share": share,
        "denominator": denominator, "key_alignment": alignment,
        "delta_norm": float(delta.norm()), "value_norm": float(value.v_init.norm()),
        "update_norm": float(update.double().norm()), "update_ratio": ratio,
        "target_prob": value.target_prob, "clamp_norm_factor": clamp, "clamp_tries": tries,
        "v_steps": len(value.losses), "v_losses": value.losses,
        "stats": describe(stats) if stats is not None else None,
        "seconds": round(time.perf_counter() - started, 4),
    }
    handle = EditHandle(method="rome", deltas={name: update}, hparams=hparams.to_dict(),
                        requests=[request.to_dict()], model_name=model.name, model_fingerprint=fingerprint,
                        evidence=evidence)
    handle._apply_checked(model)  # this very model, unchanged since `fingerprint` was taken
    return handle


def _rank_one(delta: torch.Tensor, k: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, conv1d: bool, layer: int,
              hparams: ROMEHyperParams) -> tuple[torch.Tensor, float, float, float]:
    """ΔW = u ⊗ δ / (k · u) in the weight's own layout, with (denominator, alignment, ‖ΔW‖/‖W‖); a degenerate
    update raises (nothing has been changed)."""
    delta = delta.double().cpu()  # (d_model,)
    denominator = float(k @ u)
    alignment = denominator / max(float(k.norm()), 1e-30)  # cosine of k and C⁻¹k
    if not alignment > hparams.min_key_alignment:
        raise MecheditError(
            f"degenerate ROME update at layer {layer}: the denominator k·u is {denominator:.3g} (cosine "
            f"{alignment:.3g} between the key and C⁻¹k, below min_key_alignment={hparams.min_key_alignment}); "
            "the key statistics are probably too few or ill-conditioned. Nothing was changed")
    update = torch.zeros_like(weight)
    linear_weight_in_out(update, conv1d).copy_(torch.outer(u, delta / denominator).to(weight.dtype))
    ratio = float(update.double().norm() / weight.detach().double().norm().clamp_min(1e-30))
    if not torch.isfinite(update).all() or not torch.isfinite(torch.tensor(ratio)):
        raise MecheditError(f"degenerate ROME update at layer {layer}: non-finite values. Nothing was changed")
    if ratio > hparams.max_update_ratio:
        raise MecheditError(
            f"degenerate ROME update at layer {layer}: ‖ΔW‖ is {ratio:.3g}× ‖W‖ (max_update_ratio="
            f"{hparams.max_update_ratio}), an exploding update. Nothing was changed")
    return update, denominator, alignment, ratio


@torch.no_grad()
def _edited_prob(model: LoadedModel, request: EditRecord, weight: torch.Tensor, update: torch.Tensor) -> float:
    """The new target's probability (geometric mean over its tokens) on the bare prompt with ``update`` added to
    ``weight``; the weight is put back bit-exactly."""
    p = prepare_prompt(model, request.prompt, request.subject, request.target_new)
    ids = torch.tensor([p.input_ids], device=model.device)
    saved = weight.detach().clone()
    try:
        weight.data.add_(update)
        lp = model.hf_model(input_ids=ids).logits[0].float().log_softmax(-1)  # (T, V)
    finally:
        weight.data.copy_(saved)
    return float(torch.stack([lp[pos, tok] for pos, tok in zip(p.answer_positions, p.answer_ids)]).mean().exp())


# Sampled context templates per model (dropped with the model), keyed by the weights' fingerprint and the sampling
# hparams: sampling ~20 prefixes costs more than the rest of a small model's edit, and the same weights with the
# same seed always sample the same text. At most _TEMPLATE_CACHE_SIZE entries per model (sequential edits change
# the fingerprint each time).
_TEMPLATE_CACHE: weakref.WeakKeyDictionary[LoadedModel, dict[tuple, tuple[str, ...]]] = weakref.WeakKeyDictionary()
_TEMPLATE_CACHE_SIZE = 8


def context_templates(model: LoadedModel, hparams: ROMEHyperParams) -> list[str]:
    """``"{}"`` (the bare prompt) followed by one template per context prefix: the given ``context_prefixes``
    (``"<prefix> {}"``), or text sampled from the model as ROME does (``"<text>. {}"``; top-k sampling from BOS,
    ``prefix_lengths`` (tokens, count) groups). Braces are removed from prefixes.

    Sampled templates are remembered for this model object while its weights stay the same (ROME itself samples
    them once per run); a weight change, or other sampling hparams, samples afresh."""
    if hparams.context_prefixes is not None:
        prefixes = [p.replace("{", "").replace("}", "").strip() for p in hparams.context_prefixes]
        return ["{}"] + [f"{p} {{}}" for p in prefixes if p]
    key = (model.fingerprint(), hparams.prefix_lengths, hparams.prefix_top_k, hparams.seed)
    cache = _TEMPLATE_CACHE.setdefault(model, {})
    if key not in cache:
        if len(cache) >= _TEMPLATE_CACHE_SIZE:
            cache.pop(next(iter(cache)))  # the oldest
        cache[key] = tuple(_sample_templates(model, hparams))
    return list(cache[key])


def _sample_templates(model: LoadedModel, hparams: ROMEHyperParams) -> list[str]:
    from mechedit.editing.generate import sample_texts

    templates = ["{}"]
    for group, (length, count) in enumerate(hparams.prefix_lengths):
        for text in sample_texts(model, count, length, top_k=hparams.prefix_top_k,
                                 seed=hparams.seed * 7919 + group):
            text = text.replace("{", "").replace("}", "").strip()
            if text:
                templates.append(f"{text}. {{}}")
    return templates


def _check_request(model: LoadedModel, request: EditRecord) -> None:
    """Refuse a request that cannot be an edit: new target = true target, or = what the model already says."""
    if request.target_true is not None and request.target_new.strip() == request.target_true.strip():
        raise InputError(f"the new target {request.target_new!r} is the true target; nothing to edit")
    p = prepare_prompt(model, request.prompt, request.subject, request.target_new)
    with torch.no_grad():
        logits = model.bridge(torch.tensor([p.input_ids], device=model.device))  # (1, T, V)
    greedy = logits[0, p.answer_positions].argmax(dim=-1).tolist()
    if greedy == list(p.answer_ids):
        raise InputError(f"the model already answers {p.answer!r} to {request.prompt!r}; choose a different "
                         "new target")
