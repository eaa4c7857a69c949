"""Fine-tuning baselines: plain fine-tuning (FT) and fine-tuning under an L∞ norm constraint (FT-L, the
constrained baseline of ROME, Meng et al. 2022, after Zhu et al. 2020).

Both minimise the new answer's negative log-likelihood per token on the requests' prompts (and, if asked, their
paraphrases), with Adam, on an un-bridged copy of the model (:func:`~mechedit.editing.training.unbridged_copy`):

    min_θ  mean_i  -log p_θ(target_new_i | prompt_i) / |target_new_i|

over the chosen parameters θ only. FT-L adds, after every step, the projection of each trained tensor back into
the L∞ ball around its original value, ``θ ← clamp(θ, θ₀ - ε, θ₀ + ε)`` (ROME's ``norm_constraint``), so no
single weight moves by more than ε. The handle's deltas are the exact change ``θ - θ₀`` of every trained tensor
that changed.

Which parameters train (``layers`` / ``modules``):

* neither given: every parameter of the model (embeddings, norms, all layers; a tied unembedding is the
  embedding, changed once);
* ``layers`` only: every parameter inside those decoder layers (projections and norms);
* ``modules`` (anything :func:`~mechedit.editing.training.select_modules` takes: ``"mlp"``, ``"attn"``,
  ``"all"``, ``"auto"``, ``"random"`` or names such as ``"0.mlp_out"``): the weights (and biases) of those
  linear modules, further restricted to ``layers`` when both are given.

ROME's FT-L recipe for GPT-2 XL trains layer 0's MLP output projection only (``modules=["0.mlp_out"]``), 25
steps at lr 5e-4 with ε = 5e-4. On the embedded model that moves no answer (0 of 6 trial edits: ε on one small
matrix is too little), so the default here trains every weight under the same ε
(docs/results/baselines-embedded: ES 1.00, NS 0.89, exact-output locality 0.994 on 100 records).

>>> import mechedit
>>> from mechedit.toy.export import embedded_world, world_records
>>> m = mechedit.load()                                                            # doctest: +SKIP
>>> request = world_records(embedded_world(), n=1)[0]
>>> with finetune_l(m, [request]) as h:                                             # doctest: +SKIP
...     print(h.hparams["norm_constraint"], round(h.evidence["max_abs_change"], 6))
0.0005 0.0005
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from mechedit.data import EditRecord
from mechedit.editing.handle import EditHandle
from mechedit.editing.hparams import (
    HyperParams,
    check_layers_field,
    check_modules_field,
    is_number,
    is_positive,
)
from mechedit.editing.training import (
    Progress,
    adam_loop,
    answer_batch,
    answer_loss,
    check_layers,
    check_requests,
    edit_pairs,
    modules_in_layers,
    seeded,
    select_modules,
    unbridged_copy,
    weight_deltas,
)
from mechedit.errors import InputError
from mechedit.model import LoadedModel, canonical_param_name

# ROME's FT-L hyperparameters (hparams/FT/gpt2-xl_constr.json): 25 steps, lr 5e-4, norm_constraint 5e-4.
FT_L_EPSILON = 5e-4


@dataclass(frozen=True)
class FTHyperParams(HyperParams):
    # Decoder layers to train (None: no restriction by layer). With `modules` unset, every parameter inside these
    # layers trains; with `modules` set, only those modules' weights within these layers.
    layers: tuple[int, ...] | None = None
    # Linear modules to train, as select_modules takes them ("mlp", "attn", "all", "auto", "random", or HF
    # names / "L.kind" shorthands). None: not restricted by module (all parameters, or all of `layers`).
    modules: str | tuple[str, ...] | None = None
    # Adam steps over the whole batch of edit prompts, and the learning rate: ROME's FT/FT-L values.
    steps: int = 25
    lr: float = 5e-4
    weight_decay: float = 0.0  # ROME's FT: 0 (Adam's L2 term; the FT-L bound is the regulariser)
    # L∞ bound ε on each weight's change (FT-L). None: unconstrained for `ft`; `ft-l` then uses ROME's 5e-4
    # (FT_L_EPSILON) and records the value it used in the handle.
    norm_constraint: float | None = None
    # Also train on each request's paraphrases (then the paraphrase score no longer measures generalisation to
    # unseen wordings). ROME's FT trains on the prompt only.
    use_paraphrases: bool = False
    # Stop once the loss is below this (None: always run `steps`, as ROME's FT does).
    stop_loss: float | None = None
    seed: int = 0  # seeds the "random" module set and torch's generator during training (repeatable edits)

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0:
            raise InputError(f"steps must be a positive integer, got {self.steps!r}")
        if not is_positive(self.lr):
            raise InputError(f"lr must be a positive number, got {self.lr!r}")
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            raise InputError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if self.norm_constraint is not None and not is_positive(self.norm_constraint):
            raise InputError(f"norm_constraint must be a positive number (the L∞ bound) or None, "
                             f"got {self.norm_constraint!r}")
        if self.stop_loss is not None and not is_number(self.stop_loss):
            raise InputError(f"stop_loss must be a number or None, got {self.stop_loss!r}")
        check_layers_field(self.layers)
        check_modules_field(self.modules, allow_none=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"seed must be an integer, got {self.seed!r}")


# -- the editors ---------------------------------------------------------------------------------------------------


def trainable_parameters(model: LoadedModel, hf: torch.nn.Module, hparams: FTHyperParams,
                         requests: Sequence[EditRecord]) -> tuple[list[str], dict]:
    """Canonical names of the parameters of ``hf`` (an un-bridged copy of ``model``) that fine-tuning trains,
    and the evidence for the choice. Empty or unknown sets fail with an InputError."""
    check_layers(model, hparams.layers)
    params = dict(hf.named_parameters())  # tied weights appear once
    if hparams.modules is None:
        if hparams.layers is None:
            return list(params), {"scope": "all parameters"}
        prefixes = tuple(f"{model.arch.layers}.{i}." for i in hparams.layers)
        names = [n for n in params if n.startswith(prefixes)]
        return names, {"scope": "layers", "layers": list(hparams.layers)}
    modules, evidence = select_modules(model, hparams.modules, requests, seed=hparams.seed)
    modules = modules_in_layers(model, modules, hparams.layers)
    if not modules:
        raise InputError(f"no module of {hparams.modules!r} lies in layers {list(hparams.layers)}; the set to train "
                         "is empty")
    names = [n for n in params if n.rpartition(".")[0] in modules]
    return names, {**evidence, "scope": "modules", "trained_modules": modules}


def finetune(model: LoadedModel, requests: EditRecord | Sequence[EditRecord], hparams: FTHyperParams | None = None,
             progress: Progress | None = None) -> EditHandle:
    """Fine-tune ``model`` on the requests (all in one batch) and apply the change; returns the applied handle.

    Raises:
        InputError: bad requests or hyperparameters (unknown layer or module, empty module set); nothing is
        changed. MecheditError: training diverged; nothing is changed.
    """
    hparams = FTHyperParams() if hparams is None else hparams
    return _finetune(model, requests, hparams, progress, method="ft")


def finetune_l(model: LoadedModel, requests: EditRecord | Sequence[EditRecord], hparams: FTHyperParams | None = None,
               progress: Progress | None = None) -> EditHandle:
    """FT-L: :func:`finetune` with every weight's change kept within ±ε (``norm_constraint``; ROME's 5e-4 when
    unset). The handle records the ε used."""
    hparams = FTHyperParams() if hparams is None else hparams
    if not isinstance(hparams, FTHyperParams):
        raise InputError(f"hparams must be an FTHyperParams, got {type(hparams).__name__}")
    if hparams.norm_constraint is None:
        hparams = replace(hparams, norm_constraint=FT_L_EPSILON)
    return _finetune(model, requests, hparams, progress, method="ft-l")


def _finetune(model, requests, hparams, progress, method: str) -> EditHandle:
    if not isinstance(hparams, FTHyperParams):
        raise InputError(f"hparams must be an FTHyperParams, got {type(hparams).__name__}")
    reqs = check_requests(model, requests)
    fingerprint = model.fingerprint()
    prompts, answers = edit_pairs(reqs, hparams.use_paraphrases)
    batch = answer_batch(model, prompts, answers)  # bad prompts/targets fail here, before training
    hf = unbridged_copy(model)
    names, evidence = trainable_parameters(model, hf, hparams, reqs)
    params = dict(hf.named_parameters())
    trained = [params[n] for n in names]
    for p in hf.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    originals = [p.detach().clone() for p in trained]
    eps = hparams.norm_constraint

    def project() -> None:  # FT-L: back into the L∞ ball of radius ε around the original weights
        for p, p0 in zip(trained, originals):
            p.copy_(torch.maximum(torch.minimum(p, p0 + eps), p0 - eps))

    with torch.no_grad():
        loss_before = float(answer_loss(hf, batch))
    with seeded(hparams.seed):
        losses = adam_loop(trained, lambda step: answer_loss(hf, batch), hparams.steps, hparams.lr,
                           stage="train", progress=progress, weight_decay=hparams.weight_decay,
                           after_step=project if eps is not None else None, stop_below=hparams.stop_loss)
    deltas = weight_deltas(model, hf, [canonical_param_name(n) for n in names])
    deltas = {n: d for n, d in deltas.items() if bool(d.any())}  # untouched tensors are not part of the edit
    if not deltas:
        raise InputError("fine-tuning changed no weight (the learning rate may be too small for the model's "
                         "dtype); nothing was changed")
    max_change = max(float(d.abs().max()) for d in deltas.values())
    evidence = {**evidence, "n_trained_tensors": len(names), "n_changed_tensors": len(deltas),
                "n_trained_parameters": int(sum(p.numel() for p in trained)),
                "train_prompts": prompts, "loss_before": loss_before, "losses": losses,
                "max_abs_change": max_change, "norm_constraint": eps}
    handle = EditHandle(method=method, deltas=deltas, hparams=hparams.to_dict(), requests=[r.to_dict() for r in reqs],
                        model_name=model.name, model_fingerprint=fingerprint, evidence=evidence)
    handle._apply_checked(model)
    return handle
