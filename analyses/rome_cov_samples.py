"""How many covariance samples does ROME need? Edit quality and cost against ``mom2_n_samples`` on the embedded
model.

ROME's update direction is ``u = C⁻¹k*`` with ``C`` the second moment of the MLP keys over ordinary text; the
paper read 100,000 Wikipedia records (hours on a GPU for GPT-2 XL) and users' main complaint is that cost. Here
each setting of ``--samples`` (0 = no statistics, ``C = I``) edits the same ``--records`` embedded-world records
(:func:`mechedit.toy.export.world_records`) one at a time at ``--layer`` (restored after each) and measures:

* ES / PS / NS: CounterFact's efficacy, paraphrase and neighbourhood success of each record
  (:func:`mechedit.evaluation.counterfact.rewrite_scores`), averaged, with their magnitudes;
* drift on other facts: over ``--others`` world facts not being edited, the mean absolute change of the
  log-probability of their true object (per-token mean), and the share whose true object is no longer preferred
  to every other object of its relation: what a better ``C`` should protect;
* cost: seconds to compute the statistics from scratch (streamed world-corpus texts, in a fresh cache) and the
  median seconds per edit once they are cached.

Writes ``results.json``, ``results.md`` (the table) and ``figure.html``/``figure.png`` to ``--out``.

    OMP_NUM_THREADS=1 python analyses/rome_cov_samples.py --out docs/results/rome-cov-samples
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

KEYS = ("efficacy_success", "paraphrase_success", "neighborhood_success",
        "efficacy_magnitude", "paraphrase_magnitude", "neighborhood_magnitude")


def other_fact_probes(world, exclude: set[str], n: int, seed: int) -> list[tuple[str, str, list[str]]]:
    """(prompt, true object, the relation's objects) for ``n`` world facts whose subject is not edited."""
    facts = [f for f in world.facts if f.subject not in exclude]
    picked = random.Random(seed).sample(facts, min(n, len(facts)))
    out = []
    for f in picked:
        spec = world.relations[f.relation]
        out.append((spec["train"][0].replace("{}", f.subject), f.object, list(spec["objects"])))
    return out


def probe_nll(model, probes) -> torch.Tensor:
    """(n_probes, n_objects_max) per-token NLL of every object of each probe's relation (inf for padding)."""
    from mechedit.evaluation.counterfact import answer_nll

    pairs = [(p, o) for p, _, objs in probes for o in objs]
    nll = answer_nll(model, pairs, batch_size=128)
    width = max(len(objs) for _, _, objs in probes)
    out = torch.full((len(probes), width), float("inf"))
    i = 0
    for r, (_, _, objs) in enumerate(probes):
        out[r, :len(objs)] = nll[i:i + len(objs)]
        i += len(objs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", default="0,100,300,1000,3000,10000", help="mom2_n_samples settings (0: C = I)")
    ap.add_argument("--records", type=int, default=30)
    ap.add_argument("--others", type=int, default=200)
    ap.add_argument("--layer", type=int, default=1, help="edit layer (the embedded model's MLP trace peak)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/rome-cov-samples"))
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="only combine the results.json of these runs (e.g. settings run in parallel) into --out")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    torch.set_num_threads(args.threads)
    os.environ["MECHEDIT_CACHE"] = tempfile.mkdtemp(prefix="mechedit-cov-")  # statistics timed from scratch

    import mechedit
    from mechedit.editing import ROMEHyperParams, rome
    from mechedit.editing.rome.layer_stats import layer_stats
    from mechedit.errors import MecheditError
    from mechedit.evaluation.counterfact import rewrite_scores
    from mechedit.toy.export import world_records
    from mechedit.toy.world import World

    model = mechedit.load()
    world = World.load(model.path / "world.json")
    records = world_records(world, args.records, seed=args.seed)
    probes = other_fact_probes(world, {r.subject for r in records}, args.others, args.seed)
    true_idx = torch.tensor([objs.index(o) for _, o, objs in probes])
    base = probe_nll(model, probes)  # (P, O)
    base_true = base[torch.arange(len(probes)), true_idx]
    base_ok = base.argmin(dim=1) == true_idx  # probes the unedited model gets right
    unedited = [rewrite_scores(model, r) for r in records]
    settings = [int(s) for s in args.samples.split(",")]
    results = []
    for n in settings:
        hp = ROMEHyperParams(layer=args.layer, mom2_adjustment=n > 0, mom2_n_samples=max(n, 1))
        stats_s = None
        stats_info = None
        stats_cpu = None
        if n > 0:
            t0, c0 = time.perf_counter(), time.process_time()
            stats = layer_stats(model, args.layer, hp.mom2_source, n, max_tokens=hp.mom2_max_tokens)
            stats_s, stats_cpu = time.perf_counter() - t0, time.process_time() - c0
            cond = torch.linalg.cond(stats.mom2).item()
            stats_info = {"n_samples": stats.n_samples, "n_tokens": stats.n_tokens, "condition_number": cond}
        per = []
        for rec in records:
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                handle = rome(model, rec, hp)
            except MecheditError as e:  # a degenerate update (e.g. too few statistics): nothing changed
                per.append({"case_id": rec.case_id, "refused": str(e)})
                continue
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            try:
                scores = rewrite_scores(model, rec)
                nll = probe_nll(model, probes)
            finally:
                handle.restore()
            true_nll = nll[torch.arange(len(probes)), true_idx]
            flipped = (nll.argmin(dim=1) != true_idx) & base_ok
            per.append({"case_id": rec.case_id, "seconds": seconds, "cpu_seconds": cpu, **{k: scores[k] for k in KEYS},
                        "drift": float((true_nll - base_true).abs().mean()),
                        "flipped": float(flipped.float().sum() / base_ok.float().sum()),
                        "update_ratio": handle.evidence["update_ratio"],
                        "key_alignment": handle.evidence["key_alignment"]})
        done = [p for p in per if "refused" not in p]
        row = {"mom2_n_samples": n, "stats": stats_info, "stats_seconds": stats_s, "stats_cpu_seconds": stats_cpu, "n_edited": len(done),
               "n_refused": len(per) - len(done),
               "edit_seconds_median": statistics.median(p["seconds"] for p in done) if done else None,
               "edit_cpu_seconds_median": statistics.median(p["cpu_seconds"] for p in done) if done else None,
               **{k: statistics.mean(p[k] for p in done) if done else None
                  for k in (*KEYS, "drift", "flipped", "update_ratio", "key_alignment")},
               "records": per}
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "records"}), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": model.name, "model_fingerprint": model.fingerprint(), "layer": args.layer,
            "records": args.records, "others": args.others, "seed": args.seed, "threads": torch.get_num_threads(),
            "load_average": os.getloadavg()[0], "corpus_texts": stats_info["n_samples"] if stats_info else None,
            "unedited": {k: statistics.mean(u[k] for u in unedited) for k in KEYS},
            "others_right_unedited": float(base_ok.float().mean())}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    write_table(args.out, meta, results)
    write_figure(args.out, results)


def merge(runs: list[Path], out: Path) -> None:
    """One table and figure from several runs of the same records, model and layer."""
    parts = [json.loads((run / "results.json").read_text()) for run in runs]
    same = ("model_fingerprint", "layer", "records", "others", "seed", "unedited")
    for p in parts[1:]:
        if any(p["meta"][k] != parts[0]["meta"][k] for k in same):
            raise SystemExit("these runs are not of the same records, model, layer and probes")
    meta = {**parts[0]["meta"], "load_average": max(p["meta"]["load_average"] for p in parts),
            "merged_from": [str(r) for r in runs]}
    results = sorted((r for p in parts for r in p["results"]), key=lambda r: r["mom2_n_samples"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    write_table(out, meta, results)
    write_figure(out, results)


def write_table(out: Path, meta: dict, results: list[dict]) -> None:
    u = meta["unedited"]
    lines = [
        f"# ROME vs number of covariance samples (embedded model, layer {meta['layer']}, {meta['records']} records)",
        "",
        (f"ES/PS/NS: mean success over the records (%); drift: mean |Δ log p| of the true object on {meta['others']} "
        "other facts; flipped: share of those (answered right before) whose true object is no longer the relation's "
        f"most likely object. Unedited: ES {100 * u['efficacy_success']:.1f}, PS {100 * u['paraphrase_success']:.1f}, "
        f"NS {100 * u['neighborhood_success']:.1f}. {meta['threads']} thread(s), load average "
        f"{meta['load_average']:.1f} on a shared 2-core machine (wall times inflate with load)."), "",
        ("| samples | tokens | cond(C) | stats s (CPU) | edit s (median, CPU) | refused | ES | PS | NS | EM | PM | NM "
         "| drift | flipped |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    def pct(v) -> str:
        return "–" if v is None else f"{100 * v:.1f}"

    def num(v, f: str = ".3f") -> str:
        return "–" if v is None else format(v, f)

    for r in results:
        s = r["stats"]
        lines.append(
            f"| {r['mom2_n_samples'] or '0 (C = I)'} | {s['n_tokens'] if s else '–'} | "
            f"{num(s and s['condition_number'], '.2g')} | {num(r['stats_seconds'], '.1f')} "
            f"({num(r['stats_cpu_seconds'], '.1f')}) | {num(r['edit_seconds_median'], '.2f')} "
            f"({num(r['edit_cpu_seconds_median'], '.2f')}) | {r['n_refused']} | {pct(r['efficacy_success'])} | "
            f"{pct(r['paraphrase_success'])} | {pct(r['neighborhood_success'])} | {num(r['efficacy_magnitude'])} | "
            f"{num(r['paraphrase_magnitude'])} | {num(r['neighborhood_magnitude'])} | {num(r['drift'], '.4f')} | "
            f"{pct(r['flipped'])} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_figure(out: Path, results: list[dict]) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    xs = [max(r["mom2_n_samples"], 30) for r in results]  # 0 (C = I) drawn at the left edge
    labels = [str(r["mom2_n_samples"]) if r["mom2_n_samples"] else "C = I" for r in results]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["Edit quality", "Cost and side effects"],
                        specs=[[{}, {"secondary_y": True}]])
    for key, name, colour in (("efficacy_success", "ES", "#1f77b4"), ("paraphrase_success", "PS", "#2ca02c"),
                              ("neighborhood_success", "NS", "#d62728")):
        fig.add_trace(go.Scatter(x=xs, y=[r[key] for r in results], mode="lines+markers", name=name,
                                 line={"color": colour}, text=labels), row=1, col=1)
    fig.add_trace(go.Scatter(x=xs, y=[r["flipped"] for r in results], mode="lines+markers",
                             name="other facts flipped", line={"color": "#9467bd"}, text=labels), row=1, col=1)
    fig.add_trace(go.Scatter(x=xs, y=[r.get("stats_cpu_seconds") or 0 for r in results], mode="lines+markers",
                             name="statistics (CPU s)", line={"color": "#555555", "dash": "dash"}, text=labels),
                  row=1, col=2, secondary_y=False)
    fig.add_trace(go.Scatter(x=xs, y=[r["drift"] for r in results], mode="lines+markers", name="drift |Δ log p|",
                             line={"color": "#ff7f0e"}, text=labels), row=1, col=2, secondary_y=True)
    for c in (1, 2):
        fig.update_xaxes(type="log", title_text="covariance samples (texts)", tickvals=xs, ticktext=labels,
                         row=1, col=c)
    fig.update_yaxes(title_text="mean success / share", range=[0, 1.05], row=1, col=1)
    fig.update_yaxes(title_text="CPU seconds to compute C (1 thread)", row=1, col=2, secondary_y=False)
    fig.update_yaxes(title_text="mean |Δ log p(true)|", row=1, col=2, secondary_y=True)
    fig.update_layout(title="ROME on the embedded model vs number of covariance samples", width=1000, height=420)
    fig.write_html(out / "figure.html", include_plotlyjs="cdn")
    try:
        fig.write_image(out / "figure.png", scale=1.5)
    except Exception as e:  # kaleido / a browser missing: the HTML is written either way
        print(f"figure.png not written ({type(e).__name__}: {e})")


if __name__ == "__main__":
    main()
