"""MEMIT: Mass-Editing Memory in a Transformer (Meng, Sen Sharma, Andonian, Belinkov and Bau, ICLR 2023,
https://memit.baulab.info).

ROME writes one fact into one layer. MEMIT writes many facts at once into a range of MLP layers ``l_1 < … < L``:

1. for every request, the residual stream after ``L`` at the subject's last token should become ``z_i``
   (:mod:`.compute_zs`, one batched optimisation for all requests);
2. for each layer ``l`` in turn, with the keys ``K`` (n, d_mlp) of that layer (:mod:`.compute_ks`, read on the
   model as already updated in the layers below) and the residual still missing ``R = (z - z_now) / (layers
   left)``, the output projection gets the covariance-weighted least-squares update (in (in, out) layout,
   ``ΔW_io = ΔWᵀ``)

       ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹          ⇔          ΔW_io = (λ C + Kᵀ K)⁻¹ Kᵀ R

   which makes ``W k_i`` move by ``r_i`` as far as it can while changing the outputs of ordinary keys (second
   moment ``C``, :mod:`mechedit.editing.rome.layer_stats`, weighted by ``λ = mom2_update_weight``) least. Dividing
   by the layers left spreads the change evenly over the range.

Nothing is left changed unless the whole edit succeeds: the layer updates are written into the model one by one
(later layers' keys must see the earlier layers' updates, as in MEMIT), each checked first (finite, ‖ΔW‖/‖W‖
below ``max_update_ratio``), and the original weights are copied back in a ``finally`` before the finished
deltas are applied through the :class:`~mechedit.editing.EditHandle` (so ``restore()`` is bit-exact and a
saved handle re-applied gives the same weights).

>>> import mechedit
>>> from mechedit.editing.memit import memit, MEMITHyperParams
>>> from mechedit.toy.export import embedded_world, world_records
>>> m = mechedit.load()                                                          # doctest: +SKIP
>>> reqs = world_records(embedded_world(), n=100)                               # doctest: +SKIP
>>> with memit(m, reqs, MEMITHyperParams(layers=(0, 1, 2))) as edit:            # doctest: +SKIP
...     print(edit.evidence["target_prob_mean"])
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from mechedit.arch import linear_weight_in_out
from mechedit.data import EditRecord
from mechedit.editing.handle import EditHandle
from mechedit.editing.memit.compute_ks import Prepared, prepare, read_resid, read_template_keys
from mechedit.editing.memit.compute_zs import Values, compute_zs
from mechedit.editing.memit.hparams import MEMITHyperParams
from mechedit.editing.rome.layer_stats import LayerStats, describe, layer_stats
from mechedit.editing.rome.rome_main import context_templates
from mechedit.errors import InputError, MecheditError
from mechedit.model import LoadedModel

Progress = Callable[[str, int, int], None]  # (stage, done, total): "trace", "stats", "value", "layers"
# (layer index in the range, layer, K (n, d_mlp) float64, R (n, d_model) float64) -> ΔW_io (d_mlp, d_model) float64
Solver = Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor]


DEFAULTS = MEMITHyperParams()


def memit(model: LoadedModel, requests: Sequence[EditRecord], hparams: MEMITHyperParams = DEFAULTS,
          progress: Progress | None = None, *, stats: dict[int, LayerStats] | None = None) -> EditHandle:
    """Edit ``model`` in place so that every request's prompt continues with its ``target_new``.

    Args:
        requests: a non-empty list of :class:`EditRecord`. Two requests with the same subject and template but
            different new targets contradict each other and are refused.
        stats: key statistics per layer to use instead of reading/computing them from ``hparams.mom2_source``.
    Returns:
        One applied :class:`EditHandle` (method ``"memit"``) with a delta on every edited layer's MLP output
        projection.
    Raises:
        InputError: unusable requests or layers; MecheditError: a degenerate update. The weights are untouched.
    """
    started = time.perf_counter()
    if not isinstance(hparams, MEMITHyperParams):
        raise InputError(f"hparams must be a MEMITHyperParams, got {type(hparams).__name__}")
    requests = check_requests(requests)
    fingerprint = model.fingerprint()
    layers, layer_evidence = choose_layers(model, requests, hparams, progress)
    stats = layer_statistics(model, layers, hparams, progress, stats)
    templates = context_templates(model, hparams)
    prep = prepare(model, requests, templates, hparams.key_position)
    z_init = read_resid(model, prep, layers[-1])
    values = compute_zs(model, prep, layers[-1], z_init, hparams,
                        progress=(lambda d, t: progress("value", d, t)) if progress else None)

    def solve(i: int, layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        C = stats[layer].mom2.double() if stats is not None else torch.eye(K.shape[1], dtype=torch.float64)
        return torch.linalg.solve(hparams.mom2_update_weight * C + K.T @ K, K.T @ R)  # (d_mlp, d_model)

    snapshot = Snapshot(model, layers)
    try:
        deltas, layer_notes = spread(model, prep, layers, values, solve, hparams.max_update_ratio, progress)
        z_after = read_resid(model, prep, layers[-1])
    finally:
        snapshot.restore()
    evidence = {
        **layer_evidence,
        "modules": [model.module_name(layer, "mlp_out") for layer in layers],
        "n_requests": len(requests), "templates": list(templates), "key_position": hparams.key_position,
        **value_evidence(values, z_after),
        "per_layer": layer_notes,
        "stats": {str(k): describe(v) for k, v in stats.items()} if stats is not None else None,
        "seconds": round(time.perf_counter() - started, 4),
    }
    handle = EditHandle(method="memit", deltas=deltas, hparams=hparams.to_dict(),
                        requests=[r.to_dict() for r in requests], model_name=model.name,
                        model_fingerprint=fingerprint, evidence=evidence)
    handle._apply_checked(model)
    return handle


# -- pieces shared with AlphaEdit (mechedit.editing.sequential) ----------------------------------------------------


def check_requests(requests) -> list[EditRecord]:
    """A non-empty list of EditRecords, without a request whose new target is its true one and without two that
    ask for different new targets of the same prompt."""
    if isinstance(requests, EditRecord) or not isinstance(requests, (list, tuple)) or not requests:
        raise InputError("requests must be a non-empty list of EditRecords")
    seen: dict[str, tuple] = {}
    for r in requests:
        if not isinstance(r, EditRecord):
            raise InputError(f"requests must be EditRecords, got a {type(r).__name__}")
        if r.target_true is not None and r.target_new.strip() == r.target_true.strip():
            raise InputError(f"request {r.case_id}: the new target {r.target_new!r} is the true target; nothing to "
                             "edit")
        other = seen.setdefault(r.prompt, (r.case_id, r.target_new))
        if other[1].strip() != r.target_new.strip():
            raise InputError(f"requests {other[0]} and {r.case_id} ask {r.prompt!r} to continue with both "
                             f"{other[1]!r} and {r.target_new!r}; drop one of them")
    return list(requests)


def choose_layers(model: LoadedModel, requests: Sequence[EditRecord], hparams: MEMITHyperParams,
                  progress: Progress | None = None) -> tuple[tuple[int, ...], dict]:
    """The edited layers and the evidence for them (see ``MEMITHyperParams.layers``)."""
    if hparams.layers != "auto":
        bad = [layer for layer in hparams.layers if not 0 <= layer < model.n_layers]
        if bad:
            raise InputError(f"layer(s) {bad} out of range; the model has layers 0..{model.n_layers - 1}")
        return tuple(hparams.layers), {"layers": list(hparams.layers), "layer_choice": "given"}
    from mechedit.tracing import CausalTraceConfig, causal_trace

    width = min(hparams.auto_width, model.n_layers)
    config = CausalTraceConfig(kinds=("mlp",), window=max(1, round(model.n_layers / 5)))
    traced = requests[:hparams.auto_trace_requests]
    effects = []
    for k, r in enumerate(traced):
        trace = causal_trace(model, r.prompt, r.subject, r.target_true, config)
        effects.append(trace.scores["mlp"][:, trace.subject_range[1] - 1] - trace.low_score)  # (n_layers,)
        if progress is not None:
            progress("trace", k + 1, len(traced))
    mean = torch.stack(effects).mean(dim=0)
    sums = [float(mean[s:s + width].sum()) for s in range(model.n_layers - width + 1)]
    start = max(range(len(sums)), key=sums.__getitem__)
    layers = tuple(range(start, start + width))
    return layers, {"layers": list(layers),
                    "layer_choice": f"auto: the {width} consecutive layers with the largest mean MLP causal-trace "
                                    f"effect at the subject's last token over {len(traced)} request(s)",
                    "trace_effect": [float(e) for e in mean], "trace_window": config.window}


def layer_statistics(model: LoadedModel, layers: Sequence[int], hparams, progress: Progress | None,
                     given: dict[int, LayerStats] | None) -> dict[int, LayerStats] | None:
    """Key statistics of each layer of the *unedited* model (read before anything is written: an update of a
    lower layer changes the keys - and the cache key - of the layers above)."""
    if not hparams.mom2_adjustment:
        return None
    out = {}
    for layer in layers:
        if given is not None and layer in given:
            s = given[layer]
            if s.layer != layer:
                raise InputError(f"the statistics given for layer {layer} are for layer {s.layer}")
        else:
            s = layer_stats(model, layer, hparams.mom2_source, hparams.mom2_n_samples,
                            max_tokens=hparams.mom2_max_tokens, seed=hparams.seed, top_k=hparams.prefix_top_k,
                            progress=(lambda d, t: progress("stats", d, t)) if progress else None)
        if s.mom2.shape != (model.d_mlp, model.d_mlp):
            raise InputError(f"the statistics for layer {layer} have shape {tuple(s.mom2.shape)}; the model's keys "
                             f"are {model.d_mlp} wide")
        out[layer] = s
    return out


class Snapshot:
    """Exact copies of the MLP output projections of ``layers``; :meth:`restore` copies them back."""

    def __init__(self, model: LoadedModel, layers: Sequence[int]):
        self.params = {model.module_name(layer, "mlp_out") + ".weight": model.module(layer, "mlp_out").weight
                       for layer in layers}
        self.originals = {n: p.detach().clone() for n, p in self.params.items()}

    def changes(self) -> dict[str, torch.Tensor]:
        """``{parameter name: now - original}`` for every snapshotted parameter."""
        return {n: (p.detach() - self.originals[n]).clone() for n, p in self.params.items()}

    def change_in_out(self, model: LoadedModel, layer: int) -> torch.Tensor:
        """``now - original`` of ``layer``'s output projection as (d_mlp, d_model), whatever its layout."""
        name = model.module_name(layer, "mlp_out") + ".weight"
        return linear_weight_in_out(self.params[name].detach() - self.originals[name], model.conv1d)

    def restore(self) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.originals[n])


def spread(model: LoadedModel, prep: Prepared, layers: Sequence[int], values: Values, solve: Solver,
           max_update_ratio: float, progress: Progress | None = None,
           on_layer: Callable[[int, int, torch.Tensor], None] | None = None) -> tuple[dict, list[dict]]:
    """Write the residual ``z - z_now`` into ``layers`` one by one (``solve`` gives each layer's ΔW_io from its
    keys and its share of the residual). Each update is checked, then **added to the model** (the caller
    snapshots and restores). Returns ``{parameter name: delta}`` and per-layer notes. ``on_layer(i, layer, Kt)``
    is called after each layer's update with the keys it was solved from, per template: ``Kt`` (n, n_templates,
    d_mlp), whose mean over templates is the ``K`` given to ``solve``."""
    z = values.z  # (n, d_model) float64
    deltas, notes = {}, []
    for i, layer in enumerate(layers):
        Kt = read_template_keys(model, prep, layer)  # (n, n_templates, d_mlp), on the model as updated so far
        K = Kt.mean(dim=1)  # (n, d_mlp)
        missing = z - read_resid(model, prep, layers[-1])  # (n, d_model)
        R = missing / (len(layers) - i)
        upd = solve(i, layer, K, R)  # (d_mlp, d_model) float64
        weight = model.module(layer, "mlp_out").weight
        delta = torch.zeros_like(weight)
        linear_weight_in_out(delta, model.conv1d).copy_(upd.to(weight.dtype))
        ratio = float(upd.norm() / weight.detach().double().norm().clamp_min(1e-30))
        if not (torch.isfinite(upd).all() and torch.isfinite(delta).all()):
            raise MecheditError(f"degenerate update at layer {layer}: non-finite values. Nothing was changed")
        if ratio > max_update_ratio:
            raise MecheditError(f"degenerate update at layer {layer}: ‖ΔW‖ is {ratio:.3g}× ‖W‖ (max_update_ratio="
                                f"{max_update_ratio}), an exploding update. Nothing was changed")
        with torch.no_grad():
            weight.add_(delta)
        name = model.module_name(layer, "mlp_out") + ".weight"
        deltas[name] = delta
        achieved = (K @ upd)  # (n, d_model): what this layer adds at the keys
        notes.append({"layer": layer, "key_norm_mean": float(K.norm(dim=1).mean()),
                      "missing_norm_mean": float(missing.norm(dim=1).mean()),
                      "asked_norm_mean": float(R.norm(dim=1).mean()),
                      "written_norm_mean": float(achieved.norm(dim=1).mean()),
                      "update_norm": float(upd.norm()), "update_ratio": ratio})
        if on_layer is not None:
            on_layer(i, layer, Kt)
        if progress is not None:
            progress("layers", i + 1, len(layers))
    return deltas, notes


def value_evidence(values: Values, z_after: torch.Tensor) -> dict:
    """Summary of the value optimisation and of how much of it the weights carry."""
    asked = values.delta.double().norm(dim=1).clamp_min(1e-30)
    left = (values.z - z_after).norm(dim=1)
    return {"target_prob_mean": float(values.target_prob.mean()), "target_prob_min": float(values.target_prob.min()),
            "v_loss_mean": float(values.loss.mean()), "v_steps_max": int(values.steps.max()),
            "v_steps_mean": float(values.steps.float().mean()),
            "delta_norm_mean": float(values.delta.norm(dim=1).mean()),
            "z_norm_mean": float(values.z_init.norm(dim=1).mean()),
            "residual_left_fraction_mean": float((left / asked).mean())}
