"""Study 5: locate, then edit, on a knowledge graph. Is the causal-trace peak the best layer to edit?

For N random facts - of the embedded world (``world_records``, seeded; the default), or, with ``--model
smollm2-135m``, CounterFact records the model *knows* (below):

1. **Trace** each fact (ROME's noise, 10 samples, hidden / MLP / attention with a window of a fifth of the
   layers: 2 on the embedded model, 6 on SmolLM2; ``--trace-samples`` / ``--trace-kinds`` to trace less) and
   average the indirect effects by subject-token position (first / middle / last subject token, further tokens,
   last token): ROME's Figure 2 on this model (``summary.*``).
2. **Sweep**: ROME at every layer (or at ``--layers``), restored after each, beside the MLP trace of the same fact
   over *all* layers (:func:`mechedit.layer_sweep`). The trace peak is what ``layer="fact"`` edits; the best layer
   is the swept layer with the highest ROME score (harmonic mean of efficacy, paraphrase and neighbourhood
   success; ties by the mean magnitude).

Reports how often the trace peak is the best edit layer (95% Wilson interval), the scores at the trace peak vs at
the best layer, mean scores per edited layer beside the mean trace effect per layer, and their correlation across
layers (Hase et al. 2023 found the trace a poor predictor of where editing works on GPT-J). With ``--layers`` a
subset, the best layer can only be a swept one, so it is compared with the trace peak *among the swept layers*
(the peak over all layers is reported beside it). Writes ``results.json``, ``results.md``, ``summary.png`` (the
averaged trace) and ``layers.png`` to --out.

On a model without a world (``--model smollm2-135m``) the facts are CounterFact records from ``--data`` (default
``../shared/data/counterfact.json``), taken in a seeded random order and kept only when the model's greedy next
token is the first token of ``target_true`` (tracing needs the model to predict the true answer); the output says
how many were drawn to find N. ROME's hyperparameters are pinned in full (:data:`SMOL_ROME`, those of
``analyses/counterfact_smollm2.py`` and ``analyses/two_plus_two.py``; key statistics from 1,000 model-sampled
texts of 64 tokens, cached on disk) and recorded in ``results.json``. Each fact's trace and sweep is appended to
``facts.jsonl`` in --out as soon as it is done, so an interrupted run keeps its work and a rerun (same settings)
skips the facts already there; CPU and wall seconds per fact and for the run go into ``results.json``.

    python analyses/locate_then_edit.py --n 50 --out docs/results/locate-then-edit
    OMP_NUM_THREADS=1 python analyses/locate_then_edit.py --model smollm2-135m --n 10 --layers 0:30:3 \\
        --threads 1 --out docs/results/locate-then-edit/smollm2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

import mechedit
from mechedit.editing.sweep import SUCCESS_KEYS, LayerSweepResult, layer_sweep
from mechedit.errors import InputError
from mechedit.evaluation.stats import interval, mean_ci, wilson
from mechedit.toy.export import world_records
from mechedit.toy.world import World
from mechedit.tracing.causal import (
    CausalTraceConfig,
    CausalTraceResult,
    causal_trace,
    scaled_window,
)
from mechedit.tracing.common import encode_target
from mechedit.tracing.summary import summarize_traces

sys.path.insert(0, str(Path(__file__).resolve().parent))  # analyses/pinned.py, however this file is loaded
from pinned import SMOL_ROME as SMOL_ROME_AT_8

EMBEDDED = "embedded"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact.json"
# ROME on SmolLM2 pinned in full (the library's defaults may change): the settings of analyses/two_plus_two.py's
# SMOL_ROME and counterfact_smollm2.py's "rome" - ROME's GPT-2 XL values, r-ROME's consistent keys, key statistics
# from 1,000 texts of 64 tokens sampled from the model itself (no Wikipedia offline; cached on disk after the first
# run, shared by every layer), clamp at 4 x ||v|| with no widening retry (clamp_norm_max None: ROME's own rule).
# "layer" is what the sweep replaces by each swept layer in turn (and the trace by the fact's own peak); layer_facts
# and layer_n_facts only serve layer="auto" and are unused here.
SMOL_ROME = {**SMOL_ROME_AT_8, "layer": "fact", "layer_facts": "auto", "layer_n_facts": 50}
PINNED = {"smollm2-135m": SMOL_ROME}


def harmonic(scores: dict) -> float | None:
    vals = [scores.get(k) for k in SUCCESS_KEYS]
    if any(v is None for v in vals):
        return None
    return 0.0 if min(vals) == 0 else len(vals) / sum(1 / v for v in vals)


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson's r; None when it is undefined (fewer than two points, or either side constant)."""
    t = torch.tensor([x, y], dtype=torch.float64)
    r = float(torch.corrcoef(t)[0, 1]) if len(x) > 1 else math.nan
    return None if math.isnan(r) else r


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """``None``/``"all"``: every layer; ``"a:b:c"`` (or ``"a:b"``): ``range(a, b, c)``; else comma-separated
    layers. Each must be in 0..n_layers-1 and named once."""
    if spec is None or spec.strip() == "all":
        return list(range(n_layers))
    try:
        if ":" in spec:
            parts = [int(p) for p in spec.split(":")]
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] < 1):
                raise ValueError
            layers = list(range(*parts))
        else:
            layers = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise InputError(f"--layers {spec!r}: give 'all', a range 'start:stop[:step]' (step >= 1) or "
                         f"comma-separated layers") from None
    if not layers:
        raise InputError(f"--layers {spec!r} names no layer")
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise InputError(f"--layers {spec!r}: layer(s) {bad} out of range; the model has layers 0..{n_layers - 1}")
    if len(set(layers)) != len(layers):
        raise InputError(f"--layers {spec!r} names a layer twice")
    return layers


def swept_peak(sweep: LayerSweepResult) -> int:
    """The layer among the swept ones whose MLP trace score is highest (the first of ties, as argmax)."""
    return max(sweep.layers, key=lambda layer: (sweep.trace_scores[layer], -layer))


@torch.no_grad()
def knows(model, record) -> bool:
    """The model's greedy next token after the prompt is the first token of ``target_true``."""
    ids = torch.tensor([model.encode(record.prompt)], device=model.device)
    top = int(model.bridge(ids)[0, -1].argmax())
    return top == encode_target(model, record.prompt, record.target_true)[0]


def known_records(model, records, n: int, seed: int, known=knows) -> tuple[list, int]:
    """The first ``n`` records, in a seeded random order, that ``known(model, record)``; and how many were drawn
    (tested) to find them. The order does not depend on ``n``, so a smaller run's facts begin a larger run's."""
    order = list(records)
    random.Random(seed).shuffle(order)
    out, drawn = [], 0
    for r in order:
        if len(out) == n:
            break
        drawn += 1
        if known(model, r):
            out.append(r)
    return out, drawn


class StatsClock:
    """A ``layer_sweep`` progress callback recording the CPU seconds each swept layer spent computing ROME's key
    statistics (reported only for layers whose statistics were not yet cached): ``{layer: seconds}``."""

    def __init__(self, layers: list[int]):
        self.layers, self.current, self.start, self.seconds = layers, None, None, {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.process_time()
        if stage == "layer":
            self.current = self.layers[done] if done < len(self.layers) else None
            self.start = None
        elif stage == "stats" and self.current is not None:
            if self.start is None:
                self.start = now
            self.seconds[self.current] = now - self.start


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def analyse(traces, sweeps, config, swept: list[int], extended: bool) -> tuple[dict, list[str], object]:
    """The study's numbers, its results.md lines and the averaged trace (a TraceSummary). ``extended`` (a model without a world, or a layer subset)
    adds the trace peak over all layers beside the one among the swept layers; without it the output is the
    embedded study's as first published."""
    summary = summarize_traces(traces)
    peaks = [swept_peak(s) for s in sweeps]  # == s.trace_peak when every layer is swept
    same = [p == s.best_layer for p, s in zip(peaks, sweeps)]
    lo, hi = wilson(sum(same), len(same))
    per_layer = []
    for layer in swept:
        rows = [s.rows[s.layers.index(layer)] for s in sweeps]
        entry = {"layer": layer, "trace_effect": mean_ci([s.trace_effects[layer] for s in sweeps])[0]}
        for k in (*SUCCESS_KEYS, "score"):
            vals = [harmonic(r) if k == "score" else r[k] for r in rows]
            vals = [v for v in vals if v is not None]
            entry[k] = sum(vals) / len(vals) if vals else None
        entry["refused"] = sum(r["error"] is not None for r in rows)
        per_layer.append(entry)
    # Across facts and layers: does a layer's trace effect predict its edit's score there (Hase et al.)?
    xs, ys = [], []
    for s in sweeps:
        for j, layer in enumerate(s.layers):
            h = harmonic(s.rows[j])
            if h is not None:
                xs.append(s.trace_effects[layer])
                ys.append(h)
    scored = [(p, s) for p, s in zip(peaks, sweeps) if s.best_layer is not None]  # all, unless every edit refused
    at_peak = {k: interval([s.rows[s.layers.index(p)][k] or 0.0 for p, s in scored], (0, 1)) for k in SUCCESS_KEYS}
    at_best = {k: interval([s.rows[s.layers.index(s.best_layer)][k] or 0.0 for _, s in scored], (0, 1))
               for k in SUCCESS_KEYS}
    # With one record the successes are 0/1, so several layers often share the best score: is the peak among them?
    tied = [harmonic(s.rows[s.layers.index(p)]) == harmonic(s.rows[s.layers.index(s.best_layer)])
            for p, s in scored]
    tlo, thi = wilson(sum(tied), len(tied))
    n = len(sweeps)
    result = {
        "n": n,
        "peak_is_best": {"value": sum(same) / n, "lo": lo, "hi": hi, "count": sum(same)},
        "peak_scores_as_well_as_best": {"value": sum(tied) / len(tied), "lo": tlo, "hi": thi, "count": sum(tied)},
        "trace_peaks": dict(sorted(Counter(s.trace_peak for s in sweeps).items())),
        "best_layers": dict(sorted(Counter(s.best_layer for s in sweeps).items())),
        "mean_abs_distance": sum(abs(p - s.best_layer) for p, s in scored) / len(scored),
        "score_at_trace_peak": at_peak, "score_at_best_layer": at_best,
        "per_layer": per_layer,
        "trace_effect_vs_edit_score_pearson": pearson(xs, ys),
        "trace_summary_peaks": {k: summary.peak(k) for k in config.kinds},
        "facts": [{"prompt": s.request["template"].format(s.request["subject"]), "trace_peak": s.trace_peak,
                   "best_layer": s.best_layer, "trace_effects": s.trace_effects,
                   "scores": [harmonic(r) for r in s.rows]} for s in sweeps],
    }
    if extended:
        result["swept_layers"] = list(swept)
        result["trace_peaks_among_swept"] = dict(sorted(Counter(peaks).items()))
        result["peak_all_layers_is_swept"] = sum(s.trace_peak in s.layers for s in sweeps)
        result["mean_trace_effect_all_layers"] = [mean_ci([s.trace_effects[layer] for s in sweeps])[0]
                                                  for layer in range(sweeps[0].n_layers)]
        for f, p, s in zip(result["facts"], peaks, sweeps):
            f.update(trace_peak_among_swept=p, case_id=s.request.get("case_id"))
    p = result["peak_is_best"]
    pr = result["trace_effect_vs_edit_score_pearson"]
    peak_name = "Trace peak among the swept layers" if extended else "Trace peak"
    lines = [(f"{peak_name} = best edit layer: **{p['count']}/{n} = {p['value']:.2f}** "
              f"[{p['lo']:.2f}, {p['hi']:.2f}]; mean |peak − best| {result['mean_abs_distance']:.2f} layers; "
              f"Pearson(trace effect, edit score) over facts × layers {'–' if pr is None else f'{pr:.2f}'}."),
             (f"The trace peak's edit scores as well as the best layer's (ties counted): "
              f"{sum(tied)}/{n} = {sum(tied) / len(tied):.2f} [{tlo:.2f}, {thi:.2f}].")]
    if extended:
        lines.append("Trace peak over all layers (layer: facts): " + ", ".join(
            f"L{k}: {v}" for k, v in result["trace_peaks"].items()) + f"; it is a swept layer in "
            f"{result['peak_all_layers_is_swept']}/{n} facts.")
        lines += ["", ("| layer | mean MLP trace effect | ES | PS | NS | score | refused | trace peak (all layers) "
                       "here | trace peak among swept here | best swept here |"),
                  "|---|---|---|---|---|---|---|---|---|---|"]
    else:
        lines += ["", "| layer | mean MLP trace effect | ES | PS | NS | score | refused | trace peak here | best here |",
                  "|---|---|---|---|---|---|---|---|---|"]
    for e in per_layer:
        f = lambda v: "–" if v is None else f"{v:.2f}"
        among = f"{result['trace_peaks_among_swept'].get(e['layer'], 0)} | " if extended else ""
        lines.append(f"| {e['layer']} | {e['trace_effect']:.3f} | {f(e['efficacy_success'])} | "
                     f"{f(e['paraphrase_success'])} | {f(e['neighborhood_success'])} | {f(e['score'])} | "
                     f"{e['refused']} | {result['trace_peaks'].get(e['layer'], 0)} | {among}"
                     f"{result['best_layers'].get(e['layer'], 0)} |")
    lines += ["", "| edited at | ES | PS | NS |", "|---|---|---|---|"]
    peak_row = "trace peak among swept layers" if extended else "trace peak (layer=auto)"
    for name, d in ((peak_row, at_peak), ("best layer (oracle)", at_best)):
        lines.append(f"| {name} | " + " | ".join(f"{d[k][0]:.2f} [{d[k][1]:.2f}, {d[k][2]:.2f}]"
                                                 for k in SUCCESS_KEYS) + " |")
    if extended:
        eff = result["mean_trace_effect_all_layers"]
        lines += ["", "Mean MLP trace effect (subject's last token) at every layer: "
                  + ", ".join(f"L{i} {v:.3f}" for i, v in enumerate(eff)) + "."]
    return result, lines, summary


def write_outputs(out: Path, result: dict, lines: list[str], summary) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    summary.save(out / "summary.json")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    from plotly.subplots import make_subplots

    from mechedit.viz.export import write_png

    per_layer = result["per_layer"]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    layers = [e["layer"] for e in per_layer]
    fig.add_bar(x=layers, y=[e["score"] or 0 for e in per_layer], name="edit score at this layer (ROME S)")
    fig.add_scatter(x=layers, y=[e["trace_effect"] for e in per_layer], name="mean MLP trace effect",
                    mode="lines+markers", secondary_y=True)
    fig.update_layout(title=f"Where to edit: trace effect vs ROME edit score by layer ({result['n']} facts)",
                      xaxis_title="layer")
    write_png(fig, out / "layers.png")
    write_png(summary.plot(), out / "summary.png")


def run_embedded(args, config_for) -> None:
    """The embedded world's study, as first published (output unchanged)."""
    started = time.perf_counter()
    model = mechedit.load()
    records = world_records(World.load(model.path / "world.json"), n=args.n, seed=args.seed)
    swept = parse_layers(args.layers, model.n_layers)
    extended = swept != list(range(model.n_layers))
    config = config_for(model)
    traces, sweeps = [], []
    for i, r in enumerate(records, start=1):
        traces.append(causal_trace(model, r.prompt, r.subject, r.target_true, config))
        sweeps.append(layer_sweep(model, r, layers=swept))
        s = sweeps[-1]
        print(f"[{i}/{len(records)}] trace peak {s.trace_peak}, best edit layer {s.best_layer}  {r.prompt!r}",
              flush=True)
    result, lines, summary = analyse(traces, sweeps, config, swept, extended)
    head = {"n": result.pop("n"), "seed": args.seed, "threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - started, 1)}
    write_outputs(args.out, {**head, **result}, lines, summary)


def run_model(args, config_for) -> None:
    """A model without a world: known CounterFact facts, pinned ROME, resumable per fact."""
    from mechedit.data import read_counterfact
    from mechedit.editing.methods import make_hparams

    started, cpu_started = time.perf_counter(), time.process_time()
    if args.model not in PINNED:
        raise InputError(f"no pinned ROME hyperparameters for {args.model!r}; this script knows "
                         f"{', '.join([EMBEDDED, *PINNED])}")
    hp = make_hparams("rome", dict(PINNED[args.model]))
    model = mechedit.load(args.model)
    swept = parse_layers(args.layers, model.n_layers)
    config = config_for(model)
    records, drawn = known_records(model, read_counterfact(args.data), args.n, args.seed)
    print(f"{len(records)} facts the model knows (greedy first token = target_true's) in the first {drawn} "
          f"drawn (seed {args.seed}) from {args.data}", flush=True)
    settings = {"model": model.name, "model_fingerprint": model.fingerprint(), "seed": args.seed,
                "layers": swept, "trace_config": config.to_dict(), "hparams": hp.to_dict()}
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "facts.jsonl"
    done = {}
    for e in read_jsonl(log):
        if e["settings"] != settings:
            raise SystemExit(f"{log} holds facts run with other settings (case {e['case_id']}); use another --out "
                             f"or remove that file")
        done[e["case_id"]] = e
    for i, r in enumerate(records, start=1):
        if r.case_id in done:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        entry = {"case_id": r.case_id, "settings": settings}
        try:
            trace = causal_trace(model, r.prompt, r.subject, r.target_true, config)
            t1, c1 = time.perf_counter(), time.process_time()
            stats = StatsClock(swept)
            sweep = layer_sweep(model, r, hp, layers=swept, progress=stats)
        except InputError as e:  # e.g. a subject the prompt does not hold as tokens: say so, keep going
            entry["skipped"] = str(e)
        else:
            entry.update(trace=trace.to_json_dict(), sweep=sweep.to_json_dict(),
                         trace_cpu_seconds=c1 - c0, trace_wall_seconds=t1 - t0,
                         sweep_cpu_seconds=time.process_time() - c1, sweep_wall_seconds=time.perf_counter() - t1,
                         stats_cpu_seconds=stats.seconds)
        entry.update(cpu_seconds=time.process_time() - c0, wall_seconds=time.perf_counter() - t0,
                     threads=torch.get_num_threads(), load_average=os.getloadavg()[0])
        with log.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        done[r.case_id] = entry
        what = (f"skipped: {entry['skipped']}" if "skipped" in entry else
                f"trace peak {sweep.trace_peak} (among swept {swept_peak(sweep)}), best edit layer {sweep.best_layer}")
        print(f"[{i}/{len(records)}] {what}; {entry['cpu_seconds']:.0f} CPU-s, {entry['wall_seconds']:.0f} s  "
              f"{r.prompt!r} -> {r.target_true!r}", flush=True)

    entries = [done[r.case_id] for r in records]
    kept = [e for e in entries if "skipped" not in e]
    if not kept:
        raise SystemExit("every fact was skipped; nothing to report")
    traces = [CausalTraceResult.from_json_dict(e["trace"]) for e in kept]
    sweeps = [LayerSweepResult.from_json_dict(e["sweep"]) for e in kept]
    result, lines, summary = analyse(traces, sweeps, config, swept, extended=True)
    cpus = [e["cpu_seconds"] for e in kept]
    head = {
        "model": model.name, "model_fingerprint": settings["model_fingerprint"], "data": str(args.data),
        "n": result.pop("n"), "drawn": drawn, "known": len(records),
        "skipped": {e["case_id"]: e["skipped"] for e in entries if "skipped" in e},
        "seed": args.seed, "threads": torch.get_num_threads(), "layers": swept,
        "trace_config": config.to_dict(), "hparams": hp.to_dict(),
        # this invocation (facts already in facts.jsonl cost nothing here) and each fact as it was measured
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "per_fact": {"cpu_seconds_median": statistics.median(cpus), "cpu_seconds_range": [min(cpus), max(cpus)],
                     "cpu_seconds_sum": sum(cpus),
                     "trace_cpu_seconds_median": statistics.median(e["trace_cpu_seconds"] for e in kept),
                     "sweep_cpu_seconds_median": statistics.median(e["sweep_cpu_seconds"] for e in kept),
                     "wall_seconds_sum": sum(e["wall_seconds"] for e in kept),
                     "threads": sorted({e["threads"] for e in kept}),
                     # key statistics computed during the run (layers not yet cached), CPU seconds per layer
                     "stats_cpu_seconds": {str(k): v for e in kept for k, v in e.get("stats_cpu_seconds", {}).items()},
                     "load_average_mean": statistics.mean(e["load_average"] for e in kept)},
    }
    lines = [(f"{model.name}: {head['n']} facts it knows (of {drawn} CounterFact records drawn, seed {args.seed}); "
              f"ROME swept over layers {swept}; trace: {config.samples} samples, kinds {list(config.kinds)}, "
              f"window {config.window}."), "", *lines]
    write_outputs(args.out, {**head, **result}, lines, summary)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=EMBEDDED, help=f"{EMBEDDED} (the world model, default) or smollm2-135m")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--data", type=Path, default=SHARED, help="CounterFact file (models without a world)")
    ap.add_argument("--layers", default=None,
                    help="layers the sweep edits: 'all' (default), 'start:stop[:step]' or e.g. '0,3,6'; the trace "
                         "is always over every layer")
    ap.add_argument("--trace-samples", type=int, default=10, help="noise samples per traced cell (ROME: 10)")
    ap.add_argument("--trace-kinds", default="hidden,mlp,attn", help="states traced for the averaged picture")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, OMP_NUM_THREADS)")
    ap.add_argument("--out", type=Path, default=Path("docs/results/locate-then-edit"))
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kinds = tuple(k.strip() for k in args.trace_kinds.split(",") if k.strip())

    def config_for(model) -> CausalTraceConfig:
        return CausalTraceConfig(window=scaled_window(model.n_layers), kinds=kinds, samples=args.trace_samples,
                                 seed=args.seed)

    if args.model == EMBEDDED:
        run_embedded(args, config_for)
    else:
        run_model(args, config_for)


if __name__ == "__main__":
    main()
