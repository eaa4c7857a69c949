"""Locating: turn tracer results into the two places an editor needs - a layer for a rank-one edit and a set of
modules for a restricted adapter - and say which evidence chose each.

The idea. Each tracer answers a narrower question (:mod:`mechedit.tracing`): causal tracing asks which hidden
states carry the fact from the subject to the answer; activation patching asks which sublayer outputs restore
the answer when copied from the clean run into a corrupted one; gradient norms ask where a small weight change
would move the answer most. An editor needs decisions, not heatmaps:

1. **The rank-one edit layer** (ROME, Meng et al. 2022, §3): ROME rewrites the MLP output projection of the
   layer where restoring the MLP output *at the last subject token* brings the answer back most - the peak of
   the causal trace's ``mlp`` kind in that token's column. ``edit_module`` is that layer's MLP output
   projection (``model.module_name(edit_layer, "mlp_out")``).
2. **The adapter modules**: a restricted adapter (e.g. (IA)³ on a few modules) should sit where the fact
   matters *and* where a weight change moves the answer. Every module of the architecture table
   (``model.arch.modules()``: ``attn_q``/``attn_k``/``attn_v`` or ``attn_qkv``, ``attn_out``, ``mlp_in*``,
   ``mlp_out``) in every layer is a candidate, scored by two numbers, each min-max normalised to [0, 1] over
   all candidates:

   - *patching effect*: activation patching (denoising, the subject corrupted with ROME's noise) of the
     sublayer output the module writes to - ``blocks.L.hook_mlp_out`` for MLP modules, ``blocks.L.hook_attn_out``
     for attention modules - reduced to one number per layer by ``config.position`` (default ``"max"``: the
     largest effect over the prompt's positions, because attention matters at the last token and MLPs at the
     subject's, and one module should be judged at its own best position; ``"last_subject"`` reads the last
     subject token only). Modules of one sublayer share its effect; gradients tell them apart. Under noise
     corruption, restoring an early sublayer's output at a subject token also undoes much of the noise itself
     (on SmolLM2, restoring layer 0's MLP output at a subject token of "The Eiffel Tower is located in the
     city of" brings back ~45% of the lost p(" Paris")): such modules rank high. Pass patching evidence with a
     corrupted *prompt* (another subject) to rank by what differs between subjects instead.
   - *gradient norm*: ``‖∂ log p(answer) / ∂ θ_module‖₂`` (:func:`~mechedit.tracing.gradient_norms`).

   ``combined = (w_p · patch + w_g · grad) / (w_p + w_g)`` with ``config.patch_weight`` and
   ``config.grad_weight`` (0.5 each: causal importance and trainability count the same); the
   ``config.adapter_size`` highest (default 10) are the adapter's modules. Ties go to the larger patching
   effect, then the lower layer.

Evidence. Tracer results already computed can be passed in ``evidence`` (a :class:`LocateEvidence`); only
the missing ones are computed. Every piece must be about the same prompt, subject, answer and weights (model
fingerprint), else :class:`~mechedit.errors.InputError`. The result keeps all three tracer results, and each
decision records its rule, the key numbers it read, and whether each tracer result was computed or given.

>>> import mechedit                                                   # doctest: +SKIP
>>> from mechedit.locating import locate                                # doctest: +SKIP
>>> m = mechedit.load()                                               # the embedded world model
>>> r = locate(m, "Dalo Frenwick was born in", "Dalo Frenwick")
>>> r.edit_layer, r.edit_module                                       # (3, 'model.layers.3.mlp.down_proj')
>>> r.adapter_modules[:3]                                             # HF module names, best first
>>> df, fig = r.to_frame(), r.plot()
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

import torch

from mechedit.errors import DataFormatError, InputError
from mechedit.model import LoadedModel
from mechedit.results import JsonResult
from mechedit.sites import Site
from mechedit.tracing.causal import CausalTraceConfig, CausalTraceResult, causal_trace
from mechedit.tracing.common import Prompt, prepare_prompt
from mechedit.tracing.gradients import GradientNormResult, gradient_norms
from mechedit.tracing.patching import PatchingConfig, PatchingResult, activation_patching

FORMAT = "mechedit.locate/1"
POSITIONS = ("max", "last_subject")
Progress = Callable[[int, int], None]  # (steps done, steps in all)


@dataclass(frozen=True)
class LocateConfig:
    """How to locate. Tracer settings apply to the tracers :func:`locate` runs itself, not to given evidence."""

    # MLP layers restored together around each layer in the causal trace. None = max(1, round(n_layers / 5)):
    # ROME's 10 is about a fifth of GPT-2 XL's 48 layers; on an 8-layer model a window of 10 would restore every
    # layer at once and every centre would score the same.
    window: int | None = None
    samples: int = 10  # noise samples per traced or patched cell (ROME: 10)
    noise: float | None = None  # noise std; None = 3 × the std of subject token embeddings (as causal_trace)
    seed: int = 0  # seeds the noise of tracing and patching: same seed, same decisions
    adapter_size: int = 10  # modules chosen for the restricted adapter (the study this toolkit grew from used 10)
    adapter_kinds: tuple[str, ...] | None = None  # module kinds considered (ArchSpec.modules()); None = all
    position: str = "max"  # patching effect per layer: "max" over prompt positions, or at the "last_subject" token
    patch_metric: str = "prob"  # patching metric: p(answer) as in causal tracing; works for multi-token answers
    patch_weight: float = 0.5  # weight of the normalised patching effect in the combined score
    grad_weight: float = 0.5  # weight of the normalised gradient norm
    batch_size: int = 128  # rows per forward for tracing and patching; bounds memory

    def __post_init__(self) -> None:
        if self.adapter_kinds is not None:
            if isinstance(self.adapter_kinds, str):
                raise InputError(f"adapter_kinds must be a list of module kinds, not the string "
                                 f"{self.adapter_kinds!r}")
            object.__setattr__(self, "adapter_kinds", tuple(self.adapter_kinds))
            if not self.adapter_kinds or len(set(self.adapter_kinds)) != len(self.adapter_kinds):
                raise InputError(f"adapter_kinds must be distinct module kinds (or None for all), got "
                                 f"{list(self.adapter_kinds)}")
        for name in ("samples", "adapter_size", "batch_size"):
            _positive_int(name, getattr(self, name))
        if self.window is not None:
            _positive_int("window", self.window)
        if self.noise is not None and not (isinstance(self.noise, (int, float)) and self.noise > 0):
            raise InputError(f"noise must be a positive number (the noise std) or None, got {self.noise!r}")
        if self.position not in POSITIONS:
            raise InputError(f"position must be one of {list(POSITIONS)}, got {self.position!r}")
        PatchingConfig(metric=self.patch_metric)  # validates the metric
        for name in ("patch_weight", "grad_weight"):
            w = getattr(self, name)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w >= 0 and math.isfinite(w)):
                raise InputError(f"{name} must be a non-negative number, got {w!r}")
        if self.patch_weight + self.grad_weight <= 0:
            raise InputError("patch_weight and grad_weight cannot both be 0")

    def window_for(self, n_layers: int) -> int:
        return self.window if self.window is not None else max(1, round(n_layers / 5))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adapter_kinds"] = None if self.adapter_kinds is None else list(self.adapter_kinds)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LocateConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise DataFormatError(f"locate config: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")


EVIDENCE_TYPES = {"causal_trace": CausalTraceResult, "patching": PatchingResult, "gradients": GradientNormResult}


@dataclass(frozen=True)
class LocateEvidence:
    """Tracer results :func:`locate` reads. Pass those already computed; None ones are computed."""

    causal_trace: CausalTraceResult | None = None  # needs the "mlp" kind
    patching: PatchingResult | None = None  # needs "mlp_out" and/or "attn_out" (per the candidate kinds)
    gradients: GradientNormResult | None = None  # needs the candidate module kinds

    def to_json_dict(self) -> dict:
        return {name: None if r is None else {"format": r.FORMAT, **r.to_json_dict()}
                for name, r in self._items()}

    @classmethod
    def from_json_dict(cls, d: dict) -> "LocateEvidence":
        kw = {}
        for name, kind in EVIDENCE_TYPES.items():
            value = d.get(name)
            if value is not None and value.get("format") != kind.FORMAT:
                raise DataFormatError(f"locate evidence {name!r}: format {value.get('format')!r}, expected "
                                      f"{kind.FORMAT!r}")
            kw[name] = None if value is None else kind.from_json_dict(value)
        return cls(**kw)

    def _items(self):
        return ((f.name, getattr(self, f.name)) for f in fields(self))


@dataclass(frozen=True)
class Decision:
    """Why a decision came out as it did."""

    rule: str  # the rule in words, with its parameters
    sources: dict[str, str]  # tracer result read -> "computed" or "given"
    numbers: dict  # the key numbers the rule read (plain JSON data)

    def to_dict(self) -> dict:
        return {"rule": self.rule, "sources": dict(self.sources), "numbers": self.numbers}

    @classmethod
    def from_dict(cls, d: dict) -> "Decision":
        return cls(rule=d["rule"], sources=dict(d["sources"]), numbers=d["numbers"])


@dataclass(frozen=True)
class RankedModule:
    """One candidate module for the adapter, with the numbers that ranked it."""

    rank: int  # 1 = best
    module: str  # HF module name (as in the un-bridged model's named_modules)
    kind: str  # module kind of the architecture table ("mlp_out", "attn_q", ...)
    layer: int
    site: str  # the patched site whose effect the module was given (blocks.L.hook_mlp_out / hook_attn_out)
    position: int  # prompt position the patching effect was read at
    patch_effect: float  # patching effect there (normalised score: 1 = clean restored, 0 = corrupted)
    grad_norm: float  # ‖∂ log p(answer) / ∂ θ_module‖₂
    patch_score: float  # patch_effect min-max normalised over the candidates, [0, 1]
    grad_score: float  # grad_norm min-max normalised over the candidates, [0, 1]
    combined: float  # (w_p · patch_score + w_g · grad_score) / (w_p + w_g)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RankedModule":
        return cls(**{f.name: d[f.name] for f in fields(cls)})


# -- the result -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LocateResult(JsonResult):
    """What :func:`locate` decided for one fact. ``save``/``load`` come from :class:`JsonResult`."""

    FORMAT: ClassVar[str] = FORMAT

    prompt: str
    subject: str
    tokens: list[str]  # prompt tokens, each decoded on its own (BOS included when the model reads one)
    subject_range: tuple[int, int]  # [start, end) positions of the subject's tokens
    answer: str
    answer_ids: list[int]
    low_score: float  # causal trace: p(answer) with the subject corrupted
    high_score: float  # causal trace: p(answer) on the clean prompt
    edit_layer: int  # layer for a rank-one edit
    edit_module: str  # that layer's MLP output projection (HF module name)
    edit_decision: Decision
    adapter_modules: list[str]  # HF module names for a restricted adapter, best first
    adapter_decision: Decision
    ranking: list[RankedModule]  # every candidate module, best first
    evidence: LocateEvidence  # the tracer results read
    config: LocateConfig
    model_name: str
    model_fingerprint: str
    extra: dict = field(default_factory=dict)  # free-form notes carried through save/load

    def to_frame(self):
        """Tidy pandas frame of the ranking, one row per candidate module: rank, module, kind, layer, site,
        position, token, patch_effect, grad_norm, patch_score, grad_score, combined, in_adapter,
        is_edit_module."""
        import pandas as pd

        chosen = set(self.adapter_modules)
        rows = [(r.rank, r.module, r.kind, r.layer, r.site, r.position, self.tokens[r.position], r.patch_effect,
                 r.grad_norm, r.patch_score, r.grad_score, r.combined, r.module in chosen,
                 r.module == self.edit_module) for r in self.ranking]
        return pd.DataFrame(rows, columns=["rank", "module", "kind", "layer", "site", "position", "token",
                                           "patch_effect", "grad_norm", "patch_score", "grad_score", "combined",
                                           "in_adapter", "is_edit_module"])

    def plot(self):
        """The edit layer's causal-trace column, the combined score per (module kind, layer) with the adapter's
        modules marked, and the top of the ranking split into its two parts (a plotly Figure)."""
        from mechedit.viz.locate import plot_locate

        return plot_locate(self)

    # -- persistence ------------------------------------------------------------------------------------------
    def to_json_dict(self) -> dict:
        trace = self.evidence.causal_trace
        return {
            "prompt": self.prompt, "subject": self.subject, "tokens": list(self.tokens),
            "subject_range": list(self.subject_range), "answer": self.answer, "answer_ids": list(self.answer_ids),
            "low_score": self.low_score, "high_score": self.high_score,
            # the evidence causal trace's grid, per kind [layer][position]; read back from the evidence, not stored
            "scores": {} if trace is None else {kind: s.tolist() for kind, s in trace.scores.items()},
            "edit_layer": self.edit_layer,
            "edit_module": self.edit_module, "edit_decision": self.edit_decision.to_dict(),
            "adapter_modules": list(self.adapter_modules), "adapter_decision": self.adapter_decision.to_dict(),
            "ranking": [r.to_dict() for r in self.ranking], "evidence": self.evidence.to_json_dict(),
            "config": self.config.to_dict(), "model_name": self.model_name,
            "model_fingerprint": self.model_fingerprint, "extra": self.extra,
        }

    @classmethod
    def from_json_dict(cls, d: dict) -> "LocateResult":
        return cls(
            prompt=d["prompt"], subject=d["subject"], tokens=list(d["tokens"]),
            subject_range=tuple(d["subject_range"]), answer=d["answer"], answer_ids=list(d["answer_ids"]),
            low_score=float(d["low_score"]), high_score=float(d["high_score"]), edit_layer=int(d["edit_layer"]),
            edit_module=d["edit_module"], edit_decision=Decision.from_dict(d["edit_decision"]),
            adapter_modules=list(d["adapter_modules"]), adapter_decision=Decision.from_dict(d["adapter_decision"]),
            ranking=[RankedModule.from_dict(r) for r in d["ranking"]],
            evidence=LocateEvidence.from_json_dict(d["evidence"]), config=LocateConfig.from_dict(d["config"]),
            model_name=d["model_name"], model_fingerprint=d["model_fingerprint"], extra=d.get("extra", {}),
        )


# -- locating ---------------------------------------------------------------------------------------------------


def locate(model: LoadedModel, prompt: str, subject: str, target: str | None = None, *,
           config: LocateConfig = LocateConfig(), evidence: LocateEvidence | None = None,
           progress: Progress | None = None) -> LocateResult:
    """Choose the rank-one edit layer and the adapter's modules for one fact (see the module docstring).

    Args:
        prompt: the prompt; ``subject`` must occur in it.
        target: the answer; None = the model's own greedy next token (see ``prepare_prompt``).
        config: the rules' parameters and the settings of the tracers run here.
        evidence: tracer results already computed for this prompt, subject, answer and model; the missing
            ones are computed.
        progress: called with (steps done, steps so far known) while tracers run; the total grows as each
            tracer starts.
    Returns:
        A :class:`LocateResult`.
    """
    if not isinstance(config, LocateConfig):
        raise InputError(f"config must be a LocateConfig, got {type(config).__name__}")
    if evidence is None:
        evidence = LocateEvidence()
    if not isinstance(evidence, LocateEvidence):
        raise InputError(f"evidence must be a LocateEvidence, got {type(evidence).__name__}")
    for name, given in evidence._items():
        if given is not None and not isinstance(given, EVIDENCE_TYPES[name]):
            raise InputError(f"evidence {name!r} must be a {EVIDENCE_TYPES[name].__name__}, got "
                             f"{type(given).__name__}")
    p = prepare_prompt(model, prompt, subject, target)
    kinds = candidate_kinds(model, config)
    components = sorted({sublayer_output(k) for k in kinds})  # the patched sites
    stages = _Stages(progress)
    sources: dict[str, str] = {}

    trace = evidence.causal_trace
    if trace is None:
        trace_cfg = CausalTraceConfig(samples=config.samples, noise=config.noise, seed=config.seed,
                                      window=config.window_for(model.n_layers), kinds=("mlp",),
                                      batch_size=config.batch_size)
        trace = causal_trace(model, prompt, subject, target, trace_cfg, progress=stages.next())
    sources["causal_trace"] = _check(model, p, evidence.causal_trace, "causal_trace")
    if "mlp" not in trace.scores:
        raise InputError(f"the given causal trace has no 'mlp' kind (it has {list(trace.scores)}); the edit layer "
                         "is the MLP peak at the last subject token")

    patching = evidence.patching
    if patching is None:
        patch_cfg = PatchingConfig(components=tuple(components), direction="denoise", metric=config.patch_metric,
                                   batch_size=config.batch_size, samples=config.samples, noise=config.noise,
                                   seed=config.seed)
        patching = activation_patching(model, prompt, None, subject=subject, target=target, config=patch_cfg,
                                       progress=stages.next())
    sources["patching"] = _check(model, p, evidence.patching, "patching")
    missing = [c for c in components if c not in patching.scores]
    if missing:
        raise InputError(f"the given patching result has no component(s) {missing} (it has "
                         f"{list(patching.scores)}); locate needs {components}")

    grads = evidence.gradients
    if grads is None:
        step = stages.next()
        if step is not None:
            step(0, 1)
        grads = gradient_norms(model, prompt, subject, target, components=("resid_post",), kinds=tuple(kinds))
        if step is not None:
            step(1, 1)
    sources["gradients"] = _check(model, p, evidence.gradients, "gradients")
    missing = [k for k in kinds if k not in grads.modules]
    if missing:
        raise InputError(f"the given gradient norms have no module kind(s) {missing} (they have "
                         f"{list(grads.modules)}); locate needs {kinds}")

    edit_layer, edit_decision = choose_edit_layer(trace, sources["causal_trace"])
    ranking, adapter_decision = rank_modules(model, p, patching, grads, kinds, config,
                                             {k: sources[k] for k in ("patching", "gradients")})
    adapter = [r.module for r in ranking[:config.adapter_size]]
    return LocateResult(
        prompt=p.text, subject=p.subject, tokens=list(p.tokens), subject_range=p.subject_range, answer=p.answer,
        answer_ids=list(p.answer_ids), low_score=trace.low_score, high_score=trace.high_score,
        edit_layer=edit_layer, edit_module=model.module_name(edit_layer, "mlp_out"), edit_decision=edit_decision,
        adapter_modules=adapter, adapter_decision=adapter_decision, ranking=ranking,
        evidence=LocateEvidence(causal_trace=trace, patching=patching, gradients=grads), config=config,
        model_name=model.name, model_fingerprint=model.fingerprint(),
    )


def candidate_kinds(model: LoadedModel, config: LocateConfig) -> list[str]:
    """Module kinds the adapter may use: ``config.adapter_kinds``, or every kind the architecture has."""
    have = [k for k, path in model.arch.modules().items() if path]
    if config.adapter_kinds is None:
        return have
    missing = [k for k in config.adapter_kinds if k not in have]
    if missing:
        raise InputError(f"{model.architecture} has no module kind(s) {missing}; it has {', '.join(have)}")
    return list(config.adapter_kinds)


def sublayer_output(kind: str) -> str:
    """The site component a module of ``kind`` writes into: ``mlp_out`` for MLP modules, ``attn_out`` for
    attention modules."""
    if kind.startswith("mlp_"):
        return "mlp_out"
    if kind.startswith("attn_"):
        return "attn_out"
    raise InputError(f"module kind {kind!r} is neither an MLP nor an attention module")


def choose_edit_layer(trace: CausalTraceResult, source: str) -> tuple[int, Decision]:
    """ROME's rule: the layer whose windowed MLP restoration at the last subject token scores highest (the
    lowest such layer on a tie)."""
    pos = trace.subject_range[1] - 1
    column = trace.scores["mlp"][:, pos]  # (L,)
    layer = int(column.argmax())
    rule = (f"argmax over layers of the causal-trace 'mlp' score (window {trace.config.window}) at the last "
            f"subject token (position {pos})")
    numbers = {"kind": "mlp", "position": pos, "token": trace.tokens[pos], "window": trace.config.window,
               "samples": trace.config.samples, "noise_scale": trace.noise_scale, "low_score": trace.low_score,
               "high_score": trace.high_score, "scores": column.tolist(), "peak_score": float(column[layer]),
               "peak_indirect_effect": float(column[layer]) - trace.low_score}
    return layer, Decision(rule=rule, sources={"causal_trace": source}, numbers=numbers)


def rank_modules(model: LoadedModel, p: Prompt, patching: PatchingResult, grads: GradientNormResult,
                 kinds: list[str], config: LocateConfig, sources: dict[str, str],
                 ) -> tuple[list[RankedModule], Decision]:
    """Every (kind, layer) module ranked by the combined score; the decision records the rule and its inputs."""
    n_prompt = len(p.ids)
    last_subject = p.subject_range[1] - 1
    best: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # component -> (effect per layer, its position)
    for comp in {sublayer_output(k) for k in kinds}:
        eff = patching.effect(comp)[:, :n_prompt]  # (L, T) higher = matters more
        if not bool(eff.isfinite().all()):
            raise InputError(f"the patching effects of {comp!r} are not all finite (the clean and corrupted runs "
                             "score the same, or some layers were not patched); locate needs every layer")
        if config.position == "max":
            best[comp] = eff.max(dim=1)  # values (L,), indices (L,)
        else:
            best[comp] = (eff[:, last_subject], torch.full((eff.shape[0],), last_subject))
    rows = []
    for layer in range(model.n_layers):
        for kind in kinds:
            comp = sublayer_output(kind)
            values, where = best[comp]
            rows.append(dict(module=model.module_name(layer, kind), kind=kind, layer=layer,
                             site=Site(layer, comp).hook_name, position=int(where[layer]),
                             patch_effect=float(values[layer]), grad_norm=float(grads.modules[kind][layer])))
    patch_n = _minmax([r["patch_effect"] for r in rows])
    grad_n = _minmax([r["grad_norm"] for r in rows])
    wp, wg = config.patch_weight, config.grad_weight
    for r, a, b in zip(rows, patch_n, grad_n):
        r.update(patch_score=a, grad_score=b, combined=(wp * a + wg * b) / (wp + wg))
    order = {k: i for i, k in enumerate(kinds)}
    rows.sort(key=lambda r: (-r["combined"], -r["patch_score"], r["layer"], order[r["kind"]]))
    ranking = [RankedModule(rank=i + 1, **r) for i, r in enumerate(rows)]
    chosen = ranking[:config.adapter_size]
    position = ("the largest effect over the prompt's positions" if config.position == "max"
                else f"the effect at the last subject token (position {last_subject})")
    rule = (f"the {len(chosen)} modules of kinds {kinds} with the highest combined score "
            f"({wp:g} · patching + {wg:g} · gradient) / {wp + wg:g}, each part min-max normalised to [0, 1] over "
            f"all {len(ranking)} candidates; patching: denoising the sublayer output the module writes to "
            f"(mlp_out / attn_out), {position}; gradient: ‖∂ log p(answer) / ∂ module parameters‖₂")
    corruption = "noise on the subject" if patching.corrupted_prompt is None else patching.corrupted_prompt
    numbers = {"size": len(chosen), "kinds": kinds, "position": config.position,
               "weights": {"patching": wp, "gradients": wg},
               "patching": {"metric": patching.config.metric, "direction": patching.config.direction,
                            "corruption": corruption, "clean_metric": patching.clean_metric,
                            "corrupted_metric": patching.corrupted_metric,
                            "range": [min(r["patch_effect"] for r in rows), max(r["patch_effect"] for r in rows)]},
               "gradients": {"log_prob": grads.log_prob,
                             "range": [min(r["grad_norm"] for r in rows), max(r["grad_norm"] for r in rows)]},
               "chosen": [{"module": r.module, "combined": r.combined} for r in chosen],
               "cutoff": chosen[-1].combined if chosen else None,
               "next": ranking[len(chosen)].combined if len(ranking) > len(chosen) else None}
    return ranking, Decision(rule=rule, sources=sources, numbers=numbers)


def _minmax(values: list[float]) -> list[float]:
    """Min-max normalisation to [0, 1]; all 0 when every value is the same."""
    lo, hi = min(values), max(values)
    return [0.0 if hi == lo else (v - lo) / (hi - lo) for v in values]


def _check(model: LoadedModel, p: Prompt, given, name: str) -> str:
    """"given" or "computed"; a given result must be about this prompt, subject, answer and model."""
    if given is None:
        return "computed"
    prompt = given.clean_prompt if name == "patching" else given.prompt
    problems = []
    if prompt != p.text:
        problems.append(f"its prompt is {prompt!r}, not {p.text!r}")
    if given.subject != p.subject:
        problems.append(f"its subject is {given.subject!r}, not {p.subject!r}")
    if tuple(given.answer_ids) != p.answer_ids:
        problems.append(f"it scores the answer {given.answer!r}, not {p.answer!r}")
    if given.model_fingerprint != model.fingerprint():
        problems.append("it was computed on other weights (model fingerprint "
                        f"{given.model_fingerprint}, this model {model.fingerprint()})")
    if problems:
        raise InputError(f"the given {name} evidence does not fit: " + "; ".join(problems))
    return "given"


class _Stages:
    """One progress callback over several tracers run one after another: each stage's (done, total) is shifted
    by the steps of the stages before it."""

    def __init__(self, progress: Progress | None):
        self.progress, self.offset, self.current = progress, 0, 0

    def next(self) -> Progress | None:
        if self.progress is None:
            return None
        self.offset += self.current
        self.current = 0

        def step(done: int, total: int) -> None:
            self.current = total
            self.progress(self.offset + done, self.offset + total)

        return step
