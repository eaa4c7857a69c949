"""Gradient norms: how sensitive is the answer's log-probability to each module's weights and to each hidden
state?

The idea. One forward and one backward pass give ``∂ log p(answer | prompt) / ∂x`` for every weight and every
activation ``x``. Its L2 norm says how far a *small* change at that place would move the answer: the places a
fine-tuning step on this fact would change first. It is cheap (one backward) and first-order: a large gradient
is not evidence that the fact is *stored* there - causal tracing (:mod:`mechedit.tracing.causal`) asks that
question by intervention, and the two often disagree (a wide, nearly saturated MLP can carry a fact with a
small gradient). Read the two side by side.

Two families are measured:

- **modules**: for every layer and every module kind of the architecture table (``attn_q``/``attn_k``/
  ``attn_v`` or the fused ``attn_qkv``, ``attn_out``, ``mlp_in0``/``mlp_in1``, ``mlp_out``; see
  :meth:`mechedit.arch.ArchSpec.modules`), the L2 norm of the gradient with respect to all of that module's
  own parameters together (weight and, where it has one, bias). The module is the one
  :meth:`LoadedModel.module` returns, so the numbers line up with what an editor would touch.
- **sites**: for every residual-stream component (``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``,
  ``mlp_out``), layer and prompt position, the L2 norm over ``d_model`` of the gradient with respect to that
  activation. The activation is captured, unmodified, at its TransformerLens hook and differentiated as the
  tensor the model goes on to use, so ``resid_mid`` gets the gradient of both its uses (the skip connection
  and the MLP's input).

Objective: ``log p(answer | prompt) = Σ_i log p(answer_i | prompt, answer_<i)`` under teacher forcing (one
term for a single-token answer). Positions are the prompt's tokens; for a multi-token answer the
teacher-forced answer positions take part in the forward but are not reported.

**Fused q/k/v (GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``).** TransformerBridge splits the fused projection
into separate q, k and v linear maps at boot and runs those copies, so in the bridge's forward the fused
weight itself receives no gradient. The gradient with respect to the fused weight is the gradient with
respect to its three slices, and its norm is the norm of the three copies' gradients taken together
(``sqrt(‖g_q‖² + ‖g_k‖² + ‖g_v‖²)``); that is what is reported under ``attn_qkv``, and ``notes`` says so.
(This equals a direct autograd computation on the un-bridged HF model: the tests check it.)

GPT-NeoX runs attention and MLP in parallel: there is no ``resid_mid`` site, and it is left out.

The model's weights are not changed, no ``.grad`` is left on any parameter (``torch.autograd.grad`` is used,
never ``.backward()``), ``requires_grad`` flags are restored as they were, and no hook remains, also when the
call raises.

>>> import mechedit                                                   # doctest: +SKIP
>>> from mechedit.tracing import gradient_norms                       # doctest: +SKIP
>>> m = mechedit.load()                                               # the embedded world model
>>> r = gradient_norms(m, "Dalo Frenwick was born in", subject="Dalo Frenwick")
>>> r.modules["mlp_out"]                                              # (n_layers,) gradient norms
>>> r.sites["resid_post"].shape                                       # (n_layers, n_tokens)
>>> df, fig = r.to_frame(), r.plot()
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

import torch

from mechedit.errors import DataFormatError, InputError
from mechedit.model import LoadedModel
from mechedit.results import JsonResult, tensor_from
from mechedit.sites import RESIDUAL_COMPONENTS, Site
from mechedit.tracing.common import HookFn, Prompt, embedding_module, hooks, prepare_prompt

FORMAT = "mechedit.gradient_norms/1"
_FUSED_PARTS = ("q", "k", "v")  # the bridge's names for the split copies of a fused q/k/v projection


@dataclass(frozen=True)
class GradientNormConfig:
    """What to measure. The defaults measure everything the model has."""

    # residual-stream components whose activation gradients are measured (per layer and position); None =
    # every one of RESIDUAL_COMPONENTS the model has (GPT-NeoX has no resid_mid)
    components: tuple[str, ...] | None = None
    # module kinds of the architecture table (ArchSpec.modules()) whose parameter gradients are measured;
    # None = every kind the architecture has
    kinds: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("components", RESIDUAL_COMPONENTS), ("kinds", None)):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                raise InputError(f"{name} must be a list of names, not the string {value!r}")
            value = tuple(value)
            object.__setattr__(self, name, value)
            if not value or len(set(value)) != len(value):
                raise InputError(f"{name} must be distinct names (or None for all), got {list(value)}")
            if allowed is not None and any(v not in allowed for v in value):
                raise InputError(f"{name} must be among {list(allowed)}, got {list(value)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if v is not None else None for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "GradientNormConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise DataFormatError(f"gradient norm config: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if v is not None else None for k, v in d.items()})


# -- the result -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GradientNormResult(JsonResult):
    """What :func:`gradient_norms` measured for one prompt. ``save``/``load`` come from :class:`JsonResult`."""

    FORMAT: ClassVar[str] = FORMAT

    prompt: str
    subject: str | None
    tokens: list[str]  # prompt tokens, each decoded on its own (BOS included when the model reads one)
    subject_range: tuple[int, int] | None  # [start, end) positions of the subject's tokens; None without one
    answer: str
    answer_ids: list[int]
    log_prob: float  # the objective: log p(answer | prompt), teacher-forced over the answer's tokens
    modules: dict[str, torch.Tensor]  # module kind -> (n_layers,) ‖∂ log p / ∂ parameters‖₂
    module_names: dict[str, list[str]]  # module kind -> the HF module name in each layer
    sites: dict[str, torch.Tensor]  # component -> (n_layers, n_tokens) ‖∂ log p / ∂ activation‖₂ over d_model
    config: GradientNormConfig
    model_name: str
    model_fingerprint: str
    notes: dict[str, str] = field(default_factory=dict)  # kind/component -> how it was measured, where special
    extra: dict = field(default_factory=dict)  # free-form notes carried through save/load

    @property
    def n_layers(self) -> int:
        return next(iter(self.modules.values())).shape[0]

    def top_modules(self, n: int = 5) -> list[tuple[int, str, float]]:
        """The ``n`` (layer, kind, norm) with the largest parameter-gradient norms, largest first."""
        flat = [(layer, kind, float(g[layer])) for kind, g in self.modules.items() for layer in range(g.shape[0])]
        return sorted(flat, key=lambda t: -t[2])[:n]

    def to_frame(self):
        """Tidy pandas frame, one row per measured gradient, with columns:

        group (``"module"`` or ``"site"``), name (module kind or site component), layer, position (the prompt
        position; <NA> for modules), token (None for modules), is_subject (<NA> for modules), target (the HF
        module name, or the site's hook name), grad_norm.
        """
        import pandas as pd

        start, end = self.subject_range if self.subject_range is not None else (0, 0)
        rows = []
        for kind, g in self.modules.items():
            for layer in range(g.shape[0]):
                rows.append(("module", kind, layer, pd.NA, None, pd.NA, self.module_names[kind][layer],
                             float(g[layer])))
        for comp, g in self.sites.items():
            for layer in range(g.shape[0]):
                hook = Site(layer, comp).hook_name
                for pos in range(g.shape[1]):
                    rows.append(("site", comp, layer, pos, self.tokens[pos], start <= pos < end, hook,
                                 float(g[layer, pos])))
        df = pd.DataFrame(rows, columns=["group", "name", "layer", "position", "token", "is_subject", "target",
                                         "grad_norm"])
        df["position"] = df["position"].astype("Int64")
        df["is_subject"] = df["is_subject"].astype("boolean")
        return df

    def plot(self):
        """Gradient-norm bars per module (layer × module kind) over heatmaps of the site gradients."""
        from mechedit.viz.gradients import plot_gradient_norms

        return plot_gradient_norms(self)

    # -- persistence ------------------------------------------------------------------------------------------
    def to_json_dict(self) -> dict:
        return {
            "prompt": self.prompt, "subject": self.subject, "tokens": list(self.tokens),
            "subject_range": list(self.subject_range) if self.subject_range is not None else None,
            "answer": self.answer, "answer_ids": list(self.answer_ids), "log_prob": self.log_prob,
            "modules": {k: g.tolist() for k, g in self.modules.items()},  # [layer]
            "module_names": {k: list(v) for k, v in self.module_names.items()},
            "sites": {k: g.tolist() for k, g in self.sites.items()},  # [layer][position]
            "config": self.config.to_dict(), "model_name": self.model_name,
            "model_fingerprint": self.model_fingerprint, "notes": dict(self.notes), "extra": self.extra,
        }

    @classmethod
    def from_json_dict(cls, d: dict) -> "GradientNormResult":
        return cls(
            prompt=d["prompt"], subject=d["subject"], tokens=list(d["tokens"]),
            subject_range=tuple(d["subject_range"]) if d["subject_range"] is not None else None,
            answer=d["answer"], answer_ids=list(d["answer_ids"]), log_prob=float(d["log_prob"]),
            modules={k: tensor_from(v) for k, v in d["modules"].items()},
            module_names={k: list(v) for k, v in d["module_names"].items()},
            sites={k: tensor_from(v) for k, v in d["sites"].items()},
            config=GradientNormConfig.from_dict(d["config"]), model_name=d["model_name"],
            model_fingerprint=d["model_fingerprint"], notes=dict(d.get("notes", {})), extra=d.get("extra", {}),
        )


# -- the tracer -------------------------------------------------------------------------------------------------


def gradient_norms(model: LoadedModel, prompt: str, subject: str | None = None, target: str | None = None, *,
                   components: tuple[str, ...] | None = None, kinds: tuple[str, ...] | None = None,
                   ) -> GradientNormResult:
    """L2 norms of ``∂ log p(answer | prompt)`` with respect to each module's parameters and each residual
    activation.

    Args:
        prompt: the prompt (not empty; at most the model's context).
        subject: optional; when given it must occur in ``prompt`` and its tokens are marked in the result.
        target: the answer; None = the model's own greedy next token (see ``prepare_prompt``).
        components: residual components to measure (see :class:`GradientNormConfig`); None = all the model has.
        kinds: module kinds to measure; None = every kind of the architecture table.
    Returns:
        A :class:`GradientNormResult`: ``modules[kind]`` is (n_layers,), ``sites[component]`` is
        (n_layers, n_prompt_tokens).
    """
    config = GradientNormConfig(components=components, kinds=kinds)
    p = prepare_prompt(model, prompt, subject, target)
    comps, absent = _components(model, config)
    kinds_ = _kinds(model, config)
    notes: dict[str, str] = {c: f"{model.architecture} has no {c} site (attention and MLP run in parallel)"
                             if c == "resid_mid" else f"{model.architecture} has no {c} site" for c in absent}

    # parameters per (kind, layer); a fused q/k/v projection also lists the bridge's split copies
    own: dict[tuple[str, int], list[torch.nn.Parameter]] = {}
    split: dict[tuple[str, int], list[torch.nn.Parameter]] = {}
    for kind in kinds_:
        for layer in range(model.n_layers):
            own[kind, layer] = list(model.module(layer, kind).parameters())
            if kind == "attn_qkv":
                split[kind, layer] = _split_copies(model, layer, own[kind, layer])
    params = list({id(q): q for ps in (*own.values(), *split.values()) for q in ps}.values())

    # the embedding weight requires grad too (not measured): then every activation is in the graph, even on a
    # model whose parameters were all frozen
    switched = list({id(q): q for q in [*params, *embedding_module(model).parameters()]}.values())
    hook_names = [Site(layer, c).hook_name for c in comps for layer in range(model.n_layers)]
    acts: dict[str, torch.Tensor] = {}
    flags = [q.requires_grad for q in switched]
    try:
        for q in switched:
            q.requires_grad_(True)
        x = torch.tensor([p.input_ids], device=model.device)  # (1, T_in)
        with torch.enable_grad():
            with hooks(model, [(n, _capture(acts, n)) for n in hook_names]):
                logits = model.bridge(x)  # (1, T_in, V)
            log_prob = answer_log_prob(logits, p)  # ()
            grads = torch.autograd.grad(log_prob, [*params, *(acts[n] for n in hook_names)], allow_unused=True)
    finally:
        for q, flag in zip(switched, flags):
            q.requires_grad_(flag)
    by_param = {id(q): g for q, g in zip(params, grads[:len(params)])}
    by_hook = dict(zip(hook_names, grads[len(params):]))

    modules: dict[str, torch.Tensor] = {}
    for kind in kinds_:
        norms = torch.zeros(model.n_layers)
        for layer in range(model.n_layers):
            gs = [by_param[id(q)] for q in own[kind, layer]]
            if all(g is None for g in gs) and split.get((kind, layer)):
                gs = [by_param[id(q)] for q in split[kind, layer]]
                notes[kind] = ("the bridge runs its own split q/k/v copies of this fused projection; the norm is "
                               "that of the three copies' gradients together, which is the fused weight's")
            norms[layer] = _norm(gs)
        modules[kind] = norms

    n_tokens = len(p.ids)
    sites: dict[str, torch.Tensor] = {}
    for c in comps:
        rows = []
        for layer in range(model.n_layers):
            g = by_hook[Site(layer, c).hook_name]
            if g is None:  # the hooked tensor does not reach the answer: nothing to measure
                notes[c] = "the hooked activation is not on the path to the answer; reported as NaN"
                rows.append(torch.full((n_tokens,), float("nan")))
            else:
                rows.append(g[0, :n_tokens].float().norm(dim=-1).cpu())  # (T,)
        sites[c] = torch.stack(rows)  # (L, T)

    return GradientNormResult(
        prompt=p.text, subject=p.subject, tokens=list(p.tokens), subject_range=p.subject_range, answer=p.answer,
        answer_ids=list(p.answer_ids), log_prob=float(log_prob.detach()), modules=modules,
        module_names={k: [model.module_name(layer, k) for layer in range(model.n_layers)] for k in kinds_},
        sites=sites, config=config, model_name=model.name, model_fingerprint=model.fingerprint(), notes=notes,
    )


def answer_log_prob(logits: torch.Tensor, prompt: Prompt) -> torch.Tensor:
    """``log p(answer | prompt)`` of the first row: the sum over answer tokens of their teacher-forced
    log-probabilities (computed with ``log_softmax``, so a long answer does not underflow as a product would).

    Args:
        logits: (B, T_in, V) logits of a run on ``prompt.input_ids``.
    Returns:
        A scalar tensor (float32), differentiable.
    """
    pos = torch.tensor(prompt.answer_positions, device=logits.device)  # (A,)
    ans = torch.tensor(prompt.answer_ids, device=logits.device)  # (A,)
    logp = logits[0, pos].float().log_softmax(dim=-1)  # (A, V)
    return logp[torch.arange(len(ans), device=logits.device), ans].sum()


def _capture(store: dict[str, torch.Tensor], name: str) -> HookFn:
    """Hook keeping the activation itself (in the graph, unmodified) under ``name``."""

    def fn(act: torch.Tensor, hook) -> None:  # act (1, T_in, d_model)
        store[name] = act

    return fn


def _norm(grads: list[torch.Tensor | None]) -> float:
    """L2 norm of several gradients taken together (a parameter with no gradient contributes 0)."""
    total = sum((float(g.float().pow(2).sum()) for g in grads if g is not None), 0.0)
    return total ** 0.5


def _split_copies(model: LoadedModel, layer: int, fused: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """The bridge's split q/k/v copies of layer ``layer``'s fused projection (TransformerBridge's joint-QKV
    attention keeps them as ``blocks.L.attn.q/k/v``); [] when the bridge keeps none. They must hold exactly as
    many numbers as the fused parameters, or the norm would not be the fused weight's."""
    attn = getattr(model.bridge.blocks[layer], "attn", None)
    parts = [getattr(attn, name, None) for name in _FUSED_PARTS]
    if any(part is None for part in parts):
        return []
    copies = [q for part in parts for q in part.parameters()]
    if sum(q.numel() for q in copies) != sum(q.numel() for q in fused):
        return []
    return copies


def _components(model: LoadedModel, config: GradientNormConfig) -> tuple[list[str], list[str]]:
    """(components to measure, residual components the model lacks that the default left out)."""
    hook_dict = model.bridge.hook_dict
    if config.components is None:
        have = [c for c in RESIDUAL_COMPONENTS if Site(0, c).hook_name in hook_dict]
        return have, [c for c in RESIDUAL_COMPONENTS if c not in have]
    for c in config.components:
        if Site(0, c).hook_name not in hook_dict:
            raise InputError(f"{model.architecture} has no {c!r} site (no hook {Site(0, c).hook_name!r})"
                             + ("; its attention and MLP run in parallel" if c == "resid_mid" else ""))
    return list(config.components), []


def _kinds(model: LoadedModel, config: GradientNormConfig) -> list[str]:
    have = [k for k, path in model.arch.modules().items() if path]
    if config.kinds is None:
        return have
    missing = [k for k in config.kinds if k not in have]
    if missing:
        raise InputError(f"{model.architecture} has no module kind(s) {missing}; it has {', '.join(have)}")
    return list(config.kinds)
