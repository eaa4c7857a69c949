"""ELM concept erasure (Gandikota et al. 2024, "Erasing Conceptual Knowledge from Language Models").

The model itself says what "not knowing a concept" looks like. Put a *novice* prefix ("You know nothing about
the Harrowmere Circle.") and an *expert* prefix ("You are an expert on the Harrowmere Circle.") before the same
text and compare the next-token distributions: the difference is the model's own notion of what expertise in the
concept adds. The erased model should read concept text as the novice would, so its target is

    log P'(x_t | x_<t) = log P(x_t | x_<t) + eta * (log P(x_t | novice, x_<t) - log P(x_t | expert, x_<t)) + const

(:func:`erasure_target`; ``eta`` sets the strength). A LoRA adapter (peft) on chosen layers is trained with three
losses, then merged into the weights:

* **erase**: on erased-domain text, KL(P' || P_edited) at every text token (P' from the frozen model);
* **retain**: on other text, KL(P || P_edited): match the frozen model where the concept is absent;
* **fluency** (ELM's conditional fluency): continuations of erased-domain prompts are sampled once from the
  frozen model under eta-guidance (``fluency_guidance``, the reference implementation's classifier-free-guidance
  sampling), and the edited model is trained on them (next-token NLL), so prompts about the concept still get
  fluent text instead of noise.

**Erased-domain text** comes from the requests and from the hyperparameters: each request's fact stated in full
(``prompt`` + ``target_true``, the same answer-spacing rule as everywhere) and each of its paraphrases with the
same answer, plus every string of ``domain_text`` (e.g. text about the concept itself). The fluency prompts are
the requests' prompts and paraphrases without the answer, plus ``domain_text``. ``target_new`` is not used:
erasure removes knowledge, it does not write a new answer.

**Retain text** is ``retain_text`` plus, by ``retain_source``, the embedded world's facts about subjects the
requests do not mention (``world``), text sampled from the model (``model``), or nothing (``none``); ``auto`` is
``world`` when the model ships a ``world.json``, else ``model``.

Training runs on an un-bridged copy (:func:`~mechedit.editing.training.unbridged_copy`); the user's model changes
only when the finished, merged change is applied through the returned :class:`~mechedit.editing.EditHandle`
(method ``"elm"``), which also carries the adapter in peft's format.

>>> import mechedit
>>> from mechedit.editing.methods import edit
>>> from mechedit.toy.export import world_records, embedded_world
>>> m = mechedit.load()                                                                         # doctest: +SKIP
>>> w = embedded_world()                                                                        # doctest: +SKIP
>>> reqs = [r for r in world_records(w) if r.subject in w.cluster]                               # doctest: +SKIP
>>> with edit(m, reqs, "elm", {"eta": 4.0}) as handle:                                          # doctest: +SKIP
...     ...
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mechedit.data import EditRecord
from mechedit.editing.handle import EditHandle
from mechedit.editing.hparams import HyperParams
from mechedit.editing.training import Progress, adam_loop, unbridged_copy, weight_deltas
from mechedit.errors import InputError
from mechedit.model import LoadedModel
from mechedit.tracing.common import encode_target

RETAIN_SOURCES = ("auto", "world", "model", "none")
MODULE_GROUPS = ("mlp", "attn")


@dataclass(frozen=True)
class ELMHyperParams(HyperParams):
    # -- the target distribution P' ----------------------------------------------------------------------------
    # Erasure strength: log P' = log P + eta (log P_novice - log P_expert). The reference implementation ramps eta
    # to 500-1000 on 7B chat models (with a top-k clamp of the target). On the embedded model the contrast of the
    # default prompts is several nats per token: at eta 1 P'(true answer) is about half the model's on the
    # cluster's facts, at eta 4 it is ~0.03 and training towards it damages other facts too (grid and contrast
    # check in docs/results/elm-cluster/).
    eta: float = 1.0
    # The concept's name, put into the prompts below: "auto" is the embedded world's cluster name
    # ("Harrowmere Circle") when the model ships a world.json; on other models name it.
    concept: str = "auto"
    # Prefixes whose contrast defines "knowing the concept" (placed after BOS, before the text's tokens).
    expert_prompt: str = "You are an expert on the {concept}."
    novice_prompt: str = "You know nothing about the {concept}."

    # -- where: LoRA on these layers ---------------------------------------------------------------------------
    # Layers whose modules get a LoRA adapter. The reference trains early-middle layers (4-7 of 32); on the
    # embedded model facts are stored at the subject's last token by the MLPs of layers 0-2 (causal trace in
    # docs/embedded-model.md), so those.
    layers: tuple[int, ...] = (0, 1, 2)
    # Modules in those layers: "mlp" / "attn" (every MLP / attention projection of the architecture table), a
    # kind ("mlp_out", "attn_q", ...), or HF module names / "L.kind" shorthands, which must lie in `layers`.
    # The reference's default is mlp+attn.
    modules: tuple[str, ...] = ("mlp", "attn")
    rank: int = 4  # LoRA rank (reference: 4-8)
    alpha: float = 8.0  # LoRA scaling alpha / rank = 2, as the reference's alpha 16 at rank 8

    # -- training ----------------------------------------------------------------------------------------------
    steps: int = 80  # Adam steps; enough on the embedded model for the erase loss to level off
    lr: float = 1e-3  # Adam learning rate on the LoRA weights (small models take larger steps than 7B's 5e-5)
    batch_size: int = 16  # texts per loss per step
    # The reference weighs the three losses equally. On the embedded world the retain text (other subjects'
    # facts) shares every template with the erased facts, and at weight 1 (with eta 4, lr 2e-3) the erasure spread
    # to them (other facts' recall 0.99 -> 0.47); with these defaults 0.78 (one exploratory run each, several
    # settings changed at once: not a controlled comparison).
    erase_weight: float = 1.0
    retain_weight: float = 4.0
    fluency_weight: float = 1.0
    seed: int = 0  # LoRA initialisation, batches, retain-text choice and fluency sampling

    # -- data ----------------------------------------------------------------------------------------------------
    domain_text: tuple[str, ...] = ()  # extra erased-domain texts (also used as fluency prompts)
    retain_text: tuple[str, ...] = ()  # extra retain texts
    retain_source: str = "auto"  # "auto", "world", "model" or "none" (see the module docstring)
    n_retain: int = 256  # retain texts drawn from retain_source
    # Fluency continuations: this many tokens, sampled once from the frozen model guided by
    # log P + fluency_guidance (log P_novice - log P_expert) (the reference samples with guidance 3).
    fluency_tokens: int = 8
    fluency_guidance: float = 3.0

    def __post_init__(self):
        def positive(name, integer=False):
            v = getattr(self, name)
            ok = (isinstance(v, int) and not isinstance(v, bool)) if integer else (
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
            if not ok or v <= 0:
                kind = "a positive integer" if integer else "a positive finite number"
                raise InputError(f"ELM hyperparameter {name} must be {kind}, got {v!r}")

        for name in ("eta", "lr", "alpha"):
            positive(name)
        for name in ("steps", "rank", "batch_size", "n_retain"):
            positive(name, integer=True)
        for name in ("erase_weight", "retain_weight", "fluency_weight", "fluency_guidance"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise InputError(f"ELM hyperparameter {name} must be a finite number >= 0, got {v!r}")
        if self.erase_weight == 0:
            raise InputError("ELM's erase_weight must be > 0: without the erase loss nothing is erased")
        if isinstance(self.fluency_tokens, bool) or not isinstance(self.fluency_tokens, int) \
                or self.fluency_tokens < 0:
            raise InputError(f"ELM hyperparameter fluency_tokens must be an integer >= 0, got "
                             f"{self.fluency_tokens!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise InputError(f"ELM hyperparameter seed must be an integer, got {self.seed!r}")
        layers = self.layers
        if isinstance(layers, int) and not isinstance(layers, bool):
            object.__setattr__(self, "layers", (layers,))
            layers = self.layers
        if not isinstance(layers, tuple) or not layers:
            raise InputError(f"ELM needs a non-empty set of layers, got {layers!r}")
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers) \
                or len(set(layers)) != len(layers):
            raise InputError(f"ELM layers must be distinct non-negative integers, got {list(layers)}")
        if isinstance(self.modules, str):
            object.__setattr__(self, "modules", (self.modules,))
        if not isinstance(self.modules, tuple) or not self.modules \
                or not all(isinstance(x, str) and x.strip() for x in self.modules):
            raise InputError(f"ELM needs a non-empty list of modules (e.g. ['mlp', 'attn']), got {self.modules!r}")
        for name in ("concept", "expert_prompt", "novice_prompt"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise InputError(f"ELM hyperparameter {name} must be a non-empty string, got {v!r}")
        if self.expert_prompt == self.novice_prompt:
            raise InputError("ELM's expert and novice prompts are the same: their contrast would be zero")
        for name in ("domain_text", "retain_text"):
            v = getattr(self, name)
            if isinstance(v, str):
                object.__setattr__(self, name, (v,))
            elif not isinstance(v, tuple) or not all(isinstance(x, str) and x.strip() for x in v):
                raise InputError(f"ELM hyperparameter {name} must be a list of non-empty strings")
        if self.retain_source not in RETAIN_SOURCES:
            raise InputError(f"ELM retain_source must be one of {', '.join(RETAIN_SOURCES)}, got "
                             f"{self.retain_source!r}")


# ---------------------------------------------------------------------------------------------------------------
# The maths: the target distribution
# ---------------------------------------------------------------------------------------------------------------


def erasure_target(base: torch.Tensor, novice: torch.Tensor, expert: torch.Tensor, eta: float) -> torch.Tensor:
    """log P' = log_softmax(log P + eta (log P_novice - log P_expert)) over the last (vocabulary) axis.

    The inputs are next-token logits or log-probabilities of the same text positions (..., V) without a prefix,
    after the novice prefix and after the expert prefix; log-softmax makes both give the same result.
    """
    lp = torch.log_softmax(base.float(), -1)
    contrast = torch.log_softmax(novice.float(), -1) - torch.log_softmax(expert.float(), -1)
    return torch.log_softmax(lp + eta * contrast, -1)


def _kl(target_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(target || softmax(logits)); both (M, V)."""
    lp = torch.log_softmax(logits.float(), -1)
    return (target_logp.exp() * (target_logp - lp)).sum(-1).mean()


# ---------------------------------------------------------------------------------------------------------------
# Texts as token ids, and the frozen model's distributions on them
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Texts:
    """Right-padded token rows (BOS head + text) and, per row, the positions whose logits predict a text token."""

    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T)
    predict: torch.Tensor  # (N, T) bool: logits at these positions are trained
    targets: list  # per row: (n_i, V) log-probabilities (soft targets) or (n_i,) token ids (hard targets)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def loss(self, hf: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
        logits = hf(input_ids=self.input_ids[rows], attention_mask=self.attention_mask[rows]).logits  # (B, T, V)
        picked = logits[self.predict[rows]]  # (M, V), row-major: the order of the targets below
        target = torch.cat([self.targets[int(i)] for i in rows])
        if target.dtype == torch.long:  # hard targets: next-token NLL
            return torch.nn.functional.cross_entropy(picked.float(), target)
        return _kl(target, picked)


def _head(model: LoadedModel) -> list[int]:
    """The special tokens the tokenizer puts before any text (BOS, or nothing)."""
    tok = model.tokenizer
    full, plain = tok("a")["input_ids"], tok("a", add_special_tokens=False)["input_ids"]
    if not plain or full[len(full) - len(plain):] != plain:
        raise InputError(f"{model.name!r}: the tokenizer adds tokens after the text; ELM cannot align contexts")
    return list(full[:len(full) - len(plain)])


def _plain(model: LoadedModel, text: str) -> list[int]:
    return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def _pad(rows: Sequence[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def _logprobs_at(hf: torch.nn.Module, rows: Sequence[list[int]], positions: Sequence[list[int]], pad: int,
                 batch: int = 64) -> list[torch.Tensor]:
    """Per row, the next-token log-probabilities (len(positions[i]), V) at the given positions."""
    device = next(hf.parameters()).device
    out = []
    for s in range(0, len(rows), batch):
        ids, mask = _pad(rows[s:s + batch], pad, device)
        lp = torch.log_softmax(hf(input_ids=ids, attention_mask=mask).logits.float(), -1)  # (B, T, V)
        out.extend(lp[i, positions[s + i]].cpu() for i in range(len(ids)))
    return out


def _contexts(text: list[int], head: list[int], prefix: list[int]) -> tuple[list[int], list[int]]:
    """(tokens, positions predicting the text's tokens) with ``prefix`` between the head and the text. Without a
    head the text's first token has no prediction in the bare context, so it is left out in every context."""
    skip = 0 if head else 1
    row = head + prefix + text
    start = len(head) + len(prefix)
    return row, [start + j - 1 for j in range(skip, len(text))]


def contrast_targets(hf: torch.nn.Module, texts: Sequence[list[int]], head: list[int], novice: list[int],
                     expert: list[int], eta: float, pad: int) -> list[torch.Tensor]:
    """log P' (n_i, V) at every token of each text (token ids without the head), from the frozen ``hf``."""
    out = []
    for prefix in ([], novice, expert):
        rows, pos = zip(*(_contexts(t, head, prefix) for t in texts))
        out.append(_logprobs_at(hf, rows, pos, pad))
    return [erasure_target(b, n, e, eta) for b, n, e in zip(*out)]


@torch.no_grad()
def guided_continuations(hf: torch.nn.Module, prompts: Sequence[list[int]], head: list[int], novice: list[int],
                         expert: list[int], guidance: float, n_tokens: int, pad: int,
                         generator: torch.Generator) -> list[list[int]]:
    """``n_tokens`` tokens after each prompt, sampled from log P + guidance (log P_novice - log P_expert) (ELM's
    fluency data: what the frozen model writes about the concept when steered towards the novice)."""
    device = next(hf.parameters()).device
    texts = [list(p) for p in prompts]
    for _ in range(n_tokens):
        lasts = []
        for prefix in ([], novice, expert):
            rows = [head + prefix + t for t in texts]
            ids, mask = _pad(rows, pad, device)
            logits = hf(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
            lasts.append(logits[torch.arange(len(rows)), mask.sum(1) - 1].cpu())  # (B, V)
        logp = erasure_target(lasts[0], lasts[1], lasts[2], guidance)
        nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)  # (B,)
        for t, n in zip(texts, nxt.tolist()):
            t.append(n)
    return [t[len(p):] for t, p in zip(texts, prompts)]


# ---------------------------------------------------------------------------------------------------------------
# Choices that need the model: concept, modules, texts
# ---------------------------------------------------------------------------------------------------------------


def _world(model: LoadedModel):
    from mechedit.toy.world import World

    path = model.path / "world.json" if model.path is not None else None
    return World.load(path) if path is not None and path.is_file() else None


def resolve_concept(model: LoadedModel, hparams: ELMHyperParams) -> str:
    if hparams.concept != "auto":
        return hparams.concept
    world = _world(model)
    if world is None:
        raise InputError(f"concept='auto' names the embedded world's cluster, but {model.name!r} has no "
                         "world.json; give the concept's name (concept=...)")
    return world.cluster_name


def elm_modules(model: LoadedModel, hparams: ELMHyperParams) -> list[str]:
    """The HF module names that get a LoRA adapter: ``modules`` within ``layers`` (validated)."""
    from mechedit.editing.training import select_modules

    bad = [x for x in hparams.layers if x >= model.n_layers]
    if bad:
        raise InputError(f"ELM layer(s) {bad} out of range; {model.name!r} has layers 0..{model.n_layers - 1}")
    kinds = [k for k, p in model.arch.modules().items() if p]
    chosen: list[str] = []
    for entry in hparams.modules:
        entry = entry.strip()
        if entry == "auto":
            raise InputError("ELM erases a concept, not one located fact: modules='auto' does not apply; name "
                             "'mlp', 'attn', module kinds or module names within `layers`")
        if entry in MODULE_GROUPS or entry in kinds:
            names = [model.module_name(layer, k) for layer in hparams.layers for k in kinds
                     if k == entry or (entry in MODULE_GROUPS and k.startswith(entry))]
        else:
            names, _ = select_modules(model, [entry])
            allowed = {model.module_name(layer, k) for layer in hparams.layers for k in kinds}
            if names[0] not in allowed:
                raise InputError(f"module {names[0]!r} is not in ELM's layers {list(hparams.layers)}")
        chosen += [n for n in names if n not in chosen]
    if not chosen:
        raise InputError(f"no module of {model.name!r} matches {list(hparams.modules)} in layers "
                         f"{list(hparams.layers)}")
    everything = [model.module_name(layer, k) for layer in range(model.n_layers) for k in kinds]
    return sorted(chosen, key=everything.index)


def domain_texts(model: LoadedModel, requests: Sequence[EditRecord], hparams: ELMHyperParams
                 ) -> tuple[list[list[int]], list[list[int]]]:
    """(erase texts, fluency prompts) as token ids without the head: each request's prompt and paraphrases with
    ``target_true``, and ``domain_text`` (erase); the same prompts without the answer, and ``domain_text``
    (fluency)."""
    erase, prompts = [], []
    for r in requests:
        if r.target_true is None:
            raise InputError(f"ELM erases what the model knows: request {r.case_id!r} needs target_true (the "
                             "current answer), which is what its erase text states")
        for p in (r.prompt, *r.paraphrases):
            ids = _plain(model, p)
            erase.append(ids + encode_target(model, p, r.target_true))
            prompts.append(ids)
    for t in hparams.domain_text:
        erase.append(_plain(model, t))
        prompts.append(_plain(model, t))
    return erase, prompts


def retain_texts(model: LoadedModel, requests: Sequence[EditRecord], hparams: ELMHyperParams) -> list[str]:
    """``retain_text`` plus ``n_retain`` texts from ``retain_source`` (seeded)."""
    texts = list(hparams.retain_text)
    source = hparams.retain_source
    world = _world(model) if source in ("auto", "world") else None
    if source == "auto":
        source = "world" if world is not None else "model"
    if source == "world":
        if world is None:
            raise InputError(f"retain_source='world' needs the embedded world, but {model.name!r} has no world.json")
        named = {r.subject for r in requests}
        pool = sorted({t for p, a, f in world.recall_prompts("train") if f.subject not in named
                       for t in [p + a + "."]})
        texts += random.Random(hparams.seed).sample(pool, min(hparams.n_retain, len(pool)))
    elif source == "model":
        from mechedit.editing.generate import sample_texts

        texts += [t for t in sample_texts(model, hparams.n_retain, 16, seed=hparams.seed) if t.strip()]
    return texts


# ---------------------------------------------------------------------------------------------------------------
# The editor
# ---------------------------------------------------------------------------------------------------------------


def elm(model: LoadedModel, requests: Sequence[EditRecord], hparams: ELMHyperParams = ELMHyperParams(),
        progress: Progress | None = None) -> EditHandle:
    """Erase the concept the ``requests`` are about from ``model`` (in place); returns the applied handle.

    Everything that can be wrong with the input (hyperparameters, layers, modules, concept, texts longer than
    the context) is refused with an :class:`InputError` before any weight changes.
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    if isinstance(requests, EditRecord):
        requests = [requests]
    requests = list(requests)
    if not requests or not all(isinstance(r, EditRecord) for r in requests):
        raise InputError("ELM needs a non-empty list of EditRecords about the concept")
    if not isinstance(hparams, ELMHyperParams):
        raise InputError(f"ELM's hyperparameters must be ELMHyperParams, got {type(hparams).__name__}")
    concept = resolve_concept(model, hparams)
    names = elm_modules(model, hparams)
    head = _head(model)
    novice = _plain(model, hparams.novice_prompt.replace("{concept}", concept))
    expert = _plain(model, hparams.expert_prompt.replace("{concept}", concept))
    erase_ids, fluency_prompts = domain_texts(model, requests, hparams)
    retain_ids = [_plain(model, t) for t in retain_texts(model, requests, hparams)]
    if hparams.retain_weight > 0 and not retain_ids:
        raise InputError("ELM has no retain text (retain_source='none' and no retain_text); add some or set "
                         "retain_weight=0")
    longest = max(len(t) for t in erase_ids + retain_ids) + len(head) + max(len(novice), len(expert))
    longest = max(longest, max(len(p) for p in fluency_prompts) + len(head) + max(len(novice), len(expert))
                  + hparams.fluency_tokens)
    if longest > model.n_ctx:
        raise InputError(f"an ELM text with its prefix is {longest} tokens long; the model's context is "
                         f"{model.n_ctx}")
    fingerprint = model.fingerprint()
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0

    with torch.random.fork_rng(devices=[] if model.device.type == "cpu" else [model.device]):
        torch.manual_seed(hparams.seed)
        gen = torch.Generator().manual_seed(hparams.seed)
        hf = unbridged_copy(model)
        hf.requires_grad_(False)

        # The frozen model's distributions, computed once: P' on the domain, P on the retain text.
        erase = _soft(erase_ids, head, contrast_targets(hf, erase_ids, head, novice, expert, hparams.eta, pad),
                      pad, model.device)
        retain = None
        if retain_ids and hparams.retain_weight > 0:
            rows, pos = zip(*(_contexts(t, head, []) for t in retain_ids))
            base = _logprobs_at(hf, rows, pos, pad)
            retain = _soft(retain_ids, head, base, pad, model.device)
        fluency = None
        if hparams.fluency_weight > 0 and hparams.fluency_tokens > 0:
            cont = guided_continuations(hf, fluency_prompts, head, novice, expert, hparams.fluency_guidance,
                                        hparams.fluency_tokens, pad, gen)
            fluency = _hard(fluency_prompts, cont, head, pad, model.device)
            if progress is not None:
                progress("fluency samples", len(cont), len(cont))

        config = LoraConfig(r=hparams.rank, lora_alpha=hparams.alpha, target_modules=names, lora_dropout=0.0,
                            bias="none", task_type="CAUSAL_LM", fan_in_fan_out=model.conv1d)
        peft_model = get_peft_model(hf, config)
        peft_model.eval()
        parts = {"erase": [], "retain": [], "fluency": []}

        def batch(pool: _Texts) -> torch.Tensor:
            return torch.randperm(len(pool), generator=gen)[:hparams.batch_size]

        def loss_fn(step: int) -> torch.Tensor:
            total = 0.0
            for key, pool, w in (("erase", erase, hparams.erase_weight), ("retain", retain, hparams.retain_weight),
                                 ("fluency", fluency, hparams.fluency_weight)):
                if pool is None or w == 0:
                    continue
                part = pool.loss(peft_model, batch(pool))
                parts[key].append(float(part.detach()))
                total = total + w * part
            return total

        losses = adam_loop([p for p in peft_model.parameters() if p.requires_grad], loss_fn, hparams.steps,
                           hparams.lr, stage="train", progress=progress)
        adapter_weights = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
        adapter_config = json.loads(json.dumps(peft_model.peft_config["default"].to_dict(),
                                               default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
        merged = peft_model.merge_and_unload()

    weights = [n + ".weight" for n in names]
    deltas = {n: d for n, d in weight_deltas(model, merged, weights).items() if torch.any(d != 0)}
    evidence = {
        "concept": concept, "modules": names, "layers": list(hparams.layers),
        "expert_prompt": hparams.expert_prompt.replace("{concept}", concept),
        "novice_prompt": hparams.novice_prompt.replace("{concept}", concept),
        "n_erase_texts": len(erase), "n_retain_texts": len(retain) if retain is not None else 0,
        "n_fluency_texts": len(fluency) if fluency is not None else 0,
        "loss": losses, "loss_parts": parts,
    }
    handle = EditHandle(method="elm", deltas=deltas, hparams=hparams.to_dict(),
                        requests=[r.to_dict() for r in requests], model_name=model.name,
                        model_fingerprint=fingerprint, evidence=evidence,
                        adapter={"config": adapter_config, "weights": adapter_weights})
    handle._apply_checked(model)
    return handle


def _soft(texts: list[list[int]], head: list[int], targets: list[torch.Tensor], pad: int, device) -> _Texts:
    rows, positions = zip(*(_contexts(t, head, []) for t in texts))
    ids, mask = _pad(rows, pad, device)
    predict = torch.zeros_like(ids, dtype=torch.bool)
    for i, pos in enumerate(positions):
        predict[i, pos] = True
    return _Texts(ids, mask, predict, [t.to(device) for t in targets])


def _hard(prompts: list[list[int]], continuations: list[list[int]], head: list[int], pad: int, device) -> _Texts:
    rows = [head + p + c for p, c in zip(prompts, continuations)]
    ids, mask = _pad(rows, pad, device)
    predict = torch.zeros_like(ids, dtype=torch.bool)
    targets = []
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        start = len(head) + len(p)
        predict[i, start - 1:start - 1 + len(c)] = True
        targets.append(torch.tensor(c, dtype=torch.long, device=device))
    return _Texts(ids, mask, predict, targets)
