"""Activation magnitudes: are some hidden states unusually large while the model recalls this fact?

The idea. Run the fact's prompt and measure the L2 norm of each activation (per site and position); run a set
of baseline prompts and measure the same. A site whose norm on the fact prompt stands far above its usual
size (ratio ≫ 1, z-score ≫ 0) is doing something unusual for this prompt - a cheap, correlational hint to set
beside causal tracing (:mod:`mechedit.tracing.causal`), which tests by intervention whether the state matters.
Large norms are not importance: position 0 (BOS or the first token) is huge in most trained LMs whatever the
prompt ("attention sinks", "massive activations", Sun et al. 2024), which is why it is left out of the pools
below.

What is compared. Norms are reported for every position of the fact prompt. The comparison with the baselines
uses two positions only, because a baseline prompt has no "same position" as an arbitrary fact-prompt token:

- ``"last"``: the fact prompt's last token (where the answer is predicted) against the **last token of each
  baseline prompt** (one value per baseline prompt);
- ``"subject_last"`` (only when ``subject`` is given): the subject's last token - where ROME finds the fact
  read from the MLPs - against **every interior token of the baseline prompts** (all positions but the
  first and the last of each; the last is compared as "last").

For each (component, layer, comparison): ``baseline_mean`` and ``baseline_std`` (sample std, ``n - 1``; NaN
with a single value) of the pool, ``ratio = norm / baseline_mean`` and ``z_score = (norm - baseline_mean) /
baseline_std``.

Baselines. The default (:data:`DEFAULT_BASELINE_PROMPTS`) is a dozen short, fact-free English sentences shaped
like prompts: it answers "is this state large compared with text in general?". Prompts of *other facts of the
same relation* answer the sharper "is it large for this fact, compared with recall of similar facts?"; pass
them as ``baseline_prompts``. Each baseline prompt is one forward (no padding, so norms are exact).

Components are TransformerLens site components with a position axis: the residual stream (``resid_pre``,
``resid_mid``, ``resid_post``), sublayer outputs (``attn_out``, ``mlp_out``; norm over ``d_model``), MLP hidden
activations (``mlp_pre``, ``mlp_post``; norm over ``d_mlp``), and per-head ``q``/``k``/``v``/``z`` (norm over
all heads and head dimensions together).

>>> import mechedit                                                   # doctest: +SKIP
>>> from mechedit.tracing import activation_magnitudes                # doctest: +SKIP
>>> m = mechedit.load()                                               # the embedded world model
>>> r = activation_magnitudes(m, "Dalo Frenwick was born in", None, subject="Dalo Frenwick")
>>> r.z_score["mlp_out"]                                              # (n_comparisons, n_layers)
>>> df, fig = r.to_frame(), r.plot()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from mechedit.errors import DataFormatError, InputError
from mechedit.model import LoadedModel
from mechedit.results import JsonResult, tensor_from
from mechedit.sites import RESIDUAL_COMPONENTS, Site
from mechedit.tracing.common import HookFn, hooks, prepare_prompt

FORMAT = "mechedit.activation_magnitudes/1"
# site components with a position axis whose norm is meaningful
NORM_COMPONENTS = (*RESIDUAL_COMPONENTS, "mlp_pre", "mlp_post", "q", "k", "v", "z")
DEFAULT_COMPONENTS = ("resid_post", "attn_out", "mlp_out", "mlp_post")
# comparison -> what it is compared with (the pool of baseline activations)
COMPARISONS = {"last": "the last token of each baseline prompt",
               "subject_last": "every interior token (not the first, not the last) of the baseline prompts"}

# Short fact-free sentences shaped like prompts: "text in general". Prompts of other facts make a sharper baseline.
DEFAULT_BASELINE_PROMPTS: tuple[str, ...] = (
    "The weather today is",
    "She opened the door and walked into the",
    "After lunch we usually go for a",
    "This is a sentence about nothing in",
    "The children were playing in the",
    "He put the book back on the",
    "In the morning the streets are quiet and",
    "They talked for a long time about the",
    "It was a simple idea, but it took a",
    "The meeting will start at",
    "Please remember to close the",
    "Most people agree that a good",
)


@dataclass(frozen=True)
class MagnitudeConfig:
    """What to measure."""

    # site components measured (each per layer and position); the default covers the residual stream after
    # each block, both sublayer outputs, and the MLP's hidden activations (where ROME's keys live)
    components: tuple[str, ...] = DEFAULT_COMPONENTS

    def __post_init__(self) -> None:
        if isinstance(self.components, str):
            raise InputError(f"components must be a list of names, not the string {self.components!r}")
        object.__setattr__(self, "components", tuple(self.components))
        c = self.components
        if not c or len(set(c)) != len(c) or any(x not in NORM_COMPONENTS for x in c):
            raise InputError(f"components must be distinct names among {list(NORM_COMPONENTS)}, got {list(c)}")

    def to_dict(self) -> dict:
        return {"components": list(self.components)}

    @classmethod
    def from_dict(cls, d: dict) -> "MagnitudeConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise DataFormatError(f"magnitude config: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


# -- the result -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MagnitudeResult(JsonResult):
    """What :func:`activation_magnitudes` measured. ``save``/``load`` come from :class:`JsonResult`."""

    FORMAT: ClassVar[str] = FORMAT

    prompt: str
    subject: str | None
    tokens: list[str]  # prompt tokens, each decoded on its own (BOS included when the model reads one)
    subject_range: tuple[int, int] | None  # [start, end) positions of the subject's tokens; None without one
    answer: str  # recorded only: the model reads the prompt alone
    answer_ids: list[int]
    baseline_prompts: list[str]
    norms: dict[str, torch.Tensor]  # component -> (n_layers, n_tokens) L2 norms on the fact prompt
    comparisons: list[str]  # "last", and "subject_last" when a subject was given
    positions: list[int]  # the fact prompt's position of each comparison
    baseline_mean: dict[str, torch.Tensor]  # component -> (n_comparisons, n_layers) mean norm of the pool
    baseline_std: dict[str, torch.Tensor]  # component -> (n_comparisons, n_layers) sample std (NaN if n == 1)
    baseline_n: list[int]  # number of baseline activations in each comparison's pool
    config: MagnitudeConfig
    model_name: str
    model_fingerprint: str
    extra: dict = field(default_factory=dict)  # free-form notes carried through save/load

    @property
    def n_layers(self) -> int:
        return next(iter(self.norms.values())).shape[0]

    @property
    def fact(self) -> dict[str, torch.Tensor]:
        """component -> (n_comparisons, n_layers) the fact prompt's norms at the compared positions."""
        pos = torch.tensor(self.positions)
        return {c: n[:, pos].T for c, n in self.norms.items()}

    @property
    def ratio(self) -> dict[str, torch.Tensor]:
        """component -> (n_comparisons, n_layers) norm / baseline mean."""
        return {c: f / self.baseline_mean[c] for c, f in self.fact.items()}

    @property
    def z_score(self) -> dict[str, torch.Tensor]:
        """component -> (n_comparisons, n_layers) (norm - baseline mean) / baseline std."""
        return {c: (f - self.baseline_mean[c]) / self.baseline_std[c] for c, f in self.fact.items()}

    def to_frame(self):
        """Tidy pandas frame: one row per (component, layer, position, comparison) with columns component,
        layer, position, token, is_subject, comparison, norm, baseline_mean, baseline_std, ratio, z_score.

        Every position appears once with comparison ``"none"`` (baseline columns NaN); the compared positions
        appear again once per comparison (``"last"``, ``"subject_last"``) with the baseline columns filled."""
        import pandas as pd

        start, end = self.subject_range if self.subject_range is not None else (0, 0)
        ratio, z = self.ratio, self.z_score
        nan = float("nan")
        rows = []
        for comp, n in self.norms.items():
            for layer in range(n.shape[0]):
                for pos in range(n.shape[1]):
                    base = (comp, layer, pos, self.tokens[pos], start <= pos < end)
                    rows.append((*base, "none", float(n[layer, pos]), nan, nan, nan, nan))
                    for i, (name, at) in enumerate(zip(self.comparisons, self.positions)):
                        if at == pos:
                            rows.append((*base, name, float(n[layer, pos]), float(self.baseline_mean[comp][i, layer]),
                                         float(self.baseline_std[comp][i, layer]), float(ratio[comp][i, layer]),
                                         float(z[comp][i, layer])))
        return pd.DataFrame(rows, columns=["component", "layer", "position", "token", "is_subject", "comparison",
                                           "norm", "baseline_mean", "baseline_std", "ratio", "z_score"])

    def plot(self):
        """Heatmaps of the fact prompt's norms (tokens × layers) over bars of the z-scores per layer."""
        from mechedit.viz.magnitudes import plot_magnitudes

        return plot_magnitudes(self)

    # -- persistence ------------------------------------------------------------------------------------------
    def to_json_dict(self) -> dict:
        return {
            "prompt": self.prompt, "subject": self.subject, "tokens": list(self.tokens),
            "subject_range": list(self.subject_range) if self.subject_range is not None else None,
            "answer": self.answer, "answer_ids": list(self.answer_ids),
            "baseline_prompts": list(self.baseline_prompts),
            "norms": {c: n.tolist() for c, n in self.norms.items()},  # [layer][position]
            "comparisons": list(self.comparisons), "positions": list(self.positions),
            # [comparison][layer]; NaN is written as JSON's NaN (Python's json reads it back)
            "baseline_mean": {c: m.tolist() for c, m in self.baseline_mean.items()},
            "baseline_std": {c: s.tolist() for c, s in self.baseline_std.items()},
            "baseline_n": list(self.baseline_n), "config": self.config.to_dict(), "model_name": self.model_name,
            "model_fingerprint": self.model_fingerprint, "extra": self.extra,
        }

    @classmethod
    def from_json_dict(cls, d: dict) -> "MagnitudeResult":
        return cls(
            prompt=d["prompt"], subject=d["subject"], tokens=list(d["tokens"]),
            subject_range=tuple(d["subject_range"]) if d["subject_range"] is not None else None,
            answer=d["answer"], answer_ids=list(d["answer_ids"]), baseline_prompts=list(d["baseline_prompts"]),
            norms={c: tensor_from(n) for c, n in d["norms"].items()}, comparisons=list(d["comparisons"]),
            positions=[int(x) for x in d["positions"]],
            baseline_mean={c: tensor_from(m) for c, m in d["baseline_mean"].items()},
            baseline_std={c: tensor_from(s) for c, s in d["baseline_std"].items()},
            baseline_n=[int(x) for x in d["baseline_n"]], config=MagnitudeConfig.from_dict(d["config"]),
            model_name=d["model_name"], model_fingerprint=d["model_fingerprint"], extra=d.get("extra", {}),
        )


# -- the tracer -------------------------------------------------------------------------------------------------


def activation_magnitudes(model: LoadedModel, prompt: str, baseline_prompts: Sequence[str] | None = None,
                          components: Sequence[str] = DEFAULT_COMPONENTS, subject: str | None = None, *,
                          target: str | None = None) -> MagnitudeResult:
    """L2 norms of activations on the fact prompt, compared with the same on baseline prompts.

    Args:
        prompt: the fact's prompt (not empty; at most the model's context).
        baseline_prompts: prompts to compare with (at least one; None = :data:`DEFAULT_BASELINE_PROMPTS`).
        components: site components to measure (see the module docstring); each must exist in the model.
        subject: optional; when given it must occur in ``prompt``, its tokens are marked, and its last token is
            compared with the baselines' interior tokens.
        target: the answer, recorded in the result (None = the model's greedy next token); the norms do not
            depend on it (the model reads the prompt alone).
    Returns:
        A :class:`MagnitudeResult`: ``norms[c]`` is (n_layers, n_prompt_tokens); the comparison tensors are
        (n_comparisons, n_layers).
    """
    config = MagnitudeConfig(components=components)
    baselines = _baselines(baseline_prompts)
    hook_names = _hook_names(model, config.components)
    p = prepare_prompt(model, prompt, subject, target)
    base_ids = []
    for i, text in enumerate(baselines):
        try:
            base_ids.append(model.encode(text))
        except InputError as e:
            raise InputError(f"baseline prompt {i} ({text!r}): {e}") from e

    fact = _norms(model, list(p.ids), config.components, hook_names)  # comp -> (L, T)
    last_pool = {c: [] for c in config.components}  # comp -> [(L,)] one per baseline prompt
    token_pool = {c: [] for c in config.components}  # comp -> [(L, n_interior)]
    for ids in base_ids:
        for c, n in _norms(model, ids, config.components, hook_names).items():  # n (L, T_b)
            last_pool[c].append(n[:, -1])
            token_pool[c].append(n[:, 1:-1])

    comparisons, positions = ["last"], [len(p.ids) - 1]
    pools = {c: [torch.stack(last_pool[c], dim=1)] for c in config.components}  # comp -> [(L, N)]
    if p.subject_range is not None:
        interior = {c: torch.cat(token_pool[c], dim=1) for c in config.components}
        if interior[config.components[0]].shape[1] == 0:
            raise InputError("the baseline prompts have no interior tokens (each is at most 2 tokens long); the "
                             "subject's last token is compared with those, so pass longer baseline prompts")
        comparisons.append("subject_last")
        positions.append(p.subject_range[1] - 1)
        for c in config.components:
            pools[c].append(interior[c])
    mean = {c: torch.stack([pool.mean(dim=1) for pool in pools[c]]) for c in config.components}  # (P, L)
    std = {c: torch.stack([_std(pool) for pool in pools[c]]) for c in config.components}  # (P, L)

    return MagnitudeResult(
        prompt=p.text, subject=p.subject, tokens=list(p.tokens), subject_range=p.subject_range, answer=p.answer,
        answer_ids=list(p.answer_ids), baseline_prompts=list(baselines), norms=fact, comparisons=comparisons,
        positions=positions, baseline_mean=mean, baseline_std=std,
        baseline_n=[int(pools[config.components[0]][i].shape[1]) for i in range(len(comparisons))],
        config=config, model_name=model.name, model_fingerprint=model.fingerprint(),
    )


def _norms(model: LoadedModel, ids: list[int], components: Sequence[str], hook_names: dict[str, list[str]],
           ) -> dict[str, torch.Tensor]:
    """One forward on ``ids``; component -> (n_layers, T) L2 norm of each activation over all its dimensions
    but the position (d_model, d_mlp, or heads × d_head)."""
    found: dict[str, torch.Tensor] = {}

    def keep(name: str) -> HookFn:
        def fn(act: torch.Tensor, hook) -> None:  # act (1, T, ...)
            found[name] = act[0].float().flatten(start_dim=1).norm(dim=-1).cpu()  # (T,)
        return fn

    fwd = [(name, keep(name)) for names in hook_names.values() for name in names]
    with torch.no_grad(), hooks(model, fwd):
        model.bridge(torch.tensor([ids], device=model.device))  # (1, T, V)
    return {c: torch.stack([found[name] for name in hook_names[c]]) for c in components}  # (L, T)


def _std(pool: torch.Tensor) -> torch.Tensor:
    """(L, N) -> (L,) sample standard deviation (n - 1); NaN for a single value."""
    if pool.shape[1] < 2:
        return torch.full((pool.shape[0],), float("nan"))
    return pool.std(dim=1)


def _baselines(baseline_prompts: Sequence[str] | None) -> list[str]:
    if baseline_prompts is None:
        return list(DEFAULT_BASELINE_PROMPTS)
    if isinstance(baseline_prompts, str):
        raise InputError("baseline_prompts must be a list of prompts, not one string; wrap it: [prompt]")
    baselines = list(baseline_prompts)
    if not baselines:
        raise InputError("the list of baseline prompts is empty; pass at least one prompt to compare with, or "
                         "None for the default neutral sentences")
    for i, text in enumerate(baselines):
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"baseline prompt {i} is empty or not a string: {text!r}")
    return baselines


def _hook_names(model: LoadedModel, components: Sequence[str]) -> dict[str, list[str]]:
    """component -> hook name in each layer; a clear error for a component the model lacks."""
    names = {c: [Site(layer, c).hook_name for layer in range(model.n_layers)] for c in components}
    for c, hs in names.items():
        if hs[0] not in model.bridge.hook_dict:
            why = "; its attention and MLP run in parallel" if c == "resid_mid" else ""
            raise InputError(f"{model.architecture} has no {c!r} site (no hook {hs[0]!r}){why}")
    return names
