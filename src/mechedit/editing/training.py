"""What the gradient-trained editors share (fine-tuning, LoRA, (IA)³, ELM): a trainable copy of the model,
batches of (prompt, answer) pairs with the loss on the answer tokens only, an Adam loop with progress, and the
exact weight change as edit-handle deltas.

Training runs on an *un-bridged* copy of the HF model (RESOURCES.md: peft on a model that TransformerBridge has
wrapped in place only half works), built from the config and the loaded model's own weights, so the user's model
is never touched until the finished change is applied through an :class:`~mechedit.editing.EditHandle`.

>>> import mechedit
>>> m = mechedit.load()                                                              # doctest: +SKIP
>>> hf = unbridged_copy(m)                                                           # doctest: +SKIP
>>> batch = answer_batch(m, ["2+2="], ["5"])                                         # doctest: +SKIP
>>> float(answer_loss(hf, batch))                                                    # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from mechedit.data import EditRecord
from mechedit.errors import InputError, MecheditError
from mechedit.model import LoadedModel, canonical_param_name
from mechedit.tracing.common import encode_target

Progress = Callable[[str, int, int], None]


def unbridged_copy(model: LoadedModel) -> torch.nn.Module:
    """A fresh HF model (same class and config) holding an exact copy of ``model``'s current weights, with no
    bridge wrappers: safe to train, wrap with peft and merge."""
    from transformers import AutoModelForCausalLM

    src = model.hf_model
    copy = AutoModelForCausalLM.from_config(src.config, torch_dtype=next(src.parameters()).dtype)
    # The bridge adds aliases of the same tensors (``ln1``, ``attn`` ...): keep the names the HF class has.
    wanted = set(copy.state_dict())
    state = {n: v for k, v in src.state_dict().items() if (n := canonical_param_name(k)) in wanted}
    missing, _ = copy.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _is_tied(copy, k)]
    if missing:
        raise MecheditError(f"could not copy {model.name!r} for training: no weights for {missing[:3]}")
    if getattr(src.config, "tie_word_embeddings", False):
        copy.tie_weights()
    copy.to(model.device)
    copy.eval()  # no dropout: training is deterministic given the seed
    return copy


def _is_tied(hf: torch.nn.Module, name: str) -> bool:
    return name.endswith("lm_head.weight") and getattr(hf.config, "tie_word_embeddings", False)


@dataclass(frozen=True)
class AnswerBatch:
    """Right-padded (prompt + answer) token ids; ``labels`` is -100 everywhere except the answer tokens."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), shifted inside answer_loss as HF does
    prompts: tuple[str, ...]
    answers: tuple[str, ...]


def answer_batch(model: LoadedModel, prompts: Sequence[str], answers: Sequence[str | None]) -> AnswerBatch:
    """Encode each prompt (BOS as the model's tokenizer adds it) followed by its answer (leading space by the
    same rule as the tracers: ``"Paris"`` after ``"born in"`` is ``" Paris"``, ``"5"`` after ``"2+2="`` is
    ``"5"``). An answer of None leaves the row as the prompt alone, with no answer tokens to score."""
    if len(prompts) != len(answers) or not prompts:
        raise InputError(f"need one answer per prompt and at least one pair (got {len(prompts)} prompts, "
                         f"{len(answers)} answers)")
    rows, label_rows = [], []
    for prompt, answer in zip(prompts, answers):
        ids = model.encode(prompt)
        target = encode_target(model, prompt, answer) if answer is not None else []
        if len(ids) + len(target) > model.n_ctx:
            raise InputError(f"prompt and answer exceed the model's context: {prompt!r}")
        rows.append(ids + target)
        label_rows.append([-100] * len(ids) + target)
    width = max(len(r) for r in rows)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, label_rows)):
        input_ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        labels[i, :len(r)] = torch.tensor(lab)
    dev = model.device
    return AnswerBatch(input_ids.to(dev), mask.to(dev), labels.to(dev), tuple(prompts), tuple(answers))


def answer_logprobs(hf: torch.nn.Module, batch: AnswerBatch) -> torch.Tensor:
    """(B,) summed log-probability of each row's answer tokens."""
    logits = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    labels = batch.labels[:, 1:]
    mask = labels != -100
    lp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(dim=1)


def answer_loss(hf: torch.nn.Module, batch: AnswerBatch) -> torch.Tensor:
    """Mean over rows of the answer's negative log-likelihood per answer token."""
    n_tokens = (batch.labels[:, 1:] != -100).sum(dim=1).clamp_min(1)
    return (-answer_logprobs(hf, batch) / n_tokens).mean()


def adam_loop(params: Iterable[torch.nn.Parameter], loss_fn: Callable[[int], torch.Tensor], steps: int, lr: float,
              *, stage: str = "train", progress: Progress | None = None, weight_decay: float = 0.0,
              after_step: Callable[[], None] | None = None, stop_below: float | None = None) -> list[float]:
    """Minimise ``loss_fn(step)`` with Adam for ``steps`` steps (stopping early once the loss is below
    ``stop_below``); ``after_step`` runs after each update under ``no_grad`` (e.g. a norm projection).
    Returns the loss per step. A non-finite loss stops training with a clear error."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise InputError("nothing to train: no parameter requires a gradient")
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    losses = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(step)
        if not torch.isfinite(loss):
            raise MecheditError(f"training diverged at step {step} (loss {float(loss)}); lower the learning rate")
        loss.backward()
        opt.step()
        if after_step is not None:
            with torch.no_grad():
                after_step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(stage, step + 1, steps)
        if stop_below is not None and losses[-1] < stop_below:
            break
    return losses


def weight_deltas(model: LoadedModel, trained: torch.nn.Module, names: Iterable[str] | None = None) -> dict:
    """``{canonical name: trained - current}`` for the parameters that changed (or exactly ``names``), from a
    trained un-bridged copy (peft already merged and unloaded). Refuses non-finite changes."""
    new = {canonical_param_name(k): v for k, v in trained.state_dict().items()}
    current = {n: v for k, v in model.hf_model.state_dict().items() if (n := canonical_param_name(k)) in new}
    wanted = list(names) if names is not None else list(current)
    deltas = {}
    for name in wanted:
        if name not in new or name not in current:
            raise MecheditError(f"parameter {name} is missing from the trained copy or the model")
        a, b = current[name], new[name].to(current[name].device)
        if a.shape != b.shape:
            raise MecheditError(f"parameter {name} changed shape in training ({tuple(a.shape)} -> {tuple(b.shape)})")
        if names is None and torch.equal(a, b):
            continue
        d = (b.to(a.dtype) - a).detach().clone()
        if not torch.isfinite(d).all():
            raise MecheditError(f"training produced non-finite weights in {name}; nothing was changed")
        deltas[name] = d
    if _tied(model):  # a tied lm_head is the embedding: one delta, not two
        deltas.pop("lm_head.weight", None)
    return deltas


def _tied(model: LoadedModel) -> bool:
    return bool(getattr(model.hf_model.config, "tie_word_embeddings", False))


def select_modules(model: LoadedModel, modules, requests=(), *, seed: int = 0,
                   adapter_size: int | None = None) -> tuple[list[str], dict]:
    """The HF module names (as in the un-bridged model's ``named_modules``) a restricted method trains, and the
    evidence for them. ``modules`` is one of

    * ``"auto"``: :func:`mechedit.locate`'s adapter module set for the first request (causal trace, patching and
      gradient norms; ``adapter_size`` modules, default locate's 10);
    * ``"all"``: every module kind of the architecture table in every layer;
    * ``"random"``: as many modules as ``"auto"`` would choose (``adapter_size`` or 10), drawn at random with
      ``seed`` from all of them: the control for "does locating matter";
    * ``"mlp"`` / ``"attn"``: every MLP / attention module;
    * a list of names: HF module names (``model.layers.3.mlp.down_proj``) or ``"L.kind"`` shorthands
      (``"3.mlp_out"``, kinds as in ``ArchSpec.modules()``).

    Unknown names, an empty set or a name that is not a linear layer fail with an :class:`InputError`.
    """
    kinds = {k: p for k, p in model.arch.modules().items() if p}
    everything = [model.module_name(layer, k) for layer in range(model.n_layers) for k in kinds]
    if isinstance(modules, str):
        key = modules.strip()
        if key == "auto":
            from mechedit.locating import LocateConfig, locate

            if not requests:
                raise InputError("modules='auto' locates the fact of the first request; pass a request")
            r = requests[0]
            cfg = LocateConfig() if adapter_size is None else LocateConfig(adapter_size=adapter_size)
            found = locate(model, r.prompt, r.subject, r.target_true, config=cfg)
            return list(found.adapter_modules), {"modules": "auto", "locate": found.adapter_decision.to_dict()}
        if key == "all":
            return everything, {"modules": "all"}
        if key in ("mlp", "attn"):
            chosen = [model.module_name(layer, k) for layer in range(model.n_layers) for k in kinds
                      if k.startswith(key)]
            return chosen, {"modules": key}
        if key == "random":
            n = adapter_size or 10
            gen = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(everything), generator=gen).tolist()
            chosen = sorted((everything[i] for i in order[:min(n, len(everything))]), key=everything.index)
            return chosen, {"modules": "random", "seed": seed, "size": len(chosen)}
        raise InputError(f"modules must be 'auto', 'all', 'random', 'mlp', 'attn' or a list of module names, "
                         f"got {modules!r}")
    names = list(modules) if isinstance(modules, (list, tuple)) else None
    if not names:
        raise InputError("the module set is empty; name at least one module (or use 'auto')")
    chosen = []
    for name in names:
        if not isinstance(name, str):
            raise InputError(f"module names must be strings, got {name!r}")
        layer, _, kind = name.partition(".")
        if layer.isdigit() and kind in kinds:
            name = model.module_name(int(layer), kind)
        if name not in everything:
            raise InputError(f"{name!r} is not a trainable module of {model.name!r}; use HF names such as "
                             f"{everything[0]!r} or shorthands like '0.mlp_out' (kinds: {', '.join(kinds)})")
        if name not in chosen:
            chosen.append(name)
    return chosen, {"modules": "given"}


def check_requests(model: LoadedModel, requests) -> list[EditRecord]:
    """The requests as a list, each checked to be an EditRecord whose prompt and target encode (so that bad
    input fails before anything trains)."""
    reqs = [requests] if isinstance(requests, EditRecord) else list(requests) if requests is not None else []
    if not reqs or not all(isinstance(r, EditRecord) for r in reqs):
        raise InputError("requests must be one EditRecord or a non-empty list of them")
    return reqs


def check_layers(model: LoadedModel, layers) -> None:
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < model.n_layers]
        if bad:
            raise InputError(f"layer(s) {bad} are not in {model.name!r}, which has layers 0-{model.n_layers - 1}")


def modules_in_layers(model: LoadedModel, names: Sequence[str], layers) -> list[str]:
    """``names`` restricted to modules inside ``layers`` (all of them when ``layers`` is None)."""
    if layers is None:
        return list(names)
    prefixes = tuple(f"{model.arch.layers}.{i}." for i in layers)
    return [n for n in names if n.startswith(prefixes)]


def edit_pairs(requests: Sequence[EditRecord], paraphrases: bool) -> tuple[list[str], list[str]]:
    """(prompts, answers) to train on: each request's prompt (and its paraphrases if asked) -> target_new."""
    prompts, answers = [], []
    for r in requests:
        for p in (r.prompt, *(r.paraphrases if paraphrases else ())):
            prompts.append(p)
            answers.append(r.target_new)
    return prompts, answers


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with torch's and Python's generators seeded, leaving the caller's generators as they were."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)
