"""The edit-layer sweep: ROME at every layer, beside the causal trace of the same fact.

ROME edits the layer where causal tracing finds the subject's MLP effect largest (averaged over many facts:
``layer="auto"``; this fact's own: ``layer="fact"``). Hase, Bansal,
Kim and Ghandeharioun ("Does Localization Inform Editing?", NeurIPS 2023) edited at every layer instead and
found that the trace peak predicts poorly where an edit works best: on GPT-J, editing success barely correlated
with the tracing effect of the edited layer. So a user should see both, fact by fact:

* the **trace**: ROME's MLP causal trace (window ≈ n_layers/5) at the subject's last token - per layer, the
  probability of the answer when that layer's MLP output (and its window) is restored into the corrupted run,
  exactly what ``layer="fact"`` picks its layer from (:func:`~mechedit.editing.rome.choose_layer`);
* the **edit**: for each layer, ROME applied there (same hyperparameters otherwise), then CounterFact's three
  rewrite scores of the request (:func:`mechedit.evaluation.counterfact.rewrite_scores`: efficacy, paraphrase
  and neighbourhood success and magnitude), then the edit restored (bit-exactly) before the next layer.

The **best edit layer** is the one with the highest ROME score S (harmonic mean of the three successes), ties
broken by the mean of the three magnitudes: for one record the successes are mostly 0/1, the magnitudes say by
how much.

>>> import mechedit                                                              # doctest: +SKIP
>>> from mechedit.toy.export import embedded_world, world_records
>>> m = mechedit.load()                                                          # doctest: +SKIP
>>> sweep = layer_sweep(m, world_records(embedded_world(), n=1)[0])             # doctest: +SKIP
>>> sweep.trace_peak, sweep.best_layer                                           # doctest: +SKIP
(1, 2)
>>> sweep.plot().show()                                                          # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

from mechedit.data import EditRecord
from mechedit.editing.rome import ROMEHyperParams, choose_layer, rome
from mechedit.editing.rome.rome_main import _check_request
from mechedit.errors import InputError, MecheditError
from mechedit.evaluation import counterfact  # the module, not its names: evaluation imports editing too
from mechedit.model import LoadedModel
from mechedit.results import JsonResult

Progress = Callable[[str, int, int], None]  # (stage, done, total); stages: "trace", "stats", "layer"
FORMAT = "mechedit.layer_sweep/1"
SUCCESS_KEYS = ("efficacy_success", "paraphrase_success", "neighborhood_success")
MAGNITUDE_KEYS = ("efficacy_magnitude", "paraphrase_magnitude", "neighborhood_magnitude")


@dataclass(frozen=True)
class LayerSweepResult(JsonResult):
    """ROME at each swept layer and the MLP causal trace of the same fact. ``save``/``load`` from
    :class:`JsonResult`; ``to_frame()`` one row per swept layer; ``plot()`` trace and scores on one layer axis.

    ``rows[i]`` is layer ``layers[i]``: the keys of :data:`~mechedit.evaluation.counterfact.SCORE_KEYS` (``None``
    where the record has nothing to measure, or where the edit was refused), ``target_prob`` (the value
    optimisation's final mean p(target)), ``update_ratio`` (‖ΔW‖/‖W‖), ``seconds`` and ``error`` (``None``, or why
    ROME refused a degenerate update at that layer)."""

    FORMAT: ClassVar[str] = FORMAT

    layers: list[int]
    rows: list[dict]
    unedited: dict  # the rewrite scores before any edit (SCORE_KEYS)
    trace_scores: list[float]  # (n_layers,) p(answer) with layer L's MLP window restored, subject's last token
    trace_low: float  # p(answer) in the corrupted run
    trace_high: float  # p(answer) in the clean run
    trace_peak: int  # ROME's layer="fact": argmax of trace_scores
    trace_info: dict  # window, samples, token, position, answer
    request: dict
    hparams: dict
    model_name: str
    model_fingerprint: str
    extra: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.trace_scores)

    @property
    def trace_effects(self) -> list[float]:
        """(n_layers,) the indirect effect per layer: trace score minus the corrupted run's."""
        return [s - self.trace_low for s in self.trace_scores]

    def score(self, layer: int) -> tuple[float, float]:
        """(ROME's S - harmonic mean of the three successes -, mean of the three magnitudes) of the edit at
        ``layer``; scores the record cannot measure are left out, a refused edit is (-inf, -inf)."""
        row = self.rows[self.layers.index(layer)]
        successes = [row[k] for k in SUCCESS_KEYS if row[k] is not None]
        magnitudes = [row[k] for k in MAGNITUDE_KEYS if row[k] is not None]
        if row["error"] is not None or not successes:
            return -math.inf, -math.inf
        s = 0.0 if min(successes) == 0 else len(successes) / sum(1 / x for x in successes)
        return s, sum(magnitudes) / len(magnitudes)

    @property
    def best_layer(self) -> int | None:
        """The swept layer whose edit scores best (see :meth:`score`); None when every edit was refused."""
        best = max(self.layers, key=self.score)
        return None if self.score(best)[0] == -math.inf else best

    def to_frame(self):
        """One row per swept layer: layer, trace_score, trace_effect, is_trace_peak, is_best, the six rewrite
        scores, rome_score (S), target_prob, update_ratio, seconds, error."""
        import pandas as pd

        best = self.best_layer
        out = []
        for layer, row in zip(self.layers, self.rows):
            s = self.score(layer)[0]
            out.append({"layer": layer, "trace_score": self.trace_scores[layer],
                        "trace_effect": self.trace_effects[layer], "is_trace_peak": layer == self.trace_peak,
                        "is_best": layer == best, **{k: row[k] for k in counterfact.SCORE_KEYS},
                        "rome_score": None if s == -math.inf else s, "target_prob": row["target_prob"],
                        "update_ratio": row["update_ratio"], "seconds": row["seconds"], "error": row["error"]})
        return pd.DataFrame(out)

    def plot(self):
        """Trace effect per layer (top) and the three rewrite scores per swept layer (bottom), the trace peak
        and the best edit layer marked."""
        from mechedit.viz.layer_sweep import plot_layer_sweep

        return plot_layer_sweep(self)

    def to_json_dict(self) -> dict:
        return {"layers": list(self.layers), "rows": self.rows, "unedited": self.unedited,
                "trace_scores": list(self.trace_scores), "trace_low": self.trace_low, "trace_high": self.trace_high,
                "trace_peak": self.trace_peak, "trace_info": self.trace_info, "request": self.request,
                "hparams": self.hparams, "model_name": self.model_name, "model_fingerprint": self.model_fingerprint,
                "best_layer": self.best_layer, "extra": self.extra}

    @classmethod
    def from_json_dict(cls, d: dict) -> LayerSweepResult:
        return cls(layers=[int(x) for x in d["layers"]], rows=list(d["rows"]), unedited=dict(d["unedited"]),
                   trace_scores=[float(x) for x in d["trace_scores"]], trace_low=float(d["trace_low"]),
                   trace_high=float(d["trace_high"]), trace_peak=int(d["trace_peak"]),
                   trace_info=dict(d["trace_info"]), request=dict(d["request"]), hparams=dict(d["hparams"]),
                   model_name=d["model_name"], model_fingerprint=d["model_fingerprint"], extra=d.get("extra", {}))


def layer_sweep(model: LoadedModel, request: EditRecord, hparams: ROMEHyperParams | None = None,
                layers: Sequence[int] | None = None, progress: Progress | None = None) -> LayerSweepResult:
    """ROME at each of ``layers`` (default: every layer), one at a time and restored after each, beside the MLP
    causal trace of the same fact.

    Args:
        request: the edit; its ``target_true`` (the fact as the model knows it) is what the trace scores and what
            efficacy and paraphrase scores compare against (without it those scores are ``None`` and the trace
            follows the model's own answer).
        hparams: ROME's hyperparameters (None: this model's defaults); ``layer`` is ignored (each swept layer in turn).
        layers: the layers to edit, each once.
        progress: called with (stage, done, total): ``"trace"``, ``"stats"`` (key statistics not yet cached for
            a layer) and ``"layer"`` (layers edited).
    Returns:
        A :class:`LayerSweepResult`. The model's weights are bit-identical afterwards.
    Raises:
        InputError: an unusable request, hparams or layer list (before anything runs). A degenerate update at
        one layer is not an error: that row records why ROME refused it.
    """
    if not isinstance(request, EditRecord):
        raise InputError(f"request must be an EditRecord, got {type(request).__name__}")
    if hparams is None:
        from mechedit.editing.methods import make_hparams

        hparams = make_hparams("rome", None, model)  # this model's defaults
    if not isinstance(hparams, ROMEHyperParams):
        raise InputError(f"hparams must be a ROMEHyperParams, got {type(hparams).__name__}")
    if layers is None:
        layers = list(range(model.n_layers))
    layers = list(layers)
    if not layers:
        raise InputError("no layers to sweep")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < model.n_layers:
            raise InputError(f"layer {layer!r} is out of range; the model has layers 0..{model.n_layers - 1}")
    if len(set(layers)) != len(layers):
        raise InputError(f"layers {layers} name a layer twice")
    _check_request(model, request)  # refuse a request ROME would refuse at every layer, once, up front

    fingerprint = model.fingerprint()
    before = counterfact.rewrite_scores(model, request)
    unedited = {k: v for k, v in before.items() if k in counterfact.SCORE_KEYS}
    peak, evidence = choose_layer(model, request, replace(hparams, layer="fact"), progress)
    trace = evidence["trace"]
    rows = []
    if progress is not None:
        progress("layer", 0, len(layers))
    for i, layer in enumerate(layers):
        started = time.perf_counter()
        hp = replace(hparams, layer=layer)
        forward = (lambda stage, d, t: progress(stage, d, t) if stage == "stats" else None) if progress else None
        try:
            with rome(model, request, hp, forward) as handle:
                scores = counterfact.rewrite_scores(model, request)
                row = {**{k: scores[k] for k in counterfact.SCORE_KEYS}, "target_prob": handle.evidence["target_prob"],
                       "update_ratio": handle.evidence["update_ratio"], "error": None}
        except InputError:
            raise
        except MecheditError as e:  # a degenerate update at this layer: nothing was changed; say why
            row = {**{k: None for k in counterfact.SCORE_KEYS}, "target_prob": None, "update_ratio": None,
                   "error": str(e)}
        rows.append({"layer": layer, **row, "seconds": round(time.perf_counter() - started, 4)})
        if progress is not None:
            progress("layer", i + 1, len(layers))
    if model.fingerprint() != fingerprint:  # pragma: no cover - every edit is restored by its context manager
        raise MecheditError("the model's weights changed during the sweep")
    return LayerSweepResult(
        layers=layers, rows=rows, unedited=unedited, trace_scores=list(trace["scores"]),
        trace_low=float(trace["low_score"]), trace_high=float(trace["high_score"]), trace_peak=peak,
        trace_info={k: trace[k] for k in ("kind", "window", "samples", "token", "position", "answer")},
        request=request.to_dict(), hparams=replace(hparams, layer="fact").to_dict(), model_name=model.name,
        model_fingerprint=fingerprint)


__all__ = ["LayerSweepResult", "layer_sweep"]
