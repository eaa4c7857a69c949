"""LoRA edits (Hu et al. 2021, through peft) and regularized LoRA.

**LoRA** trains, for each chosen linear module W (d_out × d_in), a low-rank update

    W' = W + (alpha / rank) · B A,    A: (rank × d_in) random (Kaiming, seeded), B: (d_out × rank) zeros,

so at initialisation the model is unchanged, minimising the new answer's negative log-likelihood per token on the
requests' prompts (and paraphrases if asked). Training runs on an un-bridged copy wrapped by peft
(RESOURCES.md: peft on the bridged model only half works). The handle's deltas are the exact merged change
``W' - W``, so apply/restore work as for every method; the trained adapter itself rides along as
``handle.adapter`` and ``handle.save(dir)`` writes ``dir/adapter/``, which ``PeftModel.from_pretrained`` loads on
an ordinary copy of the model.

**Regularized LoRA** (``reg_lora``) trains the same adapter on the edit data *mixed with retention data* and
adds a KL term to the frozen, unedited model on that retention data:

    L = NLL(edit)  +  retention_weight · NLL(retention answers)  +  kl_weight · KL(p_frozen ‖ p_θ)

with each term a mean over its rows (NLL per answer token; KL per token position of the retention prompts).
The NLL term keeps the answers of the retention facts; the KL term keeps the whole next-token distribution of
the unedited model on that text, not just its top answer. With both weights 1 a retention row counts as much
as an edit row. Retention data (``retention``):

* ``"auto"`` on the embedded world model (a ``world.json`` beside it): ``n_retention_facts`` other facts of the
  world, each in a random training template with its true object, and ``n_retention_sums`` sums of the
  arithmetic suite ("3+4=" → "7"). Facts whose prompt is one of the requests' neighbourhood prompts, and the
  edited (subject, relation) pairs themselves, are left out, so the neighbourhood score stays a held-out test;
* ``"auto"`` on any other model: the requests' neighbourhood prompts with their answers (the neighbourhood
  score then measures training data: say so when you report it);
* a list of ``"PROMPT => ANSWER"`` items (NLL and KL) or plain prompts (KL only).

>>> import mechedit
>>> from mechedit.toy.export import embedded_world, world_records
>>> m = mechedit.load()                                                          # doctest: +SKIP
>>> request = world_records(embedded_world(), n=1)[0]
>>> handle = lora(m, [request], LoRAHyperParams(modules="mlp", rank=4))          # doctest: +SKIP
>>> handle.save("edits/lora-1")   # edits/lora-1/adapter/ loads with PeftModel.from_pretrained   # doctest: +SKIP
>>> handle.restore()                                                             # doctest: +SKIP
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    AnswerBatch,
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
from mechedit.model import LoadedModel


@dataclass(frozen=True)
class LoRAHyperParams(HyperParams):
    # Linear modules that get an adapter, as select_modules takes them: "mlp" (every MLP projection), "attn",
    # "all" (every projection), "auto" (locate's module set for the first request), "random", or HF names /
    # "L.kind" shorthands ("3.mlp_out"). Default "mlp": the MLPs are where facts are stored (ROME's trace), and
    # on GPT-2 the fused attention projection is a Conv1D that the bridge splits (RESOURCES.md).
    modules: str | tuple[str, ...] = "mlp"
    layers: tuple[int, ...] | None = None  # restrict `modules` to these decoder layers (None: every layer)
    rank: int = 8  # r: rank of B A
    alpha: float = 16.0  # the update is scaled by alpha / rank (= 2, the common choice alpha = 2 r)
    # Dropout on the adapter's input. 0: training is deterministic given the seed (and dropout only adds noise
    # to a handful of prompts).
    dropout: float = 0.0
    # Adam steps over the whole batch, and the learning rate: LoRA's zero-initialised B needs a larger step than
    # full fine-tuning; on the embedded model 30 steps at 5e-3 make every one of 6 trial edits succeed.
    steps: int = 30
    lr: float = 5e-3
    use_paraphrases: bool = False  # also train on each request's paraphrases (as in FTHyperParams)
    stop_loss: float | None = None  # stop once the training loss is below this (None: run all steps)
    seed: int = 0  # seeds A's initialisation (and the "random" module set): same seed, same edit

    def __post_init__(self) -> None:
        _check_lora(self)


@dataclass(frozen=True)
class RegLoRAHyperParams(HyperParams):
    # The LoRA fields, as in LoRAHyperParams.
    modules: str | tuple[str, ...] = "mlp"
    layers: tuple[int, ...] | None = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    steps: int = 30
    lr: float = 5e-3
    use_paraphrases: bool = False
    stop_loss: float | None = None
    seed: int = 0  # also seeds which retention facts and sums are drawn
    # Retention data: "auto" (see the module docstring) or a list of "PROMPT => ANSWER" items / plain prompts.
    retention: str | tuple[str, ...] = "auto"
    n_retention_facts: int = 16  # embedded world: other facts drawn (seeded) as retention rows (cost: one row each)
    n_retention_sums: int = 8  # embedded world: sums of the arithmetic suite drawn as retention rows
    retention_weight: float = 1.0  # weight of the retention answers' NLL (1: a retention row counts as an edit row)
    kl_weight: float = 1.0  # weight of KL(frozen ‖ edited) per retention token position

    def __post_init__(self) -> None:
        _check_lora(self)
        if isinstance(self.retention, str):
            if self.retention != "auto":
                raise InputError(f"retention must be 'auto' or a list of 'PROMPT => ANSWER' items or prompts, got "
                                 f"{self.retention!r}")
        elif (not isinstance(self.retention, tuple) or not self.retention
              or not all(isinstance(x, str) and x.strip() for x in self.retention)):
            raise InputError(f"retention must be 'auto' or a non-empty list of non-empty strings, got "
                             f"{self.retention!r}")
        for name in ("n_retention_facts", "n_retention_sums"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"{name} must be an integer >= 0, got {v!r}")
        for name in ("retention_weight", "kl_weight"):
            v = getattr(self, name)
            if not is_number(v) or v < 0:
                raise InputError(f"{name} must be a number >= 0, got {v!r}")


def _check_lora(hp) -> None:
    check_modules_field(hp.modules)
    check_layers_field(hp.layers)
    if isinstance(hp.rank, bool) or not isinstance(hp.rank, int) or hp.rank <= 0:
        raise InputError(f"rank must be a positive integer, got {hp.rank!r}")
    if not is_positive(hp.alpha):
        raise InputError(f"alpha must be a positive number, got {hp.alpha!r}")
    if not is_number(hp.dropout) or not 0 <= hp.dropout < 1:
        raise InputError(f"dropout must be a number in [0, 1), got {hp.dropout!r}")
    if isinstance(hp.steps, bool) or not isinstance(hp.steps, int) or hp.steps <= 0:
        raise InputError(f"steps must be a positive integer, got {hp.steps!r}")
    if not is_positive(hp.lr):
        raise InputError(f"lr must be a positive number, got {hp.lr!r}")
    if hp.stop_loss is not None and not is_number(hp.stop_loss):
        raise InputError(f"stop_loss must be a number or None, got {hp.stop_loss!r}")
    if isinstance(hp.seed, bool) or not isinstance(hp.seed, int):
        raise InputError(f"seed must be an integer, got {hp.seed!r}")


# -- editors --------------------------------------------------------------------------------------------------------


def lora(model: LoadedModel, requests: EditRecord | Sequence[EditRecord], hparams: LoRAHyperParams | None = None,
         progress: Progress | None = None) -> EditHandle:
    """Train a LoRA adapter on the requests, merge it, and apply the merged change to ``model``; returns the
    applied handle (``handle.adapter`` holds the adapter in peft's form).

    Raises:
        InputError: bad requests or hyperparameters (module not in the model, empty module set, ...);
        MecheditError: training diverged. The weights are untouched in both cases.
    """
    hparams = LoRAHyperParams() if hparams is None else hparams
    if not isinstance(hparams, LoRAHyperParams):
        raise InputError(f"hparams must be a LoRAHyperParams, got {type(hparams).__name__}")
    return _train_lora(model, check_requests(model, requests), hparams, progress, "lora")


def reg_lora(model: LoadedModel, requests: EditRecord | Sequence[EditRecord],
             hparams: RegLoRAHyperParams | None = None, progress: Progress | None = None) -> EditHandle:
    """LoRA trained on the edit data mixed with retention data, plus a KL term to the frozen model on the
    retention data (see the module docstring). The retention rows are recorded in the handle's evidence."""
    hparams = RegLoRAHyperParams() if hparams is None else hparams
    if not isinstance(hparams, RegLoRAHyperParams):
        raise InputError(f"hparams must be a RegLoRAHyperParams, got {type(hparams).__name__}")
    reqs = check_requests(model, requests)
    pairs, source = retention_data(model, reqs, hparams)
    kl_batch = answer_batch(model, [p for p, _ in pairs], [a for _, a in pairs])  # None: prompt alone

    def extra(hf: torch.nn.Module, frozen_logprobs: torch.Tensor) -> torch.Tensor:
        # one forward over the retention rows gives both terms
        mask, labels = kl_batch.attention_mask, kl_batch.labels
        lp = _logprobs(hf, kl_batch)  # (B, T, V)
        kl = (frozen_logprobs.exp() * (frozen_logprobs - lp)).sum(-1)  # (B, T)
        m = mask.to(kl.dtype)
        loss = hparams.kl_weight * (kl * m).sum() / m.sum().clamp_min(1)
        answer = labels[:, 1:] != -100  # (B, T-1): positions whose next token is an answer token
        if hparams.retention_weight and bool(answer.any()):
            nll = -lp[:, :-1].gather(-1, labels[:, 1:].clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
            per_row = (nll * answer).sum(1) / answer.sum(1).clamp_min(1)  # per answer token, per row
            has = answer.any(1)
            loss = loss + hparams.retention_weight * per_row[has].mean()
        return loss

    evidence = {"retention_source": source, "retention": [{"prompt": p, "answer": a} for p, a in pairs]}
    return _train_lora(model, reqs, hparams, progress, "reg-lora", extra=extra, kl_batch=kl_batch,
                       extra_evidence=evidence)


def _train_lora(model: LoadedModel, reqs: list[EditRecord], hp, progress: Progress | None, method: str,
                extra: Callable | None = None, kl_batch: AnswerBatch | None = None,
                extra_evidence: dict | None = None) -> EditHandle:
    from peft import LoraConfig, get_peft_model

    fingerprint = model.fingerprint()
    check_layers(model, hp.layers)
    prompts, answers = edit_pairs(reqs, hp.use_paraphrases)
    batch = answer_batch(model, prompts, answers)  # bad prompts/targets fail here, before training
    modules, evidence = select_modules(model, hp.modules, reqs, seed=hp.seed)
    modules = modules_in_layers(model, modules, hp.layers)
    if not modules:
        raise InputError(f"no module of {hp.modules!r} lies in layers {list(hp.layers)}; the set to train is empty")
    hf = unbridged_copy(model)
    frozen = None
    if kl_batch is not None:  # the unedited model's next-token log-probabilities on the retention prompts
        with torch.no_grad():
            frozen = _logprobs(hf, kl_batch)
    with torch.no_grad():
        loss_before = float(answer_loss(hf, batch))
    config = LoraConfig(r=hp.rank, lora_alpha=hp.alpha, lora_dropout=hp.dropout, target_modules=list(modules),
                        fan_in_fan_out=model.conv1d, bias="none", init_lora_weights=True)
    with seeded(hp.seed):
        peft_model = get_peft_model(hf, config)
        if hp.dropout > 0:  # only the adapter's dropout is active; the base model stays in eval mode
            for name, sub in peft_model.named_modules():
                if name.endswith("lora_dropout"):
                    sub.train()

        def loss_fn(step: int) -> torch.Tensor:
            loss = answer_loss(peft_model, batch)
            return loss + extra(peft_model, frozen) if extra is not None else loss

        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        losses = adam_loop(trainable, loss_fn, hp.steps, hp.lr, stage="train", progress=progress,
                           stop_below=hp.stop_loss)
    peft_model.eval()
    adapter = _adapter(peft_model)
    merged = peft_model.merge_and_unload()
    deltas = weight_deltas(model, merged, [f"{m}.weight" for m in modules])
    with torch.no_grad():
        loss_after = float(answer_loss(merged, batch))
    evidence = {**evidence, **(extra_evidence or {}), "trained_modules": modules, "train_prompts": prompts,
                "n_adapter_parameters": int(sum(t.numel() for t in adapter["weights"].values())),
                "loss_before": loss_before, "losses": losses, "loss_after_merge": loss_after}
    handle = EditHandle(method=method, deltas=deltas, hparams=hp.to_dict(), requests=[r.to_dict() for r in reqs],
                        model_name=model.name, model_fingerprint=fingerprint, evidence=evidence, adapter=adapter)
    handle._apply_checked(model)
    return handle


def _adapter(peft_model) -> dict:
    """The adapter exactly as peft saves it (adapter_config.json as a dict, adapter weights by their saved
    names), so that writing them back gives a directory PeftModel.from_pretrained loads."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        config = json.loads((Path(tmp) / "adapter_config.json").read_text())
        weights = {k: v.clone() for k, v in load_file(str(Path(tmp) / "adapter_model.safetensors")).items()}
    return {"config": config, "weights": weights}


# -- retention data and the KL term ---------------------------------------------------------------------------------


def retention_data(model: LoadedModel, requests: Sequence[EditRecord],
                   hp: RegLoRAHyperParams) -> tuple[list[tuple[str, str | None]], str]:
    """(prompt, answer or None) retention rows and where they came from ("world", "neighbourhood", "given")."""
    if hp.retention != "auto":
        rows = []
        for item in hp.retention:
            if "=>" in item:
                p, a = (s.strip() for s in item.split("=>", 1))
                if not p or not a:
                    raise InputError(f"retention item {item!r}: write it as 'PROMPT => ANSWER' or a plain prompt")
                rows.append((p, a))
            else:
                rows.append((item, None))
        return rows, "given"
    world_file = model.path / "world.json" if model.path is not None else None
    if world_file is not None and world_file.is_file():
        from mechedit.toy.world import World

        return _world_retention(World.load(world_file), requests, hp), "world"
    rows = [(p, a) for r in requests for p, a in r.neighborhood]
    if not rows:
        raise InputError("reg-lora needs retention data: this model has no embedded world and the requests have no "
                         "neighbourhood prompts; pass retention=['PROMPT => ANSWER', ...]")
    return rows, "neighbourhood"


def _world_retention(world, requests: Sequence[EditRecord], hp: RegLoRAHyperParams) -> list[tuple[str, str]]:
    rng = random.Random(f"reg-lora/{hp.seed}")
    edited = {(r.subject, r.relation_id) for r in requests}
    held_out = {p for r in requests for p, _ in r.neighborhood}  # the evaluation's neighbourhood stays unseen
    candidates = []
    for f in world.facts:
        if (f.subject, f.relation) in edited:
            continue
        templates = world.templates(f.relation)
        if any(t.format(f.subject) in held_out for t in templates):
            continue  # a neighbour's fact is left out in every wording
        candidates.append((f, templates))
    picked = rng.sample(candidates, min(hp.n_retention_facts, len(candidates)))
    rows = [(rng.choice(ts).format(f.subject), f.object) for f, ts in picked]
    sums = world.sum_prompts()
    rows += rng.sample(sums, min(hp.n_retention_sums, len(sums)))
    return rows


def _logprobs(hf: torch.nn.Module, batch: AnswerBatch) -> torch.Tensor:
    logits = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
