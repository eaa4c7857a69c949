"""Causal tracing with noise: which hidden states carry a fact from the subject to the answer?

Meng, Bau, Andonian and Belinkov, "Locating and Editing Factual Associations in GPT" (NeurIPS 2022), §2.

The idea. Run the model three ways on a prompt such as "Dalo Frenwick was born in" → " Paris":

1. **clean**: the prompt as is; the answer's probability is ``high_score``.
2. **corrupted**: Gaussian noise is added to the token embeddings of the subject ("Dalo Frenwick"), so the
   model can no longer tell who the prompt is about; the answer's probability drops to ``low_score``.
3. **corrupted-with-restoration**: the corrupted run again, but one internal state is overwritten with its
   value from the clean run. If that single state carries what the model knows about the subject, the
   answer's probability climbs back towards ``high_score``.

The probability after restoring a state is its ``score``; ``score - low_score`` is its *indirect effect*.
Three kinds of state are traced, each per (layer, token):

- ``hidden``: the residual stream after layer L (``blocks.L.hook_resid_post``; ROME restores the layer's
  output hidden state).
- ``mlp`` / ``attn``: the MLP / attention output (``blocks.L.hook_mlp_out`` / ``blocks.L.hook_attn_out``),
  restored at one token over a *window* of layers centred on L (default 10, clipped at the edges; see
  :func:`window_layers`), because a single sublayer's contribution is small.

In GPT-2 XL, ROME found the MLPs at the subject's last token in middle layers decisive (an "early site"),
and attention at the last token in late layers (a "late site").

Noise: every cell of one noise sample restores into the *same* corrupted run - the noise is drawn once per
sample (ROME's practice), from a ``torch.Generator`` seeded with ``config.seed``. Scores average the answer's
probability over ``config.samples`` samples. The default noise std is 3× the standard deviation of subject
token embeddings (:func:`~mechedit.tracing.common.noise_scale`).

Batching: a grid of n_layers × n_tokens cells × 3 kinds × 10 samples is thousands of forwards. Each
(cell, sample) pair is one row of a batch, ``config.batch_size`` rows per forward, so memory is bounded by the
chunk, not by the grid. A row is computed only where it differs from others (:func:`run_cells`): below the
lowest layer it restores it is its sample's noised run, computed once and cached per layer, so a row starts
there; rows of one sample that have restored the same states so far share each layer until they branch; equal
cells run once; only the answer positions are unembedded. :func:`causal_trace_reference` runs one plain
forward per row and is what the batched version is tested against (``benchmarks/bench_causal_trace.py``
times both).

Multi-token answers are scored under teacher forcing: the probability of the whole answer is the product of
its tokens' probabilities, each given the prompt and the answer tokens before it.

>>> import mechedit
>>> from mechedit.tracing import causal_trace
>>> m = mechedit.load()                                              # the embedded world model
>>> world = mechedit.World.load(m.path / "world.json")
>>> subject = world.subjects[0]
>>> result = causal_trace(m, f"{subject} was born in the city of", subject)
>>> layer, position, score = result.peak("mlp")
>>> df = result.to_frame()                                           # tidy: kind, layer, position, ...
>>> fig = result.plot()                                              # ROME-style heatmaps
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

import torch

from mechedit.errors import DataFormatError, InputError
from mechedit.model import LoadedModel
from mechedit.results import JsonResult
from mechedit.sites import HOOKS, Site
from mechedit.tracing.common import (
    HookFn,
    Prompt,
    answer_logits,
    answer_prob,
    clean_run,
    draw_noise,
    hooks,
    noise_scale,
    prepare_prompt,
)

# kind -> the site component restored
KINDS: dict[str, str] = {"hidden": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}
EMBED_HOOK = HOOKS["embed"]  # the noise goes onto the token embeddings
FORMAT = "mechedit.causal_trace/1"
ROME_WINDOW = 10  # ROME's window for MLP and attention traces (GPT-2 XL: 48 layers, GPT-J: 28)

Progress = Callable[[int, int], None]  # (rows done, rows in all)


@dataclass(frozen=True)
class CausalTraceConfig:
    """How to trace. Defaults are ROME's."""

    samples: int = 10  # corrupted runs (noise samples) averaged per cell
    noise: float | None = None  # noise std; None = 3 × std of subject token embeddings (see resolve_noise)
    window: int = ROME_WINDOW  # layers restored together for "mlp"/"attn", centred on the row's layer (clipped;
    # on smaller models than ROME's scaled_window(n_layers) keeps its proportion: `mechedit trace` uses that)
    kinds: tuple[str, ...] = ("hidden", "mlp", "attn")  # which states to trace
    seed: int = 0  # seeds the noise generator: same seed, same noise, same result
    batch_size: int = 256  # (cell, sample) rows per forward; bounds memory

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        if not isinstance(self.samples, int) or self.samples < 1:
            raise InputError(f"samples must be a positive integer, got {self.samples!r}")
        if self.noise is not None and not (isinstance(self.noise, (int, float)) and self.noise > 0):
            raise InputError(f"noise must be a positive number (the noise std) or None for 3× the subject "
                             f"embedding std, got {self.noise!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise InputError(f"window must be a positive integer, got {self.window!r}")
        if not self.kinds or any(k not in KINDS for k in self.kinds) or len(set(self.kinds)) != len(self.kinds):
            raise InputError(f"kinds must be distinct names among {list(KINDS)}, got {list(self.kinds)}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {self.batch_size!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CausalTraceConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise DataFormatError(f"causal trace config: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def scaled_window(n_layers: int) -> int:
    """A window for a model of ``n_layers``: ROME's proportion, a fifth of the layers (rounded, at least 1).

    ROME's 10 is about a fifth of GPT-2 XL's 48 layers. On a small model 10 spans most of it: on the embedded
    model (8 layers) the windows centred on layers 3 to 5 restore all 8 layers and every other centre 5 to 7
    of them, so the MLP and attention maps say little about where. A fifth gives 10 on GPT-2 XL, 6 on SmolLM2
    (30 layers), 2 on the embedded model, 1 on a 3-layer test model; the same rule as
    :meth:`mechedit.locating.LocateConfig.window_for`, so that ``mechedit trace`` and ``mechedit locate`` trace
    with the same window by default."""
    return max(1, round(n_layers / 5))


def window_layers(centre: int, window: int, n_layers: int) -> range:
    """Layers restored together for a window centred on ``centre`` (ROME's definition, clipped at the edges):
    ``range(max(0, centre - window // 2), min(n_layers, centre - (-window // 2)))``."""
    return range(max(0, centre - window // 2), min(n_layers, centre - (-window // 2)))


def resolve_noise(model: LoadedModel, config: CausalTraceConfig, subject: str) -> float:
    """The noise std to use: ``config.noise`` when given; else 3× the std of subject embeddings, measured over
    the world's subjects when the model directory holds a ``world.json`` (the embedded model), else over
    ``subject`` alone."""
    if config.noise is not None:
        return float(config.noise)
    subjects = [subject]
    if model.path is not None and (model.path / "world.json").exists():
        from mechedit.toy.world import World

        subjects = list(World.load(model.path / "world.json").subjects)
    return noise_scale(model, subjects)


# -- the result -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CausalTraceResult(JsonResult):
    """What :func:`causal_trace` found for one prompt. ``save``/``load`` come from :class:`JsonResult`."""

    FORMAT: ClassVar[str] = FORMAT

    prompt: str
    subject: str
    tokens: list[str]  # prompt tokens, each decoded on its own (BOS included when the model reads one)
    subject_range: tuple[int, int]  # [start, end) positions of the subject's tokens
    answer: str
    answer_ids: list[int]
    low_score: float  # p(answer) with the subject corrupted, nothing restored (mean over samples)
    high_score: float  # p(answer) on the clean prompt
    scores: dict[str, torch.Tensor]  # kind -> (n_layers, n_tokens) p(answer) after restoring that state
    config: CausalTraceConfig
    noise_scale: float  # the noise std actually used
    model_name: str
    model_fingerprint: str
    extra: dict = field(default_factory=dict)  # free-form notes carried through save/load

    @property
    def n_layers(self) -> int:
        return next(iter(self.scores.values())).shape[0]

    def peak(self, kind: str) -> tuple[int, int, float]:
        """(layer, position, score) of the highest score of ``kind``."""
        s = self._kind(kind)  # (L, T)
        flat = int(s.argmax())
        layer, pos = divmod(flat, s.shape[1])
        return layer, pos, float(s[layer, pos])

    def to_frame(self):
        """Tidy pandas frame: one row per (kind, layer, position) with columns kind, layer, position, token,
        is_subject, score, indirect_effect (= score - low_score)."""
        import pandas as pd

        start, end = self.subject_range
        rows = []
        for kind, s in self.scores.items():
            for layer in range(s.shape[0]):
                for pos in range(s.shape[1]):
                    score = float(s[layer, pos])
                    rows.append((kind, layer, pos, self.tokens[pos], start <= pos < end, score,
                                 score - self.low_score))
        return pd.DataFrame(rows, columns=["kind", "layer", "position", "token", "is_subject", "score",
                                           "indirect_effect"])

    def plot(self):
        """ROME-style heatmaps, one panel per kind (a plotly Figure)."""
        from mechedit.viz.causal_trace import plot_causal_trace

        return plot_causal_trace(self)

    # -- persistence ------------------------------------------------------------------------------------------
    def to_json_dict(self) -> dict:
        return {
            "prompt": self.prompt, "subject": self.subject, "tokens": list(self.tokens),
            "subject_range": list(self.subject_range), "answer": self.answer, "answer_ids": list(self.answer_ids),
            "low_score": self.low_score, "high_score": self.high_score,
            "scores": {kind: s.tolist() for kind, s in self.scores.items()},  # [layer][position]
            "config": self.config.to_dict(), "noise_scale": self.noise_scale,
            "model_name": self.model_name, "model_fingerprint": self.model_fingerprint, "extra": self.extra,
        }

    @classmethod
    def from_json_dict(cls, d: dict) -> "CausalTraceResult":
        return cls(
                prompt=d["prompt"], subject=d["subject"], tokens=list(d["tokens"]),
                subject_range=tuple(d["subject_range"]), answer=d["answer"], answer_ids=list(d["answer_ids"]),
                low_score=float(d["low_score"]), high_score=float(d["high_score"]),
                scores={k: torch.tensor(v, dtype=torch.float32) for k, v in d["scores"].items()},
                config=CausalTraceConfig.from_dict(d["config"]), noise_scale=float(d["noise_scale"]),
            model_name=d["model_name"], model_fingerprint=d["model_fingerprint"], extra=d.get("extra", {}),
        )

    def _kind(self, kind: str) -> torch.Tensor:
        if kind not in self.scores:
            raise InputError(f"this trace has no kind {kind!r}; it has {list(self.scores)}")
        return self.scores[kind]


# -- the batched engine -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    """Restore one clean activation: ``hook`` at token ``position`` (only head/neuron ``index`` when set)."""

    hook: str
    position: int
    index: int | None = None

    @property
    def layer(self) -> int:
        """The layer ``hook`` is in; -1 for the embeddings (before every layer)."""
        layer = Site.parse(self.hook).layer
        return -1 if layer is None else layer


Cell = tuple[Patch, ...]  # what one cell restores together; () restores nothing (the corrupted baseline)
History = tuple[int, int]  # (noise sample, id of the patches a row has met so far; see patches_met)


def run_cells(model: LoadedModel, prompt: Prompt, noise: torch.Tensor, cells: Sequence[Cell],
              clean: dict[str, torch.Tensor], batch_size: int, progress: Progress | None = None) -> torch.Tensor:
    """p(answer) for every (cell, noise sample), ``batch_size`` rows per forward.

    A row is one (cell, sample): the sample's noised run with the cell's clean states written back. Rows are
    computed only where they differ, so the result is the reference's, with much less work:

    - Below the lowest layer a cell restores, its row *is* its sample's noised run. The noised run is computed
      once, every sample in one batch, keeping the residual stream entering each layer
      (:func:`noised_residuals`). A forward reads the prompt at batch 1 up to the lowest layer its rows
      restore, and a hook swaps in the noised residual streams there.
    - Above it, rows of one sample that have restored the same states so far are still equal (a window
      clipped at the bottom: ROME's MLP window restores layers 0-4 for centre 0, 0-5 for centre 1). Each layer
      runs once per distinct *history* - (sample, the states restored up to that layer), see
      :func:`histories` - and a hook at the next layer's input copies each history out to the histories that
      branch from it.
    - Equal cells run once, and only the answer positions are unembedded.

    Rows that restore an embedding run from the start, one batch row each, with the noise added in the forward.
    Rows are sorted by what they restore, lowest layer first, so that one forward's rows share the most.

    Args:
        noise: (S, n_subject_tokens, d_model) noise, added to the subject's token embeddings.
        cells: what each cell restores.
        clean: hook name -> (T, ...) clean activation, for every hook a cell restores.
        progress: called with (rows done, rows to run) - distinct (cell, sample) pairs - before the first
            forward and after each one.
    Returns:
        (n_cells, S) probabilities (float32, CPU). Row r of the flattened grid is cell r // S, sample r % S.
    """
    n_samples, n_answer, n_layers = noise.shape[0], len(prompt.answer_ids), model.n_layers
    x = torch.tensor([prompt.input_ids], device=model.device)  # (1, T)
    layer_of = {p: p.layer for cell in cells for p in cell}  # -1: an embedding

    def sort_key(p: Patch) -> tuple[int, str, int, int]:
        return layer_of[p], p.hook, p.position, -1 if p.index is None else p.index

    canonical = [tuple(sorted(cell, key=sort_key)) for cell in cells]  # lowest layer first
    distinct = list(dict.fromkeys(canonical))  # equal cells run once
    met, prefixes = patches_met(distinct, layer_of, n_layers)
    first = [layer_of[cell[0]] if cell else n_layers - 1 for cell in distinct]  # lowest layer restored
    rows = sorted(((c, s) for c in range(len(distinct)) for s in range(n_samples)),  # (cell, sample) pairs
                  key=lambda row: (first[row[0]], [sort_key(p) for p in distinct[row[0]]], row[1]))
    resid = noised_residuals(model, x, noise, prompt.subject_range, {f for f in first if f >= 0})
    probs = torch.empty(len(distinct), n_samples)
    if progress is not None:
        progress(0, len(rows))
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo: lo + batch_size]  # this forward's B rows
        entry = min(first[c] for c, _ in chunk)
        if entry < 0:  # an embedding is restored: every row from the start, noised in this forward
            fwd = _from_embeddings(chunk, distinct, noise, clean, prompt.subject_range)
            x_in = x.expand(len(chunk), -1)  # (B, T)
        else:  # batch 1 up to layer `entry`, then one batch row per history
            fwd = _from_layer(entry, chunk, met, prefixes, layer_of, resid, clean)
            x_in = x  # (1, T)
        with torch.no_grad(), hooks(model, fwd):
            logits = answer_logits(model, x_in, n_answer)  # (B, A, V), one row per row of `chunk`, in order
        cell_idx, sample_idx = torch.tensor(chunk).T  # (B,) each
        probs[cell_idx, sample_idx] = answer_prob(logits, prompt).cpu()  # (B,)
        del logits  # freed before the next forward allocates its own
        if progress is not None:
            progress(lo + len(chunk), len(rows))
    index = {cell: i for i, cell in enumerate(distinct)}
    return probs[[index[cell] for cell in canonical]]  # (n_cells, S)


def patches_met(cells: Sequence[Cell], layer_of: dict[Patch, int], n_layers: int,
                ) -> tuple[list[list[int]], list[Cell]]:
    """Number what each cell has restored by the end of each layer.

    Cells are sorted lowest layer first, so the patches a cell has met by the end of layer L (those at layer L
    or below) are a prefix of it. Returns ``met`` and ``prefixes``: ``met[c][L]`` is the id of cell c's prefix
    at layer L, ``prefixes[i]`` the prefix with id i; equal prefixes of different cells share an id.
    """
    ids: dict[Cell, int] = {}
    met = []
    for cell in cells:
        layers = [layer_of[p] for p in cell]  # ascending
        met.append([ids.setdefault(cell[:bisect_right(layers, layer)], len(ids)) for layer in range(n_layers)])
    return met, list(ids)


def histories(rows: Sequence[tuple[int, int]], met: list[list[int]], layer: int) -> list[History]:
    """The distinct histories of ``rows`` ((cell, sample) each) while ``layer`` runs, in order of first
    occurrence. A row's history is its sample and what its cell has restored at ``layer`` or below: rows with
    the same history compute the same values up to and including ``layer``. At the last layer distinct rows
    have distinct histories."""
    return list(dict.fromkeys((s, met[c][layer]) for c, s in rows))


def _from_layer(entry: int, chunk: list[tuple[int, int]], met: list[list[int]], prefixes: list[Cell],
                layer_of: dict[Patch, int], resid: dict[int, torch.Tensor],
                clean: dict[str, torch.Tensor]) -> list[tuple[str, HookFn]]:
    """Hooks running the (cell, sample) rows of ``chunk`` from layer ``entry`` up, one batch row per history:
    the noised residual streams swapped in at ``entry``, histories branching at later layers, and each
    history's restorations."""
    n_layers = len(met[0])  # met[c] has one entry per layer
    hist = {layer: histories(chunk, met, layer) for layer in range(entry, n_layers)}
    samples = [s for s, _ in hist[entry]]  # (U_entry,)
    fwd = [(Site(entry, "resid_pre").hook_name, _swap_in(resid[entry][samples]))]  # (U_entry, T, d)
    for layer in range(entry + 1, n_layers):
        if len(hist[layer]) > len(hist[layer - 1]):  # some histories branch here (else the same, in order)
            at = {h: i for i, h in enumerate(hist[layer - 1])}
            parent = {(s, met[c][layer]): at[s, met[c][layer - 1]] for c, s in chunk}
            fwd.append((Site(layer, "resid_pre").hook_name, _branch(torch.tensor([parent[h] for h in hist[layer]]))))
    # the restorations, after the hooks above: hook -> [(history's batch row, position, index or -1)]
    by_hook: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for layer in range(entry, n_layers):
        for u, (_, prefix) in enumerate(hist[layer]):
            for p in prefixes[prefix]:
                if layer_of[p] == layer:
                    by_hook[p.hook].append((u, p.position, -1 if p.index is None else p.index))
    return fwd + [(hook, _restore(clean[hook], entries)) for hook, entries in by_hook.items()]


def _from_embeddings(chunk: list[tuple[int, int]], cells: list[Cell], noise: torch.Tensor,
                     clean: dict[str, torch.Tensor], subject_range: tuple[int, int]) -> list[tuple[str, HookFn]]:
    """Hooks running every (cell, sample) row of ``chunk`` from the embeddings: the noise first, then the
    restorations (an embedding's after its noise)."""
    samples = torch.tensor([s for _, s in chunk])  # (B,)
    by_hook: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for b, (c, _) in enumerate(chunk):
        for p in cells[c]:
            by_hook[p.hook].append((b, p.position, -1 if p.index is None else p.index))
    fwd = [(EMBED_HOOK, _add_noise(noise[samples], *subject_range))]
    return fwd + [(hook, _restore(clean[hook], entries)) for hook, entries in by_hook.items()]


def noised_residuals(model: LoadedModel, x: torch.Tensor, noise: torch.Tensor, subject_range: tuple[int, int],
                     layers: set[int]) -> dict[int, torch.Tensor]:
    """Run the prompt ``x`` (1, T) once per noise sample, all samples in one batch; return the residual stream
    entering each of ``layers`` (``blocks.L.hook_resid_pre``), layer -> (S, T, d_model). At most
    n_layers × S × T × d_model values, kept for the whole trace (besides each forward's chunk)."""
    cache: dict[int, torch.Tensor] = {}

    def save(layer: int) -> HookFn:
        def fn(act: torch.Tensor, hook) -> None:  # act (S, T, d)
            cache[layer] = act.detach().clone()
        return fn

    fwd = [(EMBED_HOOK, _add_noise(noise, *subject_range))]
    fwd += [(Site(layer, "resid_pre").hook_name, save(layer)) for layer in sorted(layers)]
    with torch.no_grad(), hooks(model, fwd):
        answer_logits(model, x.expand(noise.shape[0], -1), 1)  # (S, 1, V), unused
    return cache


def _swap_in(resid: torch.Tensor) -> HookFn:
    """Hook replacing the residual stream entering a layer - (1, T, d), from the batch-1 prefix - by ``resid``
    (U, T, d). What the model computed before it (the causal mask, rotary tables) has batch 1 and broadcasts."""

    def fn(act: torch.Tensor, hook) -> torch.Tensor:
        return resid.to(act.device, act.dtype)

    return fn


def _branch(parent: torch.Tensor) -> HookFn:
    """Hook copying each history out to the histories that branch from it: (U_before, T, d) -> (U_now, T, d),
    row i of the result being row ``parent[i]``."""

    def fn(act: torch.Tensor, hook) -> torch.Tensor:
        return act[parent.to(act.device)]

    return fn


def _add_noise(noise: torch.Tensor, start: int, end: int) -> HookFn:
    """Hook adding ``noise`` (B, end - start, d) to the embeddings of positions [start, end)."""

    def fn(emb: torch.Tensor, hook) -> torch.Tensor:  # emb (B, T, d)
        emb = emb.clone()
        emb[:, start:end] += noise.to(emb.device, emb.dtype)
        return emb

    return fn


def _restore(clean: torch.Tensor, entries: list[tuple[int, int, int]]) -> HookFn:
    """Hook writing clean values into the rows and positions of ``entries`` ((row, position, index or -1))."""
    rows, pos, idx = torch.tensor(entries).T  # (N,) each
    whole = idx < 0

    def fn(act: torch.Tensor, hook) -> torch.Tensor:  # act (B, T, ...); clean (T, ...)
        act = act.clone()
        c = clean.to(act.device, act.dtype)
        r, p, i, w = (t.to(act.device) for t in (rows, pos, idx, whole))
        act[r[w], p[w]] = c[p[w]]  # the whole vector at a position
        act[r[~w], p[~w], i[~w]] = c[p[~w], i[~w]]  # one head / one neuron
        return act

    return fn


def kind_hook(kind: str, layer: int) -> str:
    return Site(layer, KINDS[kind]).hook_name


def grid_cell(kind: str, layer: int, position: int, window: int, n_layers: int) -> Cell:
    """What the grid cell (kind, layer, position) restores: one hidden state, or a window of MLP/attention
    outputs centred on ``layer``."""
    layers = [layer] if kind == "hidden" else window_layers(layer, window, n_layers)
    return tuple(Patch(kind_hook(kind, lyr), position) for lyr in layers)


# -- the tracers ------------------------------------------------------------------------------------------------


def causal_trace(model: LoadedModel, prompt: str, subject: str, target: str | None = None,
                 config: CausalTraceConfig = CausalTraceConfig(), progress: Progress | None = None,
                 ) -> CausalTraceResult:
    """Trace every (layer, token) of each kind in ``config.kinds``; batched.

    Args:
        prompt: the prompt; ``subject`` must occur in it (its last occurrence is corrupted).
        target: the answer to score; None = the model's own greedy next token (see ``prepare_prompt``).
        progress: called with (rows done, rows in all) before the first forward and after each one.
    Returns:
        A :class:`CausalTraceResult`; ``scores[kind]`` is (n_layers, n_prompt_tokens).
    """
    p, scale, noise = _setup(model, prompt, subject, target, config)
    high, clean = clean_run(model, p, _grid_hooks(model, config))
    n_layers, n_tokens = model.n_layers, len(p.ids)
    grid = [(kind, layer, pos) for kind in config.kinds for layer in range(n_layers) for pos in range(n_tokens)]
    cells = [()] + [grid_cell(kind, layer, pos, config.window, n_layers) for kind, layer, pos in grid]
    probs = run_cells(model, p, noise, cells, clean, config.batch_size, progress)  # (1 + n_grid, S)
    means = probs.mean(dim=1)  # (1 + n_grid,)
    scores = {kind: means[1 + i * n_layers * n_tokens: 1 + (i + 1) * n_layers * n_tokens].view(n_layers, n_tokens)
              for i, kind in enumerate(config.kinds)}
    return _result(model, p, float(means[0]), high, scores, config, scale)


def trace_restore_set(model: LoadedModel, prompt: str, subject: str,
                      restore: Sequence[tuple[Site | str, int]], target: str | None = None,
                      config: CausalTraceConfig = CausalTraceConfig()) -> float:
    """p(answer) in the corrupted run with a *set* of states restored together (mean over noise samples).

    Args:
        restore: (site, position) pairs. A site is any :class:`~mechedit.sites.Site` with a position axis
            (``blocks.3.hook_mlp_out``, ``blocks.3.attn.hook_z[head=1]``, ``hook_embed``, ...; not attention
            patterns). Positions index the model's input - the prompt's tokens, then the answer's tokens but
            the last - and may be negative (from the end). An empty set gives the corrupted score.
            ``blocks.L.hook_resid_mid`` is the residual stream between attention and MLP, as in
            HookedTransformer. On the bridge that hook is the MLP norm's input, and a value restored there alone
            would reach the MLP but not the residual stream that bypasses it; so the whole stream at that
            position is restored, which (the MLP acting position by position) is also restoring
            ``blocks.L.hook_resid_post`` there.
        config: ``samples``, ``noise``, ``seed`` and ``batch_size`` apply (``kinds`` and ``window`` do not).
    """
    p, _, noise = _setup(model, prompt, subject, target, config)
    n = len(p.input_ids)
    patches = []
    for site, pos in restore:
        s = model.site(site)
        if s.component == "pattern":
            raise InputError(f"site {s}: attention patterns have no single position axis; restore "
                             "blocks.L.attn.hook_z[head=h] instead")
        if not isinstance(pos, int) or not -n <= pos < n:
            raise InputError(f"position {pos!r} is out of range; the model's input has {n} tokens")
        patches.append(Patch(s.hook_name, pos % n, s.head if s.head is not None else s.neuron))
        if s.component == "resid_mid":  # the stream past the MLP too (see above): its clean value there
            patches.append(Patch(Site(s.layer, "resid_post").hook_name, pos % n))
    _, clean = clean_run(model, p, [pt.hook for pt in patches])
    probs = run_cells(model, p, noise, [tuple(patches)], clean, config.batch_size)  # (1, S)
    return float(probs.mean())


def reference_cell(model: LoadedModel, p: Prompt, noise: torch.Tensor, clean: dict[str, torch.Tensor],
                   restores: Sequence[tuple[str, int]]) -> float:
    """p(answer) of one corrupted run, plainly: ``noise`` (n_subject_tokens, d) added to the subject's
    embeddings, then each (hook, position) in ``restores`` put back from the ``clean`` cache. One forward."""
    start, end = p.subject_range
    x = torch.tensor([p.input_ids], device=model.device)  # (1, T)

    def add_noise(emb, hook):  # emb (1, T, d)
        emb = emb.clone()
        emb[0, start:end] += noise.to(emb.device, emb.dtype)
        return emb

    def put_back(hook_name: str, pos: int) -> HookFn:
        def fn(act, hook):  # act (1, T, d)
            act = act.clone()
            act[0, pos] = clean[hook_name][pos]
            return act
        return fn

    fwd = [(EMBED_HOOK, add_noise)] + [(h, put_back(h, pos)) for h, pos in restores]
    with torch.no_grad(), hooks(model, fwd):
        logits = model.bridge(x)  # (1, T, V)
    return float(answer_prob(logits, p)[0])


def causal_trace_reference(model: LoadedModel, prompt: str, subject: str, target: str | None = None,
                           config: CausalTraceConfig = CausalTraceConfig()) -> CausalTraceResult:
    """The same trace, one (cell, sample) per forward, with the same noise: slow and plain, for tests and
    benchmarks. ``config.batch_size`` is ignored."""
    p, scale, noise = _setup(model, prompt, subject, target, config)
    high, clean = clean_run(model, p, _grid_hooks(model, config))

    def corrupted_prob(sample: int, restores: list[tuple[str, int]]) -> float:
        return reference_cell(model, p, noise[sample], clean, restores)

    samples = range(config.samples)
    low = sum(corrupted_prob(s, []) for s in samples) / config.samples
    scores = {}
    for kind in config.kinds:
        s_kind = torch.zeros(model.n_layers, len(p.ids))
        for layer in range(model.n_layers):
            layers = [layer] if kind == "hidden" else window_layers(layer, config.window, model.n_layers)
            for pos in range(len(p.ids)):
                restores = [(kind_hook(kind, lyr), pos) for lyr in layers]
                s_kind[layer, pos] = sum(corrupted_prob(s, restores) for s in samples) / config.samples
        scores[kind] = s_kind
    return _result(model, p, low, high, scores, config, scale)


def _setup(model: LoadedModel, prompt: str, subject: str, target: str | None, config: CausalTraceConfig,
           ) -> tuple[Prompt, float, torch.Tensor]:
    """The prepared prompt, the noise std and the noise, (S, n_subject_tokens, d_model)."""
    if not isinstance(config, CausalTraceConfig):
        raise InputError(f"config must be a CausalTraceConfig, got {type(config).__name__}")
    p = prepare_prompt(model, prompt, subject, target)
    scale = resolve_noise(model, config, p.subject)
    start, end = p.subject_range
    noise = draw_noise(config.samples, end - start, model.d_model, scale, config.seed)
    return p, scale, noise


def _grid_hooks(model: LoadedModel, config: CausalTraceConfig) -> list[str]:
    """Every hook the grid restores (their clean activations are cached once)."""
    return [kind_hook(kind, layer) for kind in config.kinds for layer in range(model.n_layers)]


def _result(model, p: Prompt, low: float, high: float, scores: dict, config, scale: float) -> CausalTraceResult:
    return CausalTraceResult(
        prompt=p.text, subject=p.subject, tokens=list(p.tokens), subject_range=p.subject_range, answer=p.answer,
        answer_ids=list(p.answer_ids), low_score=low, high_score=high,
        scores={k: v.detach().float().cpu().clone() for k, v in scores.items()}, config=config,
        noise_scale=scale, model_name=model.name, model_fingerprint=model.fingerprint(),
    )
