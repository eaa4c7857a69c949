"""Activation patching: which activations carry the difference between a clean and a corrupted run?

Heimersheim and Nanda, "How to use and interpret activation patching" (2024); Zhang and Nanda, "Towards Best
Practices of Activation Patching in Language Models: Metrics and Methods" (ICLR 2024).

The idea. Run the model on two prompts that differ in one detail and answer differently:

    clean       "Voupeis Draexmir was born in the city of"   → " Paris"
    corrupted   "Lodum Fideth was born in the city of"       → something else

then run one of them again with a single activation (one layer's residual stream at one token, one attention
head, one MLP neuron, ...) overwritten by its value from the other run, and see how far the output moves.

- **Denoising** (``direction="denoise"``, clean → corrupted): run the corrupted prompt and patch in one clean
  activation. A score near 1 says that activation is *sufficient*, together with the rest of the corrupted
  run, to bring the clean answer back.
- **Noising** (``direction="noise"``, corrupted → clean): run the clean prompt and patch in one corrupted
  activation. A score falling towards 0 says that activation is *necessary* for the clean answer.

The two are not mirror images (Heimersheim and Nanda §3): if the answer needs heads A *and* B, denoising
either alone restores nothing while noising either alone breaks everything; if A *or* B suffices, the reverse.
Read a denoising map as "what is enough", a noising map as "what is needed".

Metrics, each normalised so that the clean run scores 1 and the corrupted run 0, in both directions::

    score = (metric(patched) - metric(corrupted)) / (metric(clean) - metric(corrupted))

- ``logit_diff`` (default; both papers recommend it): logit of the answer minus logit of a *foil* at the
  answer position. Linear in the final residual stream, so small effects add up and are not squashed the way
  probabilities saturate. The foil is the corrupted run's most likely token other than the answer unless one
  is given. Needs a one-token answer and a one-token foil.
- ``prob``: the answer's probability (multi-token answers: the product of teacher-forced token probabilities,
  as in causal tracing).
- ``kl``: KL(clean ‖ patched) of the next-token distributions at the answer positions, summed; 0 on the clean
  run, so the score is ``1 - KL(patched) / KL(corrupted)``.

When clean and corrupted score the same (patching a prompt into itself) the normalisation is 0/0: scores are
NaN and the raw metric in ``values`` is what to read.

Components (one patched run per entry of the score tensor; all layers unless ``config.layers`` says fewer):

    resid_pre  resid_mid  resid_post  attn_out  mlp_out   (layer, position)
    z  q  k  v            one head at every position       (layer, head)
    z_by_pos ... v_by_pos one head at one position          (layer, head, position)
    pattern               one head's whole attention pattern (layer, head)
    pattern_by_pos        one head's pattern row for one destination position   (layer, head, position)
    mlp_pre  mlp_post     one MLP neuron at every position  (layer, neuron)

Under grouped-query attention ``k``/``v`` have ``n_kv_heads`` heads (SmolLM2: 9 query heads, 3 key/value
heads): patching key head h changes every query head that reads it. ``mlp_pre`` is the MLP's hidden layer
before the non-linearity (the gate projection in gated MLPs), ``mlp_post`` after it (the input of the output
projection). Parallel-attention models (GPT-NeoX) have no ``resid_mid``.

Corruption. A different prompt with the same number of tokens (Zhang and Nanda's "symmetric token
replacement", which they prefer: it stays on the model's input distribution), or ``corrupted_prompt=None``:
Gaussian noise on the subject's token embeddings (ROME's corruption, the same noise as
:mod:`mechedit.tracing.causal`), every score averaged over ``config.samples`` noise samples drawn from
``config.seed``.

Batching. Every entry of every component is one row of a batch, ``config.batch_size`` rows per forward, and
the clean and corrupted runs are rows of the same forwards (no separate runs, no activation cache): each
forward reads the clean prompt once (batch 1), turns it into the reference rows (clean, corrupted) where the
first layer begins, and appends each patched row where its own layer begins, as a copy of the base reference
row there: a row equals the base run below the layer it patches, so no row computes those layers. A hook per
(hook point, component) copies each row's one patched slice from the source reference row of the same batch.
Only the answer positions are unembedded, and without a target the clean row also gives the greedy answer.
``transformer_lens.patching`` runs one full forward per entry; this gives the same numbers many times faster
(``benchmarks/bench_patching.py``).

>>> import mechedit
>>> from mechedit.tracing import activation_patching, PatchingConfig
>>> m = mechedit.load()                                                   # the embedded world model
>>> r = activation_patching(m, "Voupeis Draexmir was born in the city of",
...                         "Lodum Fideth was born in the city of", components=("resid_pre", "z", "mlp_post"))
>>> r.scores["resid_pre"].shape                                          # (n_layers, n_tokens)
>>> r.top("z", 3)                                                         # [Hit(site=Site(3, 'z', head=2), ...)]
>>> fig = r.plot()
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import ClassVar, NamedTuple

import torch

from mechedit.errors import DataFormatError, InputError
from mechedit.model import LoadedModel
from mechedit.results import JsonResult
from mechedit.sites import HEAD_COMPONENTS, KV_COMPONENTS, RESIDUAL_COMPONENTS, Site
from mechedit.tracing.causal import EMBED_HOOK, CausalTraceConfig, Progress, _add_noise, resolve_noise
from mechedit.tracing.common import HookFn, Prompt, draw_noise, encode_target, hooks, prepare_prompt

FORMAT = "mechedit.patching/1"
DIRECTIONS = ("denoise", "noise")
METRICS = ("logit_diff", "prob", "kl")
SIDES = ("clean", "corrupted")


# -- what can be patched ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """One patchable component as data: the site it lives on, the score axes after ``layer``, and for each
    score axis the activation axis (batch excluded) it indexes. Activations are (T, d) on residual sites,
    (T, H, d_head) on q/k/v/z, (H, T_dest, T_src) on the pattern and (T, d_mlp) on MLP neurons."""

    name: str
    site: str  # a mechedit.sites component
    axes: tuple[str, ...]  # score axes after "layer": "position", "head" or "neuron"
    act_dims: tuple[int, ...]  # activation axis indexed by each score axis; the others are patched whole


COMPONENTS: dict[str, Component] = {c.name: c for c in [
    *(Component(n, n, ("position",), (0,)) for n in RESIDUAL_COMPONENTS),
    *(Component(n, n, ("head",), (1,)) for n in ("z", "q", "k", "v")),
    *(Component(f"{n}_by_pos", n, ("head", "position"), (1, 0)) for n in ("z", "q", "k", "v")),
    Component("pattern", "pattern", ("head",), (0,)),
    Component("pattern_by_pos", "pattern", ("head", "position"), (0, 1)),  # position = destination
    Component("mlp_pre", "mlp_pre", ("neuron",), (1,)),
    Component("mlp_post", "mlp_post", ("neuron",), (1,)),
]}


def axis_sizes(model: LoadedModel, component: Component, n_tokens: int) -> tuple[int, ...]:
    """Sizes of ``component``'s score axes after ``layer`` (key/value heads count ``n_kv_heads``)."""
    sizes = {"position": n_tokens, "neuron": model.d_mlp,
             "head": model.n_kv_heads if component.site in KV_COMPONENTS else model.n_heads}
    return tuple(sizes[a] for a in component.axes)


# -- configuration ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchingConfig:
    """What to patch, which way, and how to score it. Shared by activation and attribution patching."""

    components: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out", "z")  # see COMPONENTS
    direction: str = "denoise"  # "denoise": clean into the corrupted run; "noise": corrupted into the clean run
    metric: str = "logit_diff"  # "logit_diff" | "prob" | "kl"
    batch_size: int = 128  # patched runs per forward; bounds memory
    top_k: int = 10  # entries reported by top(), the neuron bars of plot(), and agreement's overlap
    layers: tuple[int, ...] | None = None  # patch only these layers (None: all); the rest are NaN
    heads: tuple[int, ...] | None = None  # head components: only these heads (None: all); the rest are NaN
    samples: int = 10  # noise samples averaged per entry when there is no corrupted prompt
    noise: float | None = None  # noise std; None = 3 × std of subject token embeddings (as causal tracing)
    seed: int = 0  # seeds the noise: same seed, same result

    def __post_init__(self) -> None:
        for name in ("components", "layers", "heads"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, (value,) if isinstance(value, (str, int)) else tuple(value))
        unknown = [c for c in self.components if c not in COMPONENTS]
        if not self.components or unknown or len(set(self.components)) != len(self.components):
            raise InputError(f"components must be distinct names among {list(COMPONENTS)}, got "
                             f"{list(self.components)}")
        if self.direction not in DIRECTIONS:
            raise InputError(f"direction must be one of {list(DIRECTIONS)}, got {self.direction!r}")
        if self.metric not in METRICS:
            raise InputError(f"metric must be one of {list(METRICS)}, got {self.metric!r}")
        for name in ("batch_size", "top_k", "samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        for name in ("layers", "heads"):
            value = getattr(self, name)
            if value is not None and (not value or not all(isinstance(i, int) for i in value)):
                raise InputError(f"{name} must be None (all) or a non-empty list of integers, got {value!r}")
        if self.noise is not None and not (isinstance(self.noise, (int, float)) and self.noise > 0):
            raise InputError(f"noise must be a positive number (the noise std) or None for 3× the subject "
                             f"embedding std, got {self.noise!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("components", "layers", "heads"):
            d[name] = None if d[name] is None else list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PatchingConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise DataFormatError(f"patching config: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def resolve_config(config: PatchingConfig, components: Sequence[str] | str | None) -> PatchingConfig:
    """``config`` with ``components`` (when given) in place of its own."""
    if not isinstance(config, PatchingConfig):
        raise InputError(f"config must be a PatchingConfig, got {type(config).__name__}")
    return config if components is None else replace(config, components=components)


def check_components(model: LoadedModel, config: PatchingConfig) -> list[Component]:
    """The config's components, each checked against the model: its hook exists in every layer, and the
    requested layers and heads are in range (through :meth:`Site.validate`)."""
    layers = config.layers if config.layers is not None else range(model.n_layers)
    hook_dict = model.bridge.hook_dict  # built anew on each access: read it once
    out = []
    for name in config.components:
        comp = COMPONENTS[name]
        for layer in layers:
            site = model.site(Site(layer, comp.site))  # layer out of range -> SiteError
            if site.hook_name not in hook_dict:
                why = (" (its attention and MLP read the same residual stream in parallel, so there is no "
                       "residual stream between them)" if comp.site == "resid_mid" else "")
                raise InputError(f"component {name!r}: this {model.architecture} model has no hook "
                                 f"{site.hook_name!r}{why}; leave {name!r} out of components")
            if comp.site in HEAD_COMPONENTS:
                for head in config.heads or ():
                    model.site(Site(layer, comp.site, head=head))  # head out of range -> SiteError
        out.append(comp)
    return out


# -- the two runs being contrasted ------------------------------------------------------------------------------

Metric = Callable[[torch.Tensor], torch.Tensor]  # (R, A, V) logits at the answer positions -> (R,), float32


@dataclass(frozen=True, eq=False)
class Contrast:
    """A clean and a corrupted run, ready to patch between. Side ``"corrupted"`` has ``n_samples`` rows (one per
    noise sample; 1 for a corrupted prompt), side ``"clean"`` one row."""

    prompt: Prompt  # the clean prompt, its answer fixed
    inputs: dict[str, torch.Tensor]  # side -> (1, T) model input (the prompt, then the answer but its last token)
    corrupted_tokens: tuple[str, ...]  # the corrupted input, each token decoded on its own
    differing: tuple[int, ...]  # positions where the corrupted input differs (the noised subject tokens)
    noise: torch.Tensor | None  # (S, n_subject_tokens, d_model) noise of the corrupted side, or None
    noise_scale: float | None
    foil_id: int | None  # logit_diff's foil token
    metric: Metric
    logits: dict[str, torch.Tensor]  # side -> (R_side, A, V) logits at the answer positions
    acts: dict[str, dict[str, torch.Tensor]]  # side -> hook name -> (R_side, T, ...) activation
    values: dict[str, torch.Tensor]  # side -> (R_side,) metric of each unpatched row

    @property
    def n_samples(self) -> int:
        return 1 if self.noise is None else self.noise.shape[0]

    def metric_of(self, side: str) -> float:
        return float(self.values[side].detach().mean())


@dataclass(frozen=True, eq=False)
class Corruption:
    """The clean and the corrupted input, before anything has run. Without a target the answer in ``prompt`` is
    a one-token placeholder until the clean run's logits fix it (:func:`finish_contrast`)."""

    prompt: Prompt
    inputs: dict[str, torch.Tensor]  # side -> (1, T) model input (the prompt, then the answer but its last token)
    corrupted_tokens: tuple[str, ...]
    differing: tuple[int, ...]
    noise: torch.Tensor | None  # (S, n_subject_tokens, d_model) or None
    noise_scale: float | None

    @property
    def n_samples(self) -> int:
        return 1 if self.noise is None else self.noise.shape[0]


def corruption(model: LoadedModel, clean_prompt: str, corrupted_prompt: str | None, *, subject: str | None,
               target: str | None, foil: str | None, config: PatchingConfig) -> Corruption:
    """Read both prompts and check them (nothing runs): the clean prompt and its answer, the corrupted input
    (another prompt aligned token for token, or the clean one with noise drawn for the subject's tokens)."""
    if corrupted_prompt is None and subject is None:
        raise InputError("pass either a corrupted prompt (same number of tokens as the clean one) or subject=: "
                         "the words of the clean prompt to corrupt with noise")
    if foil is not None and config.metric != "logit_diff":
        raise InputError(f"foil is only used by metric='logit_diff' (this run uses {config.metric!r}); "
                         "leave it out")
    # without a target the answer is the clean run's greedy next token, read off the clean run (its input, the
    # prompt alone, does not depend on it): a placeholder until then
    p = prepare_prompt(model, clean_prompt, subject, target, answer_ids=None if target is not None else [0])
    if config.metric == "logit_diff" and len(p.answer_ids) != 1:
        raise InputError(f"metric 'logit_diff' compares one answer token with one foil token, but the answer "
                         f"{p.answer!r} is {len(p.answer_ids)} tokens {model.token_strings(list(p.answer_ids))}; "
                         "pass a one-token target, or use metric='prob' or 'kl' (which score multi-token answers "
                         "under teacher forcing)")
    clean_x = torch.tensor([p.input_ids], device=model.device)  # (1, T)
    noise = scale = None
    if corrupted_prompt is None:
        start, end = p.subject_range
        scale = resolve_noise(model, CausalTraceConfig(noise=config.noise), p.subject)
        noise = draw_noise(config.samples, end - start, model.d_model, scale, config.seed)  # (S, n, d)
        corrupted_x, differing = clean_x, tuple(range(start, end))
    else:
        ids = model.encode(corrupted_prompt)
        if len(ids) != len(p.ids):
            raise InputError(
                f"the clean prompt is {len(p.ids)} tokens and the corrupted prompt {len(ids)}: activation patching "
                "copies activations position by position, so the two must align token for token. Choose a "
                "corrupted prompt with the same number of tokens (e.g. a subject that splits into as many tokens: "
                f"clean {list(p.tokens)}, corrupted {model.token_strings(ids)}), or pass corrupted_prompt=None "
                "with subject= to corrupt the subject with noise instead")
        corrupted_x = torch.tensor([[*ids, *p.answer_ids[:-1]]], device=model.device)  # (1, T)
        differing = tuple(int(i) for i in (corrupted_x[0] != clean_x[0]).nonzero()[:, 0])
    return Corruption(prompt=p, inputs={"clean": clean_x, "corrupted": corrupted_x},
                      corrupted_tokens=tuple(model.token_strings(corrupted_x[0].tolist())), differing=differing,
                      noise=noise, noise_scale=scale)


def finish_contrast(model: LoadedModel, cor: Corruption, *, target: str | None, foil: str | None,
                    config: PatchingConfig, logits: dict[str, torch.Tensor],
                    acts: dict[str, dict[str, torch.Tensor]]) -> Contrast:
    """The contrast once both sides have run: the answer (the clean run's greedy token without a target), the
    foil, the metric, and each side's metric.

    Args:
        logits: side -> (R_side, A, V) logits at the answer positions (clean: 1 row; corrupted: one per sample).
        acts: side -> hook name -> activations kept from that side's run (may be empty).
    """
    p = cor.prompt
    if target is None:
        answer = int(logits["clean"][0, -1].detach().argmax())
        p = replace(p, answer_ids=(answer,), answer=model.tokenizer.decode([answer]))
    foil_id = None
    if config.metric == "logit_diff":
        foil_id = _foil(model, p, foil, logits["corrupted"].detach())
    metric = make_metric(config.metric, p, foil_id, logits["clean"].detach()[0])  # the clean run is one row
    values = {side: metric(logits[side]) for side in SIDES}
    return Contrast(prompt=p, inputs=cor.inputs, corrupted_tokens=cor.corrupted_tokens, differing=cor.differing,
                    noise=cor.noise, noise_scale=cor.noise_scale, foil_id=foil_id, metric=metric, logits=logits,
                    acts=acts, values=values)


def prepare_contrast(model: LoadedModel, clean_prompt: str, corrupted_prompt: str | None, *,
                     subject: str | None, target: str | None, foil: str | None, config: PatchingConfig,
                     cache: dict[str, Sequence[str]], grad_side: str | None = None) -> Contrast:
    """Read both prompts, run each side once (keeping the activations ``cache`` names), fix the foil and the
    metric. (Activation patching runs both sides inside its first patched forward instead.)

    Args:
        cache: side -> hook names whose activations to keep from that side's run.
        grad_side: the side whose run keeps its autograd graph (attribution patching), or None.
    """
    cor = corruption(model, clean_prompt, corrupted_prompt, subject=subject, target=target, foil=foil, config=config)
    logits, acts = {}, {}
    for side in SIDES:
        logits[side], acts[side] = run_side(model, cor.inputs[side], len(cor.prompt.answer_ids),
                                            cor.noise if side == "corrupted" else None, cor.prompt.subject_range,
                                            cache.get(side, ()), grad=side == grad_side)
    return finish_contrast(model, cor, target=target, foil=foil, config=config, logits=logits, acts=acts)


def run_side(model: LoadedModel, x: torch.Tensor, n_answer: int, noise: torch.Tensor | None,
             subject_range: tuple[int, int] | None, hook_names: Sequence[str],
             grad: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``x`` (1, T) once per noise sample (once without noise); return the logits at the answer positions
    (R, A, V) and each named activation (R, T, ...). With ``grad`` the activations are the live tensors of the
    graph (the embeddings are made to require grad even if the weights are frozen), else detached copies."""
    acts: dict[str, torch.Tensor] = {}

    def keep(name: str) -> HookFn:
        def fn(act: torch.Tensor, hook) -> torch.Tensor:
            acts[name] = act if grad else act.detach().clone()
            return act  # returned, not None: some hook points pass a reshaped view and use what comes back
        return fn

    n_rows = 1 if noise is None else noise.shape[0]
    fwd: list[tuple[str, HookFn]] = []
    if noise is not None:
        fwd.append((EMBED_HOOK, _add_noise(noise, *subject_range)))
    if grad:
        fwd.append((EMBED_HOOK, lambda emb, hook: emb if emb.requires_grad else emb.detach().requires_grad_()))
    fwd += [(name, keep(name)) for name in dict.fromkeys(hook_names)]
    with torch.set_grad_enabled(grad), hooks(model, fwd):
        logits = answer_logits(model, x.expand(n_rows, -1), n_answer)  # (R, A, V)
    return logits, acts


def answer_logits(model: LoadedModel, x: torch.Tensor, n_answer: int) -> torch.Tensor:
    """The bridge's logits at the last ``n_answer`` positions only, (B, A, V): the positions that predict the
    answer's tokens (``Prompt.answer_positions``). The unembedding runs on those positions alone
    (``logits_to_keep``), which saves a vocabulary-sized matmul per other position."""
    logits = model.bridge(x, logits_to_keep=n_answer)  # (B, A, V)
    return logits[:, -n_answer:]


def _foil(model: LoadedModel, p: Prompt, foil: str | None, corrupted_logits: torch.Tensor) -> int:
    """logit_diff's foil: the given one-token string, else the corrupted run's most likely next token other than
    the answer (probabilities averaged over noise samples)."""
    if foil is not None:
        ids = encode_target(model, p.text, foil)
        if len(ids) != 1:
            raise InputError(f"metric 'logit_diff' needs a one-token foil; {foil!r} is {len(ids)} tokens "
                             f"{model.token_strings(ids)}")
        if ids[0] == p.answer_ids[0]:
            raise InputError(f"the foil {foil!r} is the answer itself; the logit difference would be 0 everywhere")
        return ids[0]
    probs = corrupted_logits[:, 0].float().softmax(-1).mean(0)  # (V,) next-token distribution after the prompt
    probs[p.answer_ids[0]] = -1.0
    return int(probs.argmax())


def make_metric(kind: str, p: Prompt, foil_id: int | None, clean_logits: torch.Tensor) -> Metric:
    """The metric as a function of the logits at the answer positions, (R, A, V) -> (R,) (differentiable;
    float32). Position i of A predicts answer token i (teacher forcing).

    Args:
        clean_logits: (A, V) the clean run's logits there (the reference distribution of ``kl``).
    """
    answer = torch.tensor(p.answer_ids)  # (A,)
    if kind == "logit_diff":
        def logit_diff(logits: torch.Tensor) -> torch.Tensor:
            first = logits[:, 0].float()  # (R, V)
            return first[:, p.answer_ids[0]] - first[:, foil_id]
        return logit_diff
    if kind == "prob":
        def prob(logits: torch.Tensor) -> torch.Tensor:  # what common.answer_prob computes on full logits
            probs = logits.float().softmax(-1)  # (R, A, V)
            return probs[:, torch.arange(len(answer)), answer.to(logits.device)].prod(dim=-1)  # (R,)
        return prob
    clean_logp = clean_logits.float().log_softmax(-1)  # (A, V)

    def kl(logits: torch.Tensor) -> torch.Tensor:
        logp = logits.float().log_softmax(-1)  # (R, A, V)
        ref = clean_logp.to(logp.device)
        return (ref.exp() * (ref - logp)).sum(dim=(-1, -2))  # (R,) KL(clean || run), summed over positions
    return kl


def normalise(values: torch.Tensor, clean: float, corrupted: float) -> torch.Tensor:
    """(values - corrupted) / (clean - corrupted): 1 = clean, 0 = corrupted; NaN when clean == corrupted."""
    span = clean - corrupted
    if span == 0 or not math.isfinite(span):
        return torch.full_like(values, float("nan"))
    return (values - corrupted) / span


def patched_hooks(model: LoadedModel, components: Sequence[Component], config: PatchingConfig) -> list[str]:
    """Every hook the components patch, in the layers the config asks for."""
    layers = config.layers if config.layers is not None else range(model.n_layers)
    return list(dict.fromkeys(Site(layer, comp.site).hook_name for comp in components for layer in layers))


def base_and_source(direction: str) -> tuple[str, str]:
    """(the side that is run, the side whose activations are patched in)."""
    return ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")


# -- the result -------------------------------------------------------------------------------------------------


class Hit(NamedTuple):
    """One entry of a ranking: the site, its normalised score, and its token position (None for components
    patched at every position)."""

    site: Site
    score: float
    position: int | None


@dataclass(frozen=True, eq=False)
class SiteScores(JsonResult):
    """Normalised scores per component, shared by :class:`PatchingResult` and the attribution result.

    ``scores[c]`` and ``values[c]`` have the axes of ``COMPONENTS[c]``: (n_layers, n_tokens) for residual sites,
    (n_layers, n_heads) for head sites at all positions, (n_layers, n_heads, n_tokens) for ``*_by_pos``, and
    (n_layers, d_mlp) for neurons (k/v: n_kv_heads). Entries not patched (``config.layers``/``heads``) are NaN.

    ``low_score`` and ``high_score`` (also written to the JSON, beside the fields) are ``corrupted_metric`` and
    ``clean_metric``: the raw metric at the two ends of the normalised scale (score 0 and score 1), named as
    causal tracing names its corrupted and clean probabilities. Under ``kl`` the corrupted end is the larger
    number (the clean run's KL to itself is 0).
    """

    FORMAT: ClassVar[str] = ""

    clean_prompt: str
    corrupted_prompt: str | None  # None: the subject was corrupted with noise
    subject: str | None
    subject_range: tuple[int, int] | None  # [start, end) positions of the subject's tokens (None without one)
    tokens: list[str]  # the clean input (prompt, then the answer but its last token), each token decoded
    corrupted_tokens: list[str]  # the corrupted input likewise (== tokens under noise)
    differing: list[int]  # positions where the corrupted input differs (the noised subject tokens)
    answer: str
    answer_ids: list[int]
    foil: str | None  # logit_diff's foil (None for other metrics)
    foil_id: int | None
    clean_metric: float  # metric of the clean run
    corrupted_metric: float  # metric of the corrupted run (mean over noise samples)
    scores: dict[str, torch.Tensor]  # component -> normalised score: 1 = clean, 0 = corrupted
    values: dict[str, torch.Tensor]  # component -> the metric itself after the patch
    config: PatchingConfig
    noise_scale: float | None  # the noise std used (None for a corrupted prompt)
    model_name: str
    model_fingerprint: str
    model_shape: dict  # n_layers, n_heads, n_kv_heads, d_mlp of the model (to validate sites against)
    extra: dict = field(default_factory=dict)  # free-form notes carried through save/load

    @property
    def direction(self) -> str:
        return self.config.direction

    @property
    def low_score(self) -> float:
        """The corrupted run's metric (score 0)."""
        return self.corrupted_metric

    @property
    def high_score(self) -> float:
        """The clean run's metric (score 1)."""
        return self.clean_metric

    def effect(self, component: str) -> torch.Tensor:
        """How much each entry matters, higher = more: the score when denoising (recovery), 1 - score when
        noising (damage)."""
        s = self._scores(component)
        return s if self.direction == "denoise" else 1.0 - s

    def top(self, component: str, k: int | None = None) -> list[Hit]:
        """The ``k`` (default ``config.top_k``) entries of ``component`` that matter most: highest score when
        denoising, lowest when noising. NaN entries are skipped."""
        eff = self.effect(component).flatten()
        k = self.config.top_k if k is None else k
        finite = eff.isfinite().nonzero()[:, 0]
        order = finite[eff[finite].argsort(descending=True, stable=True)][:k]
        flat = self.scores[component].flatten()
        return [self._hit(component, int(i), float(flat[i])) for i in order]

    def score(self, site: Site | str, position: int | None = None) -> float:
        """The score of one site (``blocks.1.attn.hook_z[head=2]``), at ``position`` for residual sites and for
        heads patched by position."""
        s = Site.parse(site) if isinstance(site, str) else site
        s.validate(_Shape(**self.model_shape))  # layer / head / neuron out of range -> SiteError
        name = s.component + ("_by_pos" if position is not None and s.component in HEAD_COMPONENTS else "")
        comp = COMPONENTS.get(name)
        if comp is None or name not in self.scores:
            raise InputError(f"this result has no component {name!r} for site {s}; it has {list(self.scores)}")
        index = {"head": s.head, "neuron": s.neuron, "position": position}
        missing = [a for a in comp.axes if index[a] is None]
        if missing:
            raise InputError(f"site {s} in component {name!r} needs a {' and a '.join(missing)}")
        if position is not None and not 0 <= position < len(self.tokens):
            raise InputError(f"position {position} is out of range; the input has {len(self.tokens)} tokens")
        return float(self.scores[name][(s.layer, *(index[a] for a in comp.axes))])

    def to_frame(self):
        """Tidy pandas frame, one row per patched entry: component, site, layer, head, position, neuron, token,
        score, value."""
        import pandas as pd

        rows = []
        for name, s in self.scores.items():
            comp = COMPONENTS[name]
            coords = torch.stack(torch.unravel_index(torch.arange(s.numel()), s.shape), dim=1).tolist()
            for (layer, *rest), score, value in zip(coords, s.flatten().tolist(), self.values[name].flatten().tolist()):
                if not math.isfinite(value):
                    continue  # not patched
                index = dict(zip(comp.axes, rest))
                site = Site(layer, comp.site, head=index.get("head"), neuron=index.get("neuron"))
                pos = index.get("position")
                rows.append((name, str(site), layer, site.head, pos, site.neuron,
                             None if pos is None else self.tokens[pos], score, value))
        df = pd.DataFrame(rows, columns=["component", "site", "layer", "head", "position", "neuron", "token",
                                         "score", "value"])
        return df.astype({"head": "Int64", "position": "Int64", "neuron": "Int64"})

    def plot(self):
        """Heatmaps per component (position × layer, head × layer, position × layer-head) and top-k bars for
        neurons: a plotly Figure."""
        from mechedit.viz.patching import plot_patching

        return plot_patching(self)

    # -- persistence ------------------------------------------------------------------------------------------
    def to_json_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["subject_range"] = None if self.subject_range is None else list(self.subject_range)
        d["scores"] = {k: _nested(v) for k, v in self.scores.items()}
        d["values"] = {k: _nested(v) for k, v in self.values.items()}
        d["config"] = self.config.to_dict()
        d["low_score"], d["high_score"] = self.low_score, self.high_score  # read back from the metrics, not stored
        return d

    @classmethod
    def from_json_dict(cls, d: dict):
        kw = {f.name: d[f.name] for f in fields(cls) if f.name != "extra"}
        kw["subject_range"] = None if d["subject_range"] is None else tuple(d["subject_range"])
        kw["scores"] = {k: _tensor(v) for k, v in d["scores"].items()}
        kw["values"] = {k: _tensor(v) for k, v in d["values"].items()}
        kw["config"] = PatchingConfig.from_dict(d["config"])
        return cls(**kw, extra=d.get("extra", {}))

    # -- helpers ----------------------------------------------------------------------------------------------
    def _scores(self, component: str) -> torch.Tensor:
        if component not in self.scores:
            raise InputError(f"this result has no component {component!r}; it has {list(self.scores)}")
        return self.scores[component]

    def _hit(self, component: str, flat: int, score: float) -> Hit:
        comp = COMPONENTS[component]
        layer, *rest = torch.unravel_index(torch.tensor(flat), self.scores[component].shape)
        index = dict(zip(comp.axes, (int(i) for i in rest)))
        site = Site(int(layer), comp.site, head=index.get("head"), neuron=index.get("neuron"))
        return Hit(site, score, index.get("position"))


@dataclass(frozen=True)
class _Shape:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int


def model_shape(model: LoadedModel) -> dict:
    return {"n_layers": model.n_layers, "n_heads": model.n_heads, "n_kv_heads": model.n_kv_heads,
            "d_mlp": model.d_mlp}


def _nested(t: torch.Tensor) -> list:
    """A tensor as nested lists with NaN written as null (strict JSON)."""
    return [None if not math.isfinite(x) else x for x in t.flatten().tolist()] if t.dim() == 1 else [
        _nested(row) for row in t]


def _tensor(value) -> torch.Tensor:
    """Nested lists (null = NaN) back to a float32 tensor."""
    import numpy as np

    return torch.from_numpy(np.array(value, dtype=np.float64)).float()


@dataclass(frozen=True, eq=False)
class PatchingResult(SiteScores):
    """What :func:`activation_patching` measured. ``save``/``load`` come from :class:`JsonResult`."""

    FORMAT: ClassVar[str] = FORMAT


def site_scores_fields(model: LoadedModel, c: Contrast, config: PatchingConfig, scores: dict, values: dict,
                       clean_prompt: str, corrupted_prompt: str | None) -> dict:
    """The fields every :class:`SiteScores` result fills the same way."""
    p = c.prompt
    return dict(
        clean_prompt=clean_prompt, corrupted_prompt=corrupted_prompt, subject=p.subject, subject_range=p.subject_range,
        tokens=model.token_strings(list(p.input_ids)), corrupted_tokens=list(c.corrupted_tokens),
        differing=list(c.differing), answer=p.answer, answer_ids=list(p.answer_ids),
        foil=None if c.foil_id is None else model.tokenizer.decode([c.foil_id]), foil_id=c.foil_id,
        clean_metric=c.metric_of("clean"), corrupted_metric=c.metric_of("corrupted"),
        scores={k: v.detach().float().cpu() for k, v in scores.items()},
        values={k: v.detach().float().cpu() for k, v in values.items()}, config=config, noise_scale=c.noise_scale,
        model_name=model.name, model_fingerprint=model.fingerprint(), model_shape=model_shape(model),
    )


# -- the batched engine -----------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Block:
    """The variants of one component in one layer: one patched run per row of ``index``."""

    component: str
    layer: int
    hook: str
    act_dims: tuple[int, ...]
    index: torch.Tensor  # (n, len(act_dims)) the indices along act_dims, row-major over the score axes
    offset: int  # position of the first variant in the flat list of all variants


def blocks(model: LoadedModel, components: Sequence[Component], config: PatchingConfig, n_tokens: int) -> list[Block]:
    """Every variant to run, grouped by (layer, component): layer by layer, so that consecutive variants (one
    forward's worth) patch the same or nearby layers."""
    layers = sorted(set(config.layers)) if config.layers is not None else range(model.n_layers)
    indices = {}
    for comp in components:
        ranges = [range(s) for s in axis_sizes(model, comp, n_tokens)]
        if config.heads is not None and "head" in comp.axes:
            ranges[comp.axes.index("head")] = sorted(set(config.heads))
        indices[comp.name] = torch.tensor(list(itertools.product(*ranges)), dtype=torch.long)  # (n, k)
    out, offset = [], 0
    for layer in layers:
        for comp in components:
            index = indices[comp.name]
            out.append(Block(comp.name, layer, Site(layer, comp.site).hook_name, comp.act_dims, index, offset))
            offset += len(index)
    return out


class Forward(NamedTuple):
    """One forward of the engine: which noise sample it runs, which variants, and the logits of its rows."""

    sample: int  # the noise sample of its corrupted row(s) (0 for a corrupted prompt)
    variants: range  # its variants (indices into the flat list of all variants)
    clean_logits: torch.Tensor  # (1, A, V) the clean run (its reference row)
    corrupted_logits: torch.Tensor  # (R, A, V) the corrupted run: every sample in the first forward, else one
    logits: torch.Tensor  # (len(variants), A, V) the patched runs, in the order of ``variants``


def patched_forwards(model: LoadedModel, cor: Corruption, variants: list[Block], direction: str,
                     batch_size: int) -> Iterator[Forward]:
    """Run every variant, ``batch_size`` per forward, yielding each forward's logits at the answer positions.

    The model reads the clean input alone (batch 1); entering the first layer the batch becomes the forward's
    reference rows, the unpatched runs: row 0 is the clean run, the next rows the corrupted run (all ``S`` noise
    samples in the very first forward, so that it alone fixes the answer, the foil and the metric; the forward's
    own sample after that). Nothing is cached between forwards: a variant's row joins the batch where its
    layer begins, as a copy of the base reference row's residual stream there (the layers below are the base
    run's: no row computes a layer below the one it patches), and each patch copies its slice from the source
    reference row of the same batch, at the same hook, in the same forward. The first forward is therefore
    also the clean and the corrupted run. Memory is bounded by ``batch_size`` (+ S + 1 rows), not by the
    number of variants.
    """
    base, _ = base_and_source(direction)
    p = cor.prompt
    n_answer = len(p.answer_ids)
    block_of = torch.cat([torch.full((len(b.index),), i) for i, b in enumerate(variants)])  # (V,)
    chunks = plan_chunks(variants, batch_size)
    corrupted = entry_states(model, cor.inputs["corrupted"], cor.noise, p.subject_range)  # (S, T, d)
    first = True
    for sample in range(cor.n_samples):
        for chunk in chunks:
            samples = range(cor.n_samples) if first else range(sample, sample + 1)  # corrupted reference rows
            n_ref = 1 + len(samples)
            corrupted_row = 1  # this forward's sample (the first forward runs sample 0, whose row comes first)
            base_row, src_row = (corrupted_row, 0) if base == "corrupted" else (0, corrupted_row)
            v = torch.tensor(chunk)  # (B,) this forward's variants, by layer
            chunk_block = block_of[v]  # (B,)
            layer_of_row = torch.tensor([variants[b].layer for b in chunk_block.tolist()])  # (B,) non-decreasing
            entry_layers, counts = layer_of_row.unique_consecutive(return_counts=True)
            fwd: list[tuple[str, HookFn]] = [
                (Site(0, "resid_pre").hook_name, _reference_rows(corrupted[samples.start: samples.stop]))]
            for layer, n in zip(entry_layers.tolist(), counts.tolist()):  # before any patch in that layer
                fwd.append((Site(layer, "resid_pre").hook_name, _append_copies(base_row, n)))
            for b in chunk_block.unique().tolist():
                blk = variants[b]
                rows = n_ref + (chunk_block == b).nonzero()[:, 0]  # (N,) batch rows patched by this block
                index = blk.index[v[rows - n_ref] - blk.offset]  # (N, k)
                carry = {} if blk.component == "resid_mid" else None
                fwd.append((blk.hook, _copy_slice(src_row, rows, blk.act_dims, index, carry)))
                if carry is not None:  # the bridge's resid_mid feeds only the MLP: carry the change past it too
                    fwd.append((Site(blk.layer, "resid_post").hook_name, _add_carried(carry)))
            with torch.no_grad(), hooks(model, fwd):
                logits = answer_logits(model, cor.inputs["clean"], n_answer)  # (n_ref + B, A, V)
            first = False
            yield Forward(sample, chunk, logits[:1], logits[1:n_ref], logits[n_ref:])


def plan_chunks(variants: list[Block], batch_size: int) -> list[range]:
    """Consecutive ranges of variants, one forward each, of at most ``batch_size``: whole layers together while
    they fit, so that a forward's first patched layer is as late as it can be; a layer with more variants than
    fit is split, and its remainder opens the next forward."""
    chunks: list[range] = []
    start = end = 0  # the open chunk
    layer_ends = [b.offset + len(b.index) for i, b in enumerate(variants)
                  if i + 1 == len(variants) or variants[i + 1].layer != b.layer]
    for layer_end in layer_ends:
        if layer_end - start > batch_size and end > start:  # this layer does not fit: close the open chunk
            chunks.append(range(start, end))
            start = end
        while layer_end - start > batch_size:
            chunks.append(range(start, start + batch_size))
            start += batch_size
        end = layer_end
    if end > start:
        chunks.append(range(start, end))
    return chunks


class _Stop(Exception):
    """Raised by a hook to end a forward early (the rest of the model is not needed)."""


def entry_states(model: LoadedModel, x: torch.Tensor, noise: torch.Tensor | None,
                 subject_range: tuple[int, int] | None) -> torch.Tensor:
    """The residual stream entering the first layer (``blocks.0.hook_resid_pre``: embeddings, plus position
    embeddings where the model has them) for ``x`` (1, T), once per noise sample with ``noise`` (R, n, d) on the
    subject's token embeddings: (R, T, d). The forward stops there; no layer runs."""
    got: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook) -> torch.Tensor:
        got["resid"] = act.detach().clone()
        raise _Stop

    n_rows = 1 if noise is None else noise.shape[0]
    fwd: list[tuple[str, HookFn]] = [] if noise is None else [(EMBED_HOOK, _add_noise(noise, *subject_range))]
    fwd.append((Site(0, "resid_pre").hook_name, grab))
    try:
        with torch.no_grad(), hooks(model, fwd):
            model.bridge(x.expand(n_rows, -1))
    except _Stop:
        pass
    return got["resid"]


def _reference_rows(corrupted: torch.Tensor) -> HookFn:
    """Hook entering the first layer that turns the one clean row (1, T, d) into the reference rows
    (1 + R, T, d): the clean row, then ``corrupted`` (R, T, d), the corrupted run's states there
    (:func:`entry_states`). The model read a batch of one, so everything it built from the input (the causal
    mask, positions, rotary tables) has batch 1 and broadcasts over every row made here and later."""

    def fn(act: torch.Tensor, hook) -> torch.Tensor:  # act (1, T, d)
        return torch.cat([act, corrupted.to(act.device, act.dtype)], dim=0)

    return fn


def _append_copies(row: int, n_rows: int) -> HookFn:
    """Hook appending ``n_rows`` copies of batch row ``row`` (the base run entering this layer) to the batch,
    (B, T, d) -> (B + n_rows, T, d): rows that patch nothing below this layer start here instead of recomputing
    the earlier layers, whose values for them are the base run's. Everything the model computed before it (the
    causal mask, rotary tables) broadcasts over the batch."""

    def fn(act: torch.Tensor, hook) -> torch.Tensor:
        return torch.cat([act, act[row: row + 1].expand(n_rows, *act.shape[1:])], dim=0)

    return fn


def _copy_slice(src_row: int, rows: torch.Tensor, act_dims: tuple[int, ...], index: torch.Tensor,
                carry: dict | None = None) -> HookFn:
    """Hook overwriting, in each of ``rows``, the slice at ``index`` (along ``act_dims``, batch excluded) with
    the same slice of batch row ``src_row`` (the source run, computed in the same forward). Un-indexed axes are
    copied whole. With ``carry``, the change it made (patched - original, (B, ...)) is left in
    ``carry["delta"]`` for :func:`_add_carried`."""

    def fn(act: torch.Tensor, hook) -> torch.Tensor:  # act (B, ...)
        new = act.clone()
        where: list = [slice(None)] * (act.dim() - 1)
        for j, d in enumerate(act_dims):
            where[d] = index[:, j].to(act.device)
        r = rows.to(act.device)
        new[(r, *where)] = act[(torch.full_like(r, src_row), *where)]
        if carry is not None:
            carry["delta"] = new - act
        return new

    return fn


def _add_carried(carry: dict) -> HookFn:
    """Hook adding the change a ``resid_mid`` patch made to the residual stream after the MLP.

    On a TransformerBridge ``blocks.L.hook_resid_mid`` is the MLP norm's input (``ln2.hook_in``): what a hook
    returns there reaches the MLP, while the residual stream that bypasses the MLP keeps the unpatched value.
    Patching the residual stream between attention and MLP (HookedTransformer's ``resid_mid``) therefore also
    adds the change to ``resid_post = resid_mid + mlp_out``."""

    def fn(act: torch.Tensor, hook) -> torch.Tensor:  # act (B, T, d)
        return act + carry.pop("delta")

    return fn


def assemble(model: LoadedModel, components: Sequence[Component], variants: list[Block], flat: torch.Tensor,
             n_tokens: int) -> dict[str, torch.Tensor]:
    """Per-variant numbers (n_variants,) back into one tensor per component, NaN where nothing was patched."""
    out = {c.name: torch.full((model.n_layers, *axis_sizes(model, c, n_tokens)), float("nan")) for c in components}
    for blk in variants:
        t = out[blk.component][blk.layer]  # (*axis sizes)
        t[tuple(blk.index.T)] = flat[blk.offset: blk.offset + len(blk.index)].float()
    return out


# -- the tracer -------------------------------------------------------------------------------------------------


def activation_patching(model: LoadedModel, clean_prompt: str, corrupted_prompt: str | None = None, *,
                        subject: str | None = None, target: str | None = None, foil: str | None = None,
                        components: Sequence[str] | None = None, config: PatchingConfig = PatchingConfig(),
                        progress: Progress | None = None) -> PatchingResult:
    """Patch every entry of every component between a clean and a corrupted run; batched.

    Args:
        clean_prompt: the prompt whose answer is explained.
        corrupted_prompt: the same number of tokens, differing in the detail that changes the answer; or None
            to corrupt ``subject`` with Gaussian noise (``config.samples``, ``config.noise``, ``config.seed``).
        subject: the words of ``clean_prompt`` to corrupt with noise (needed without a corrupted prompt;
            otherwise optional, it only marks the subject's tokens).
        target: the answer (None: the clean run's greedy next token).
        foil: ``logit_diff`` only: the token the answer is compared with (None: the corrupted run's most likely
            token other than the answer).
        components: names from ``COMPONENTS``; None takes ``config.components``.
        progress: called with (rows done, rows in all) before the first forward and after each one.
    Returns:
        A :class:`PatchingResult`; ``scores[c]`` is normalised (1 = clean, 0 = corrupted), ``values[c]`` the raw
        metric, with the axes of ``COMPONENTS[c]``.
    """
    config = resolve_config(config, components)
    comps = check_components(model, config)
    cor = corruption(model, clean_prompt, corrupted_prompt, subject=subject, target=target, foil=foil,
                     config=config)
    n_tokens = len(cor.prompt.input_ids)
    variants = blocks(model, comps, config, n_tokens)
    n_variants = variants[-1].offset + len(variants[-1].index)
    out = torch.empty(cor.n_samples, n_variants)  # the metric of each variant, per noise sample
    c, n_rows, done = None, n_variants * cor.n_samples, 0
    if progress is not None:
        progress(0, n_rows)
    for f in patched_forwards(model, cor, variants, config.direction, config.batch_size):
        if c is None:  # the first forward ran every reference row: it fixes the answer, the foil and the metric
            c = finish_contrast(model, cor, target=target, foil=foil, config=config, acts={},
                                logits={"clean": f.clean_logits, "corrupted": f.corrupted_logits})
        out[f.sample, f.variants.start: f.variants.stop] = c.metric(f.logits).cpu()
        done += len(f.variants)
        if progress is not None:
            progress(done, n_rows)
    values = assemble(model, comps, variants, out.mean(dim=0), n_tokens)
    clean, corrupted = c.metric_of("clean"), c.metric_of("corrupted")
    scores = {k: normalise(v, clean, corrupted) for k, v in values.items()}
    return PatchingResult(**site_scores_fields(model, c, config, scores, values, clean_prompt, corrupted_prompt))
