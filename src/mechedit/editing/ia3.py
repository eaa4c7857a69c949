"""(IA)³ restricted to a few modules - the ones :func:`mechedit.locate` chose, or a set you name - and the
two-stage *unlearn-then-learn* recipe built from it.

(IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning") learns one vector ``l`` per adapted module and rescales activations elementwise with it:

* a *feed-forward* module (the MLP's input and output projections: ``mlp_in*`` / ``mlp_out`` of the
  architecture table) has its **input** rescaled: ``W x  ->  W (l ⊙ x)``;
* any other module (attention projections) has its **output** rescaled: ``W x + b  ->  l ⊙ (W x + b)``.

``l`` starts at 1, so the untrained adapter is exactly the identity. Merged, it rescales the columns (input) or
the rows and the bias (output) of the weight: an edit that can re-weight what a module reads or writes, but never
write a new direction - which is why *where* it sits matters, and why locating is worth comparing with random
modules of the same number (``analyses/ia3_compare.py``).

Training runs on an un-bridged copy of the model (:func:`~mechedit.editing.training.unbridged_copy`; peft on a
bridged model only half works), on every request's prompt and paraphrases - and, on the embedded world model,
the relation's *training* templates filled with the subject (the held-out templates stay unseen) - towards
``target_new``, with the loss on the answer tokens only. The adapter is then merged (``merge_and_unload``) and the
exact change is applied to the user's model as an :class:`~mechedit.editing.EditHandle`, which also carries the
adapter in peft's own format (``handle.save(d)`` writes ``d/adapter/``, loadable with
``PeftModel.from_pretrained(hf_model, d / "adapter")`` alone).

GPT-2's fused ``attn.c_attn`` (q, k and v in one Conv1D): RESOURCES.md found an (IA)³ layer on it had no effect
inside the bridge. The bridge's q, k and v parameters are split *views* of ``c_attn``'s weight: a change to the
weight is seen, a peft wrapper around the module apparently is not. So here peft never meets the bridge: the
adapter is trained on the plain HF copy (where ``c_attn`` is an ordinary Conv1D and its output scaling is one
vector over q|k|v) and only the merged weight change reaches the user's model. After applying, the edit is
checked *through the bridge*: its logits on the training prompts must match the trained copy's (the largest
difference, and how far the edit moved the bridge's logits, are recorded as ``evidence["bridge_check"]``), else
the edit is undone and refused. On a tiny GPT-2 with (IA)³ on ``c_attn`` only,
the merged change does act through the bridge (tests/test_ia3.py checks it).

**Unlearn-then-learn** (:func:`ia3_unlearn_learn`): stage 1 trains an adapter on the same prompts towards an
uncertainty answer ("I am not sure") and merges it; stage 2 trains a second adapter on the merged model towards
the new answer. Both adapt the same modules, so the two scalings compose into one (IA)³ adapter whose vector is
their elementwise product ``l1 ⊙ l2``: that is the peft adapter the handle carries, while its deltas are the exact
total change.

>>> import mechedit
>>> from mechedit.editing.methods import edit
>>> from mechedit.toy.export import embedded_world, world_records
>>> m = mechedit.load()                                                          # doctest: +SKIP
>>> req = world_records(embedded_world(), n=1)[0]
>>> with edit(m, [req], "ia3", {"modules": "auto"}) as h:                        # doctest: +SKIP
...     h.evidence["modules"]                                                    # locate's 10 modules
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mechedit.data import EditRecord
from mechedit.editing.handle import EditHandle
from mechedit.editing.hparams import HyperParams
from mechedit.editing.training import (
    Progress,
    adam_loop,
    answer_batch,
    answer_loss,
    check_requests,
    select_modules,
    unbridged_copy,
    weight_deltas,
)
from mechedit.errors import InputError, MecheditError
from mechedit.model import LoadedModel

MODULE_KEYWORDS = ("auto", "all", "random", "mlp", "attn")
WORLD_TEMPLATES = ("train", "all", "none")
# Through the bridge the edited model must reproduce the trained copy's logits to this (relative to the largest
# logit); the bridge matches HF eager attention to ~3e-5 (RESOURCES.md).
BRIDGE_TOLERANCE = 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Hyperparameters
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IA3HyperParams(HyperParams):
    # -- where ------------------------------------------------------------------------------------------------
    # Modules that get an (IA)³ vector: "auto" = locate's adapter module set for the (first) request (causal
    # patching + gradient norms, see mechedit.locating); "random" = as many modules drawn at random with `seed`
    # (the control for "does locating matter"); "all", "mlp", "attn"; or a list of HF module names / "L.kind"
    # shorthands ("3.mlp_out"). MLP modules (mlp_in*, mlp_out) are peft's feed-forward modules (input scaled).
    modules: str | tuple[str, ...] = "auto"
    # How many modules "auto" and "random" choose. 10 is locate's default and the size of the study this toolkit
    # grew from.
    adapter_size: int = 10
    # -- what it is trained on ---------------------------------------------------------------------------------
    # On the embedded world model, add the relation's templates filled with the subject to each request's prompt
    # and paraphrases: "train" (the templates the model learnt the fact from; the held-out ones stay unseen, so
    # generalisation can still be measured), "all", or "none". Ignored for models without a world.
    world_templates: str = "train"
    # -- how --------------------------------------------------------------------------------------------------
    # Full-batch Adam steps on the mean per-token NLL of the answers. (IA)³ vectors start at 1 and move slowly at
    # the paper's lr 3e-3 (it trained for 1,000 steps); a one-fact edit on CPU wants a few dozen steps, so a larger
    # rate: 0.05 moves a scale by ~5% per step.
    steps: int = 60
    lr: float = 0.05
    # Stop early once the loss is below this (mean per-token NLL; 0.05 ~ p(answer token) 0.95): further steps only
    # push the scales further and hurt locality. 0 trains all `steps`.
    stop_loss: float = 0.05
    # Seeds the random module choice and the training (which is otherwise deterministic: dropout is off).
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.modules, list):
            object.__setattr__(self, "modules", tuple(self.modules))
        if isinstance(self.modules, str):
            if self.modules.strip() not in MODULE_KEYWORDS:
                raise InputError(f"modules must be one of {', '.join(MODULE_KEYWORDS)} or a list of module names, "
                                 f"got {self.modules!r}")
        elif not isinstance(self.modules, tuple) or not all(isinstance(m, str) and m.strip() for m in self.modules):
            raise InputError(f"modules must be one of {', '.join(MODULE_KEYWORDS)} or a list of module names, "
                             f"got {self.modules!r}")
        elif not self.modules:
            raise InputError("the module set is empty; name at least one module (or use 'auto')")
        if self.world_templates not in WORLD_TEMPLATES:
            raise InputError(f"world_templates must be one of {', '.join(WORLD_TEMPLATES)}, got "
                             f"{self.world_templates!r}")
        _positive_int("adapter_size", self.adapter_size)
        _positive_int("steps", self.steps)
        _positive_float("lr", self.lr)
        if isinstance(self.stop_loss, bool) or not isinstance(self.stop_loss, (int, float)) or not self.stop_loss >= 0:
            raise InputError(f"stop_loss must be a number >= 0 (0 trains every step), got {self.stop_loss!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"seed must be an integer, got {self.seed!r}")


@dataclass(frozen=True)
class UnlearnLearnHyperParams(IA3HyperParams):
    """:class:`IA3HyperParams` (``steps``/``lr``/``stop_loss`` are the *learn* stage's) plus the unlearn stage."""

    # Stage 1's answer for every training prompt: the model is first taught to say it does not know, so that
    # stage 2 writes the new answer over "uncertain" rather than over the old fact.
    uncertain_answer: str = "I am not sure"
    # Stage 1 trains the same modules as stage 2, with its own budget (same reasoning as steps/lr above).
    # Measured on the embedded model (docs/results/ia3-compare): the longer stage 1, the less survives elsewhere -
    # 60 steps left 12% of other facts, 20 steps 41%, 5 steps 83% (plain (IA)³ on the same modules: 83%).
    unlearn_steps: int = 60
    unlearn_lr: float = 0.05
    unlearn_stop_loss: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.uncertain_answer, str) or not self.uncertain_answer.strip():
            raise InputError("uncertain_answer must be a non-empty string (e.g. 'I am not sure')")
        _positive_int("unlearn_steps", self.unlearn_steps)
        _positive_float("unlearn_lr", self.unlearn_lr)
        if (isinstance(self.unlearn_stop_loss, bool) or not isinstance(self.unlearn_stop_loss, (int, float))
                or not self.unlearn_stop_loss >= 0):
            raise InputError(f"unlearn_stop_loss must be a number >= 0, got {self.unlearn_stop_loss!r}")


def _positive_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise InputError(f"{name} must be a positive integer, got {v!r}")


def _positive_float(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
        raise InputError(f"{name} must be a positive number, got {v!r}")


# ---------------------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------------------


def training_prompts(model: LoadedModel, request: EditRecord, world_templates: str = "train") -> list[str]:
    """The prompts an adapter is trained on for ``request``: its prompt, its paraphrases and, on a model that
    ships its world (``world.json``) and knows the request's relation, that relation's templates of ``split``
    filled with the subject. Duplicates removed, order kept."""
    prompts = [request.prompt, *request.paraphrases]
    if world_templates != "none" and model.path is not None and (model.path / "world.json").is_file():
        from mechedit.toy.world import World

        world = World.load(model.path / "world.json")
        if request.relation_id in world.relations:
            splits = ("train",) if world_templates == "train" else ("train", "heldout")
            for split in splits:
                prompts += [t.replace("{}", request.subject) for t in world.templates(request.relation_id, split)]
    return list(dict.fromkeys(prompts))


def feedforward_modules(model: LoadedModel, names: Sequence[str]) -> list[str]:
    """The MLP modules among ``names`` (kinds ``mlp_in*`` / ``mlp_out``): peft's feed-forward modules, whose
    input (not output) (IA)³ rescales."""
    kind_of = {model.module_name(layer, kind): kind for layer in range(model.n_layers)
               for kind, path in model.arch.modules().items() if path}
    return [n for n in names if kind_of.get(n, "").startswith("mlp")]


def ia3_config(model: LoadedModel, names: Sequence[str]):
    """peft's ``IA3Config`` targeting exactly ``names`` (full HF module names), MLP ones as feed-forward."""
    from peft import IA3Config

    return IA3Config(task_type="CAUSAL_LM", target_modules=list(names),
                     feedforward_modules=feedforward_modules(model, names), fan_in_fan_out=model.arch.conv1d,
                     init_ia3_weights=True)


def wrap_ia3(model: LoadedModel, hf: torch.nn.Module, names: Sequence[str]):
    """``hf`` (an un-bridged copy) wrapped by peft with an identity (IA)³ adapter on ``names``; only the adapter's
    vectors are trainable. Refuses a peft model that adapted anything else."""
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes about Conv1D fan_in_fan_out and unknown base model names
        peft_model = get_peft_model(hf, ia3_config(model, names))
    adapted = sorted(n.removeprefix("base_model.model.") for n, mod in peft_model.named_modules()
                     if hasattr(mod, "ia3_l") and n.startswith("base_model.model."))
    if adapted != sorted(names):
        raise MecheditError(f"peft adapted {adapted} instead of exactly {sorted(names)}")
    return peft_model


def peft_adapter(peft_model) -> dict:
    """The trained adapter as peft writes it: ``{"config": adapter_config.json, "weights": state dict}``."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as d:
        peft_model.save_pretrained(d)
        config = json.loads((Path(d) / "adapter_config.json").read_text())
        weights = load_file(str(Path(d) / "adapter_model.safetensors"))
    config["base_model_name_or_path"] = None  # the model is the one the handle names, not a hub id
    return {"config": config, "weights": weights}


def train_stage(model: LoadedModel, hf: torch.nn.Module, names: Sequence[str], prompts: Sequence[str],
                answers: Sequence[str], *, steps: int, lr: float, stop_loss: float, seed: int, stage: str,
                progress: Progress | None) -> tuple[torch.nn.Module, dict, list[float]]:
    """Train one (IA)³ adapter on ``hf`` towards ``answers``; returns (the merged un-bridged model, the adapter in
    peft form, the loss per step)."""
    batch = answer_batch(model, prompts, answers)
    peft_model = wrap_ia3(model, hf, names)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        losses = adam_loop(peft_model.parameters(), lambda _: answer_loss(peft_model, batch), steps, lr,
                           stage=stage, progress=progress, stop_below=stop_loss or None)
    adapter = peft_adapter(peft_model)
    return peft_model.merge_and_unload(), adapter, losses


def _select(model: LoadedModel, requests: list[EditRecord], hp: IA3HyperParams) -> tuple[list[str], dict]:
    modules = hp.modules if isinstance(hp.modules, str) else list(hp.modules)
    names, why = select_modules(model, modules, requests, seed=hp.seed, adapter_size=hp.adapter_size)
    if not names:
        raise InputError("the module set is empty; name at least one module (or use 'auto')")
    if len(requests) > 1 and modules == "auto":
        why = {**why, "note": "located on the first request; all requests train the same modules"}
    return names, why


def _pairs(model: LoadedModel, requests: list[EditRecord], hp: IA3HyperParams, answer=None):
    prompts, answers = [], []
    for r in requests:
        ps = training_prompts(model, r, hp.world_templates)
        prompts += ps
        answers += [answer if answer is not None else r.target_new] * len(ps)
    answer_batch(model, prompts, answers)  # bad prompts/answers fail here, before any training
    return prompts, answers


@torch.no_grad()
def bridge_logits(model: LoadedModel, prompts: Sequence[str]) -> list[torch.Tensor]:
    """Each prompt's logits through the bridge, (1, T, V) float32 each."""
    return [model.bridge(torch.tensor([model.encode(p)], device=model.device)).float() for p in prompts]


@torch.no_grad()
def bridge_check(model: LoadedModel, trained: torch.nn.Module, prompts: Sequence[str],
                 before: Sequence[torch.Tensor]) -> dict:
    """Does the merged change act inside the bridge as it did in training? Compares the edited model's logits
    through the bridge with the trained copy's (``mismatch``), and with the bridge's logits ``before`` the edit
    (``effect``: how much the edit moved them), on ``prompts``."""
    mismatch, effect, scale = 0.0, 0.0, 0.0
    for p, old in zip(prompts, before):
        ids = torch.tensor([model.encode(p)], device=model.device)  # (1, T)
        want = trained(input_ids=ids).logits.float()  # (1, T, V)
        got = model.bridge(ids).float()  # (1, T, V)
        mismatch = max(mismatch, float((want - got).abs().max()))
        effect = max(effect, float((got - old).abs().max()))
        scale = max(scale, float(want.abs().max()))
    return {"max_logit_mismatch": mismatch, "max_logit_effect": effect, "max_logit": scale, "prompts": len(prompts),
            "ok": mismatch <= BRIDGE_TOLERANCE * max(scale, 1.0)}


def _finish(model: LoadedModel, method: str, requests, hp, trained, adapter, names, fingerprint, evidence,
            prompts) -> EditHandle:
    deltas = weight_deltas(model, trained)
    if not deltas:
        raise MecheditError(f"{method} changed no weight (the loss was already below stop_loss?); nothing applied")
    targeted = set(names)
    stray = [n for n in deltas if n.rpartition(".")[0] not in targeted]
    if stray:
        raise MecheditError(f"{method} changed parameters outside its modules: {stray[:3]}; nothing applied")
    evidence["changed_parameters"] = sorted(deltas)
    handle = EditHandle(method, deltas, hp.to_dict(), [r.to_dict() for r in requests], model.name, fingerprint,
                        evidence, adapter=adapter)
    probe = list(prompts[:8])
    before = bridge_logits(model, probe)
    handle._apply_checked(model)
    check = bridge_check(model, trained, probe, before)
    handle.evidence["bridge_check"] = check
    if not check["ok"]:
        handle.restore()
        raise MecheditError(f"the merged {method} change does not act through the bridge as it did in training "
                            f"(max logit difference {check['max_logit_mismatch']:.3g}); the edit was undone")
    return handle


# ---------------------------------------------------------------------------------------------------------------
# Editors
# ---------------------------------------------------------------------------------------------------------------


def ia3(model: LoadedModel, requests: Sequence[EditRecord], hparams: IA3HyperParams | None = None,
        progress: Progress | None = None) -> EditHandle:
    """Teach ``model`` each request's ``target_new`` with one (IA)³ adapter on the selected modules, merged.
    Edits ``model`` in place and returns the applied handle (``restore()`` undoes it bit-exactly)."""
    hp = hparams if hparams is not None else IA3HyperParams()
    if not isinstance(hp, IA3HyperParams):
        raise InputError(f"hparams must be IA3HyperParams, got {type(hp).__name__}")
    reqs = check_requests(model, requests)
    fingerprint = model.fingerprint()
    names, why = _select(model, reqs, hp)
    prompts, answers = _pairs(model, reqs, hp)
    trained, adapter, losses = train_stage(
        model, unbridged_copy(model), names, prompts, answers, steps=hp.steps, lr=hp.lr, stop_loss=hp.stop_loss,
        seed=hp.seed, stage="ia3", progress=progress)
    evidence = {"modules": names, "feedforward_modules": feedforward_modules(model, names), "selection": why,
                "training_prompts": prompts, "losses": losses, "steps_run": len(losses)}
    return _finish(model, "ia3", reqs, hp, trained, adapter, names, fingerprint, evidence, prompts)


def ia3_unlearn_learn(model: LoadedModel, requests: Sequence[EditRecord],
                      hparams: UnlearnLearnHyperParams | None = None,
                      progress: Progress | None = None) -> EditHandle:
    """Stage 1: (IA)³ towards ``uncertain_answer`` on every training prompt, merged; stage 2: a second (IA)³ on
    the same modules towards ``target_new``, merged. The handle's deltas are the total change; its adapter is the
    single (IA)³ adapter equal to both (vectors multiplied); evidence holds both stages' losses."""
    hp = hparams if hparams is not None else UnlearnLearnHyperParams()
    if not isinstance(hp, UnlearnLearnHyperParams):
        raise InputError(f"hparams must be UnlearnLearnHyperParams, got {type(hp).__name__}")
    reqs = check_requests(model, requests)
    fingerprint = model.fingerprint()
    names, why = _select(model, reqs, hp)
    prompts, unsure = _pairs(model, reqs, hp, answer=hp.uncertain_answer)
    _, answers = _pairs(model, reqs, hp)
    stage1, adapter1, losses1 = train_stage(
        model, unbridged_copy(model), names, prompts, unsure, steps=hp.unlearn_steps, lr=hp.unlearn_lr,
        stop_loss=hp.unlearn_stop_loss, seed=hp.seed, stage="unlearn", progress=progress)
    trained, adapter2, losses2 = train_stage(
        model, stage1, names, prompts, answers, steps=hp.steps, lr=hp.lr, stop_loss=hp.stop_loss, seed=hp.seed,
        stage="learn", progress=progress)
    w1, w2 = adapter1["weights"], adapter2["weights"]
    if set(w1) != set(w2):
        raise MecheditError("the two stages' adapters cover different modules; cannot combine them")
    adapter = {"config": adapter2["config"], "weights": {k: w1[k] * w2[k] for k in w2}}
    evidence = {"modules": names, "feedforward_modules": feedforward_modules(model, names), "selection": why,
                "training_prompts": prompts, "uncertain_answer": hp.uncertain_answer,
                "unlearn_losses": losses1, "learn_losses": losses2,
                "steps_run": {"unlearn": len(losses1), "learn": len(losses2)},
                "adapter": "one (IA)³ adapter equal to both stages: each vector is unlearn ⊙ learn"}
    return _finish(model, "ia3-unlearn-learn", reqs, hp, trained, adapter, names, fingerprint, evidence, prompts)
