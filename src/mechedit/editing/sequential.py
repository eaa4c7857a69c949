"""Sequential editing: many edits one after another, each made on the already-edited model.

Real use edits a model again and again. Three ways are here:

* :func:`sequential_rome` applies ROME (:func:`mechedit.editing.rome.rome`) once per request, each edit computed
  on the model as the previous ones left it. Each rank-one update only protects ordinary keys (through ``C``),
  not the facts written before it, so early edits are overwritten and the model drifts as edits pile up (Gupta
  et al. 2024, "Model editing at scale leads to gradual and catastrophic forgetting").
* :func:`alphaedit` (Fang et al., ICLR 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing for Language
  Models") makes each step a MEMIT update (:mod:`mechedit.editing.memit`: values optimised at the last layer of a
  range, spread over the range) whose change is confined to the *null space* of the preserved keys ``K₀``. With
  ``P`` the projector onto the eigenvectors of ``C = K₀K₀ᵀ/n`` whose eigenvalues are (nearly) zero, every update
  has the form ``ΔW = Y P``, so ``ΔW k₀ ≈ 0`` for every preserved key: what the model knew is left alone. Keys of
  earlier edits ``K_p`` are protected too, through the least-squares term that keeps their outputs. Per layer
  (in (in, out) layout, ``ΔW_io = ΔWᵀ``; AlphaEdit's Eq. 14, as its reference code solves it):

      ΔW_io = (P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K R        (K: this step's keys, R: the residual share, α = l2)

  which lies in the range of ``P``. One departure from the paper (``merge_subjects``, on by default): a step
  that edits a subject edited before re-asserts that subject's earlier edits (they join the step, sharing one
  value per subject as in a MEMIT batch, and their keys are taken out of ``K_p`` while it is solved). The key at
  a subject's last token barely depends on the relation, so otherwise a second fact of the same subject is
  written at a key the first one protects, and does not take.

* :func:`sequential_memit` makes the same MEMIT steps (batches, subjects merged) without a null space: each
  step is MEMIT's covariance-weighted least-squares update with the earlier edits' keys added to the preserved
  second moment (recursive least squares, as MEMIT's own batch solve would weigh them):

      ΔW_io = (λ C + μ K_p K_pᵀ + K Kᵀ)⁻¹ K R              (λ = memit.mom2_update_weight, μ = protect_weight)

  Ordinary keys are protected in proportion to how much of the text's key energy lies along a direction (``C``)
  rather than by a hard cut at 1% of it with an isotropic ridge ``α I`` on top: a direction the statistics
  hardly use costs little to write, however small the edit key's component along it (the ridge ``α`` charges
  every direction the same, so small edit keys are written only in part, see
  ``docs/results/sequential-edits``), and the earlier edits keep their outputs in the least-squares sense.
  Measured on SmolLM2 with 1,000 CounterFact edits in batches of 100 (layers 7-9, λ = 1000): ES 94.4 (AlphaEdit
  with the same steps: 64.9), NS 10.4 points below the unedited model's (AlphaEdit: 4.2).

  With ``anchor_original`` the ``λ C`` term is charged on the total change since the original weights (``D``,
  the earlier steps' sum) rather than on the step's own:

      ΔW_io = (λ C + μ K_p K_pᵀ + K Kᵀ)⁻¹ (K R − λ C D)

  so what MEMIT preserves is the *original* model's output on ordinary keys, and a step takes back the earlier
  steps' spill where the edit keys do not need it. For one layer with μ = 1, this is MEMIT's joint objective over
  every edit so far, each earlier edit asked to keep the output it has now. (Gupta et al. 2025, "Lifelong
  Sequential Knowledge Editing without Model Degradation" (ENCORE), bound the same growth of the total change
  with a Frobenius-norm term, ‖W − W₀‖²; this is MEMIT's own covariance-weighted term, so directions ordinary
  text uses are held back more than those it does not.)
  Measured in the same setting (λ = 500, key statistics from CounterFact sentences, 1,000 edits): μ = 1 keeps
  the neighbours (NS drop 3.2) but pulls earlier edits back with the spill (ES 74.6); μ = 10: ES 88.7, NS drop
  4.7 (unanchored: 89.9, 7.0).

  Two more options of both MEMIT-step methods. ``protect_contexts`` protects every earlier edit at its key in
  each context template (the mean of ``k_t k_tᵀ``) rather than at the templates' mean key only: later steps move
  an old edit mostly through its subject's last token, along the part of its prompts' keys that the mean does not
  hold (``analyses/decay_by_position.py``). ``retry_misses`` writes a step's requests that still prefer their true
  target once more, right after the step, with fresh values on the model as it is then. Measured on top of the
  anchored μ = 10 run (1,000 edits): protect_contexts keeps the oldest edits better (age 500+: 90.0 against
  85.4) but leaves less room for new ones (ES 88.6, NS drop 3.8); with retry_misses too, ES 87.6 and NS drop 2.9
  (``docs/results/sequential-edits``, session 9). ``refresh_lapsed`` writes back, after each step, every earlier
  request the model has come to prefer its true target on again: over layers 4-9 with the options above, 1,000
  edits end at ES 96.9 with an NS drop of 3.3 (89.4 / 3.5 without it; +23% editing time), paraphrases hardly
  better (PS 85.3 against 83.9) since the refresh checks the edit prompts only (session 10).

All three return *one* :class:`~mechedit.editing.EditHandle` whose deltas are the total change of every edited
parameter (edited model minus original) and whose ``restore()`` puts the original back bit-exactly. The handle
is re-applied to the original weights at the end, so the model holds exactly ``original + delta`` (which can
differ from the sum of the in-place steps by float rounding, ~1e-7 relative) and a saved handle re-applied to a
fresh copy gives identical weights. If any step fails, the original weights are restored before the error
propagates: nothing is left half-edited.

``progress("edit", k, n)`` is called after each step while the model holds the first ``k`` edits: an analysis
can measure the model there (see ``analyses/sequential_edits.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from mechedit.data import EditRecord
from mechedit.editing.handle import EditHandle
from mechedit.editing.hparams import HyperParams
from mechedit.editing.memit.compute_ks import prepare, read_resid
from mechedit.editing.memit.compute_zs import compute_zs
from mechedit.editing.memit.hparams import MEMITHyperParams
from mechedit.editing.memit.memit_main import (
    Snapshot,
    check_requests,
    choose_layers,
    layer_statistics,
    spread,
    value_evidence,
)
from mechedit.editing.rome.hparams import ROMEHyperParams
from mechedit.editing.rome.layer_stats import LayerStats, describe, layer_stats
from mechedit.editing.rome.rome_main import (
    _check_request,
    choose_layer,
    context_templates,
    rome,
)
from mechedit.editing.training import unbridged_copy
from mechedit.evaluation.counterfact import answer_nll
from mechedit.errors import DataFormatError, InputError, MecheditError
from mechedit.model import LoadedModel
from mechedit.tracing.common import prepare_prompt

Progress = Callable[[str, int, int], None]
NESTED = {"rome": ROMEHyperParams, "memit": MEMITHyperParams}


@dataclass(frozen=True)
class SequentialHyperParams(HyperParams):
    # The ROME hyperparameters of each seq-rome step. With layer="auto" the layer is traced once, on the first
    # request, and kept for all; generated context prefixes are sampled once from the unedited model.
    rome: ROMEHyperParams = field(default_factory=ROMEHyperParams)
    # The MEMIT hyperparameters of each AlphaEdit step (layers, value optimisation, statistics source).
    memit: MEMITHyperParams = field(default_factory=MEMITHyperParams)
    # AlphaEdit: requests per step (AlphaEdit's paper: 100 per batch over 2,000-3,000 edits; 1 is fully
    # sequential, the hardest case).
    batch_size: int = 1
    # AlphaEdit's null space: the eigenvectors of C = K₀K₀ᵀ/n with the smallest eigenvalues, as many as together
    # hold at most this fraction of the keys' energy (trace C). So ‖P K₀‖²_F ≤ nullspace_energy · ‖K₀‖²_F on the
    # statistics' keys by construction, whatever the keys' scale. (AlphaEdit's reference code thresholds
    # eigenvalues at an absolute 2e-2; on the embedded model's layers 0-2 that keeps 0.3-1% of the energy.)
    # Measured on the embedded model (docs/results/sequential-edits/): 1% with l2=10 (AlphaEdit's own setting)
    # kept NS at 94-100 over 100 sequential edits (ES 100 -> 75); 5% with l2=1 wrote more of each step (on an
    # 8-edit probe: same ES 7/8, PS 8/8 instead of 6/8) but NS fell by 20 points within 10 edits.
    nullspace_energy: float = 0.01
    # α: the ridge term of AlphaEdit's solve (its hparams' "L2": 10).
    l2: float = 10.0
    # Protect the keys of earlier edits (AlphaEdit's K_p K_pᵀ cache). False: each step protects only K₀.
    protect_edits: bool = True
    # seq-memit: μ, the weight of each earlier edit's key against a new one in the solve (1: recursive least
    # squares, every edit counts as much as the step's own; larger keeps earlier edits more firmly at the cost of
    # the new ones).
    protect_weight: float = 1.0
    # AlphaEdit and seq-memit: a step that edits a subject edited before also re-asserts that subject's earlier edits:
    # they join the step's requests (one shared value per subject, as within a MEMIT batch) and their keys leave the
    # protected cache while the step is solved (they come back with the step's keys). The key at a subject's last
    # token hardly depends on the relation (cosine 0.95-0.99 between one subject's prompts on the embedded model), so
    # without this a later fact of the same person is written at the key an earlier one is protected at (the new edit
    # cannot take) or over it (the old one is lost). False: AlphaEdit's paper and reference code, whose CounterFact
    # requests rarely share a subject.
    merge_subjects: bool = True
    # seq-memit: charge λ C on the *total* change since the original weights instead of on each step's own
    # change. Each step then solves (λ C + μ K_p K_pᵀ + K Kᵀ) Δ = K R − λ C D, D the change made so far: the
    # preservation term MEMIT means (outputs on ordinary keys stay those of the *original* model) rather than one
    # that forgets what earlier steps spent, so a step also takes back earlier steps' spill onto ordinary keys
    # where the edit keys do not need it. With μ = 1 this is the joint MEMIT solve of all edits so far, made one
    # batch at a time. False: each step is charged for its own change only (the measured runs up to session 7).
    anchor_original: bool = False
    # AlphaEdit and seq-memit: protect each earlier edit's key in every context template it was solved from
    # (their second moment, the mean of k_t k_tᵀ over the templates) instead of only their mean k̄ (k̄ k̄ᵀ). The
    # edit prompt itself reads the bare template's key k̄ + ε; with the mean alone nothing holds a later step's
    # change away from ε, and later steps move old edits mostly there (at the subject's last token). Costs room:
    # each edit holds several directions, so later writes carry less of their residual (module docstring).
    protect_contexts: bool = False
    # AlphaEdit and seq-memit: after each step, the step's requests whose edited model still prefers their true
    # target over the new one on their own prompt (mean per-token NLL, ES's test) are written once more, in one
    # follow-up step on the model as it is now: fresh values, their keys protected again with the new ones. Requests
    # without a true target are never retried. False: one write per step (the runs up to session 8).
    retry_misses: bool = False
    # AlphaEdit and seq-memit: after each step (and its retry), every request written in an *earlier* step whose
    # edited model now prefers the true target again (the same test) is written once more, in the same follow-up
    # step as the retry. Later steps wear old edits down (ES of edits aged 500+ falls ~10 points by 1,000 edits,
    # module docstring); this writes back what has lapsed instead of holding it tighter. Costs one ES check of
    # every request so far per step (it grows with the edit count) and the rewrites. False: an edit is written
    # when it arrives (and retried once with retry_misses), never again.
    refresh_lapsed: bool = False

    def __post_init__(self) -> None:
        for name, cls in NESTED.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, cls.from_dict(value))
            elif not isinstance(value, cls):
                raise InputError(f"{name} must be a {cls.__name__} or a dict of its fields, got "
                                 f"{type(value).__name__}")
        if not (isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool) and self.batch_size > 0):
            raise InputError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        e = self.nullspace_energy
        if not (isinstance(e, (int, float)) and not isinstance(e, bool) and 0 <= e < 1):
            raise InputError(f"nullspace_energy must be a fraction in [0, 1), got {e!r}")
        for name in ("l2", "protect_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
                raise InputError(f"{name} must be a positive number, got {v!r}")
        for name in ("protect_edits", "merge_subjects", "anchor_original", "protect_contexts", "retry_misses",
                     "refresh_lapsed"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: (v.to_dict() if k in NESTED else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> SequentialHyperParams:
        if not isinstance(d, dict):
            raise DataFormatError(f"{cls.__name__}: expected a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise DataFormatError(f"{cls.__name__}: unknown field(s) {sorted(set(d) - known)}; known: {sorted(known)}")
        return cls(**{k: (NESTED[k].from_dict(v) if k in NESTED and isinstance(v, dict) else v)
                      for k, v in d.items()})

    def with_overrides(self, items: list[str] | dict) -> SequentialHyperParams:
        """As :meth:`HyperParams.with_overrides`, and dotted names reach the nested ones:
        ``["rome.layer=1", "memit.layers=[0,1,2]", "batch_size=10"]``."""
        pairs = list(items.items()) if isinstance(items, dict) else [_split(i) for i in items]
        nested: dict[str, dict] = {}
        top = {}
        for key, value in pairs:
            head, dot, rest = key.partition(".")
            if dot:
                if head not in NESTED:
                    raise InputError(f"{type(self).__name__} has no nested hyperparameters {head!r}; "
                                     f"nested: {', '.join(NESTED)}")
                nested.setdefault(head, {})[rest] = value
            else:
                top[key] = value
        out = super().with_overrides(top if isinstance(items, dict) else [f"{k}={v}" for k, v in top.items()])
        for head, values in nested.items():
            sub = getattr(out, head).with_overrides(
                values if isinstance(items, dict) else [f"{k}={v}" for k, v in values.items()])
            out = replace(out, **{head: sub})
        return out


def _split(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise InputError(f"hyperparameter {item!r}: write it as name=value")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()


# -- sequential ROME ----------------------------------------------------------------------------------------------


def sequential_rome(model: LoadedModel, requests: Sequence[EditRecord],
                    hparams: SequentialHyperParams = SequentialHyperParams(), progress: Progress | None = None,
                    *, stats: LayerStats | None = None) -> EditHandle:
    """ROME edits one after another (see the module docstring). A request the edited model already answers
    with its new target (an earlier edit taught it) is skipped and listed in the evidence under ``"skipped"``."""
    started = time.perf_counter()
    hp = _check_hparams(hparams)
    requests = check_requests(requests)
    for r in requests:  # every prompt usable, before anything changes
        prepare_prompt(model, r.prompt, r.subject, r.target_new)
    fingerprint = model.fingerprint()
    layer, layer_evidence = choose_layer(model, requests[0], hp.rome, progress)
    rh = replace(hp.rome, layer=layer)
    if rh.context_prefixes is None:  # sample once, from the unedited model: "<text>. {}" -> "<text>."
        rh = replace(rh, context_prefixes=tuple(t[:-3] for t in context_templates(model, rh)[1:]))
    if rh.mom2_adjustment and stats is None:  # the layer's keys do not depend on its own output projection
        stats = layer_stats(model, layer, rh.mom2_source, rh.mom2_n_samples, max_tokens=rh.mom2_max_tokens,
                            seed=rh.seed, top_k=rh.prefix_top_k,
                            progress=(lambda d, t: progress("stats", d, t)) if progress else None)
    snapshot = Snapshot(model, [layer])
    steps, skipped = [], []
    try:
        for k, r in enumerate(requests):
            try:
                _check_request(model, r)
            except InputError as e:  # already answered (new == true was refused above)
                skipped.append({"case_id": r.case_id, "reason": str(e)})
            else:
                h = rome(model, r, rh, stats=stats)  # applied in place; the handle itself is not kept
                ev = h.evidence
                steps.append({"case_id": r.case_id, "target_prob": ev["target_prob"],
                              "update_ratio": ev["update_ratio"], "v_steps": ev["v_steps"]})
            if progress is not None:
                progress("edit", k + 1, len(requests))
        deltas = snapshot.changes()
    finally:
        snapshot.restore()
    evidence = {**layer_evidence, "module": model.module_name(layer, "mlp_out"), "n_requests": len(requests),
                "n_applied": len(steps), "skipped": skipped, "steps": steps,
                "context_prefixes": list(rh.context_prefixes),
                "stats": describe(stats) if stats is not None else None,
                "seconds": round(time.perf_counter() - started, 4)}
    return _finish(model, "seq-rome", deltas, hp, requests, fingerprint, evidence)


# -- AlphaEdit ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class NullSpace:
    """The projector onto the null space of one layer's preserved keys."""

    P: torch.Tensor  # (d_mlp, d_mlp) float64, symmetric, P @ P = P
    n_null: int  # its rank: eigenvectors kept
    threshold: float  # the largest eigenvalue kept (eigenvalues of C = E[k kᵀ])
    energy: float  # fraction of trace C in the kept directions (= ‖P K₀‖²_F / ‖K₀‖²_F on the statistics' keys)

    def describe(self) -> dict:
        return {"n_null": self.n_null, "threshold": self.threshold, "energy": self.energy}


def null_space(mom2: torch.Tensor, energy: float) -> NullSpace:
    """``P = U₀ U₀ᵀ`` with ``U₀`` the eigenvectors of ``mom2`` (C = K₀K₀ᵀ/n) with the smallest eigenvalues, as
    many as hold at most ``energy`` of ``trace C`` together."""
    ev, U = torch.linalg.eigh(mom2.double().cpu())  # ascending
    ev = ev.clamp_min(0)
    total = float(ev.sum())
    cum = torch.cumsum(ev, 0) / max(total, 1e-300)
    k = int((cum <= energy).sum())
    basis = U[:, :k]  # (d, k)
    return NullSpace(P=basis @ basis.T, n_null=k, threshold=float(ev[k - 1]) if k else 0.0,
                     energy=float(cum[k - 1]) if k else 0.0)


def alphaedit(model: LoadedModel, requests: Sequence[EditRecord],
              hparams: SequentialHyperParams = SequentialHyperParams(), progress: Progress | None = None,
              *, stats: dict[int, LayerStats] | None = None) -> EditHandle:
    """AlphaEdit: ``hparams.batch_size`` requests per step, each step a null-space-projected MEMIT update (see
    the module docstring). Layers are chosen (``memit.layers``), statistics read and projectors built once, on
    the unedited model."""
    return _memit_steps(model, requests, _check_hparams(hparams), progress, stats, "alphaedit")


def sequential_memit(model: LoadedModel, requests: Sequence[EditRecord],
                     hparams: SequentialHyperParams = SequentialHyperParams(), progress: Progress | None = None,
                     *, stats: dict[int, LayerStats] | None = None) -> EditHandle:
    """MEMIT steps of ``hparams.batch_size`` requests, each protecting the earlier edits' keys inside MEMIT's
    covariance-weighted solve (see the module docstring). ``nullspace_energy`` and ``l2`` are not used."""
    return _memit_steps(model, requests, _check_hparams(hparams), progress, stats, "seq-memit")


def _memit_steps(model: LoadedModel, requests: Sequence[EditRecord], hp: SequentialHyperParams,
                 progress: Progress | None, stats: dict[int, LayerStats] | None, method: str) -> EditHandle:
    """The step loop of :func:`alphaedit` and :func:`sequential_memit`; ``method`` picks the per-layer solve."""
    started = time.perf_counter()
    mh = hp.memit
    if not mh.mom2_adjustment:
        raise InputError(f"{method} needs the key statistics (its preserved keys); set memit.mom2_adjustment=True")
    requests = check_requests(requests)
    fingerprint = model.fingerprint()
    layers, layer_evidence = choose_layers(model, requests, mh, progress)
    stats = layer_statistics(model, layers, mh, progress, stats)
    templates = context_templates(model, mh)
    prep = prepare(model, requests, templates, mh.key_position)  # every prompt usable, before anything changes
    protected = EditKeys(layers, model.d_mlp)
    by_subject: dict[str, list[int]] = {}  # the requests applied so far, per subject
    if method == "alphaedit":
        spaces = {layer: null_space(stats[layer].mom2, hp.nullspace_energy) for layer in layers}
        eye = torch.eye(model.d_mlp, dtype=torch.float64)
        extra = {"null_space": {str(layer): spaces[layer].describe() for layer in layers},
                 "protect_contexts": hp.protect_contexts, "retry_misses": hp.retry_misses,
                 "refresh_lapsed": hp.refresh_lapsed}

        def solve(i: int, layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:  # K (n, d_mlp), R (n, d)
            P = spaces[layer].P
            return torch.linalg.solve(P @ (K.T @ K + protected.matrix[layer]) + hp.l2 * eye, P @ (K.T @ R))
    else:
        preserved = {layer: mh.mom2_update_weight * stats[layer].mom2.double() for layer in layers}
        extra = {"protect_weight": hp.protect_weight, "anchor_original": hp.anchor_original,
                 "protect_contexts": hp.protect_contexts, "retry_misses": hp.retry_misses,
                 "refresh_lapsed": hp.refresh_lapsed}

        def solve(i: int, layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
            A = preserved[layer] + hp.protect_weight * protected.matrix[layer] + K.T @ K
            b = K.T @ R
            if hp.anchor_original:  # − λ C D, D the change since the original weights (io layout)
                b = b - preserved[layer] @ snapshot.change_in_out(model, layer).double()
            return torch.linalg.solve(A, b)

    snapshot = Snapshot(model, layers)
    hf = unbridged_copy(model)  # the value optimisation's copy, kept in step with the edited layers
    copies = [hf.get_submodule(model.module_name(layer, "mlp_out")).weight for layer in layers]
    notes = []

    def write(index: list[int], rewritten: list[int]):
        """One MEMIT step for requests ``index``; ``rewritten`` (written before) leave the protected keys while
        it is solved and come back with the step's keys."""
        protected.drop(rewritten)

        def remember(i: int, layer: int, Kt: torch.Tensor) -> None:  # Kt (n, n_templates, d)
            if hp.protect_edits:
                protected.add(layer, index, Kt if hp.protect_contexts else Kt.mean(dim=1, keepdim=True))

        sub = prep.subset(index)
        values = compute_zs(model, sub, layers[-1], read_resid(model, sub, layers[-1]), mh, hf=hf)
        _, per_layer = spread(model, sub, layers, values, solve, mh.max_update_ratio, on_layer=remember)
        with torch.no_grad():
            for copy, layer in zip(copies, layers):
                copy.copy_(model.module(layer, "mlp_out").weight)
        return values, per_layer

    try:
        for s in range(0, len(requests), hp.batch_size):
            new = list(range(s, min(len(requests), s + hp.batch_size)))
            again = subject_revisits(requests, new, by_subject) if hp.merge_subjects else []
            index = again + new
            values, per_layer = write(index, again)  # re-asserted edits are protected again with this step's keys
            for j in new:
                by_subject.setdefault(requests[j].subject.strip(), []).append(j)
            note = {"case_ids": [requests[j].case_id for j in new],
                    "reasserted": [requests[j].case_id for j in again],
                    **value_evidence(values, read_resid(model, prep.subset(index), layers[-1])),
                    "update_ratio": [p["update_ratio"] for p in per_layer]}
            if hp.retry_misses or hp.refresh_lapsed:
                earlier = list(range(new[0]))  # every request of the earlier steps (steps go in order)
                check = (new if hp.retry_misses else []) + (earlier if hp.refresh_lapsed else [])
                missed = prefer_true(model, requests, check)
                subjects = {requests[j].subject.strip() for j in missed}
                # a subject shares one value: every request of a missed subject applied so far is written again
                retry = sorted(j for subject in subjects for j in by_subject[subject])
                if retry:
                    values, _ = write(retry, retry)
                note["retried"] = [requests[j].case_id for j in retry]
                note["lapsed"] = [requests[j].case_id for j in missed if j < new[0]]
                note["retry_target_prob_mean"] = float(values.target_prob.mean()) if retry else None
            notes.append(note)
            if progress is not None:
                progress("edit", new[-1] + 1, len(requests))
        deltas = snapshot.changes()
    finally:
        snapshot.restore()
    evidence = {**layer_evidence, "modules": [model.module_name(layer, "mlp_out") for layer in layers],
                "n_requests": len(requests), "batch_size": hp.batch_size, "templates": list(templates), **extra,
                "steps": notes, "stats": {str(k): describe(v) for k, v in stats.items()},
                "seconds": round(time.perf_counter() - started, 4)}
    return _finish(model, method, deltas, hp, requests, fingerprint, evidence)


def prefer_true(model: LoadedModel, requests: Sequence[EditRecord], index: Sequence[int]) -> list[int]:
    """The requests of ``index`` whose prompt the model continues with the true target rather than the new one
    (mean per-token NLL, as ES scores it); requests without a true target are not listed."""
    index = [j for j in index if requests[j].target_true is not None]
    if not index:
        return []
    pairs = [(requests[j].prompt, requests[j].target_new) for j in index]
    nll = answer_nll(model, pairs + [(requests[j].prompt, requests[j].target_true) for j in index])
    return [j for j, new, true in zip(index, nll[:len(index)], nll[len(index):]) if not new < true]


class EditKeys:
    """AlphaEdit's ``K_p K_pᵀ`` per layer: the keys of the edits applied so far, each edit counted once (an edit
    given several keys, one per context, adds their mean ``k kᵀ``). Each edit's own keys are kept so that an edit
    written again (its subject re-asserted) can be taken out first."""

    def __init__(self, layers: Sequence[int], d_mlp: int):
        self.matrix = {layer: torch.zeros(d_mlp, d_mlp, dtype=torch.float64) for layer in layers}
        self.keys: dict[int, dict[int, torch.Tensor]] = {layer: {} for layer in layers}

    def add(self, layer: int, index: Sequence[int], K: torch.Tensor) -> None:
        """Protect the keys ``K`` of edits ``index`` (n) at ``layer``: (n, d_mlp), one key per edit, or
        (n, m, d_mlp), m keys per edit weighted 1/m each."""
        self.drop(index, layers=[layer])
        K = K if K.dim() == 3 else K.unsqueeze(1)
        self.matrix[layer] += torch.einsum("nmi,nmj->ij", K, K) / K.shape[1]
        self.keys[layer].update(zip(index, K.clone()))

    def drop(self, index: Sequence[int], layers: Sequence[int] | None = None) -> None:
        """Stop protecting edits ``index`` (those not protected are ignored)."""
        for layer in self.matrix if layers is None else layers:
            for j in index:
                k = self.keys[layer].pop(j, None)  # (m, d_mlp)
                if k is not None:
                    self.matrix[layer] -= k.T @ k / k.shape[0]


def subject_revisits(requests: Sequence[EditRecord], new: Sequence[int], by_subject: dict[str, list[int]]) -> list[int]:
    """The earlier requests (indices in ``by_subject``, applied before) whose subject one of ``new`` edits again."""
    subjects = {requests[j].subject.strip() for j in new}
    return [j for subject in sorted(subjects) for j in by_subject.get(subject, [])]


# -- shared -------------------------------------------------------------------------------------------------------


def _check_hparams(hparams) -> SequentialHyperParams:
    if isinstance(hparams, dict):
        return SequentialHyperParams.from_dict(hparams)
    if not isinstance(hparams, SequentialHyperParams):
        raise InputError(f"hparams must be a SequentialHyperParams, got {type(hparams).__name__}")
    return hparams


def _finish(model: LoadedModel, method: str, deltas: dict, hp: SequentialHyperParams, requests, fingerprint: str,
            evidence: dict) -> EditHandle:
    """The handle of the total change (every snapshotted parameter, zero where every request was skipped),
    applied to the (restored) original weights."""
    for name, d in deltas.items():
        if not torch.isfinite(d).all():
            raise MecheditError(f"{method}: the total change of {name} is not finite. Nothing was changed")
    handle = EditHandle(method=method, deltas=deltas, hparams=hp.to_dict(),
                        requests=[r.to_dict() for r in requests], model_name=model.name,
                        model_fingerprint=fingerprint, evidence=evidence)
    handle._apply_checked(model)
    return handle
