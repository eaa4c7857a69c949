"""MEMIT at scale on the embedded model: one call with N embedded-world requests (default 1,000), timed, and
the efficacy of the result (ES: p(new) > p(true) on the edit prompt, PS on the paraphrase, NS on the neighbour;
:func:`mechedit.evaluation.counterfact.rewrite_scores`), with 95% Wilson intervals. The issue's target: 1,000
requests in <= 60 s on CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_memit.py --n 1000
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_memit.py --n 1000 --reference   # the earlier value path
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_memit.py --n 200 --values-only --repeat 2

Key statistics are read from the cache (computed first, outside the timing, when missing). The time is split
into the stages MEMIT reports through ``progress``; wall and CPU seconds (``time.process_time``: this process,
all its threads), the thread count and the 1-minute load average before and after are printed with it: on a
shared machine CPU seconds are the steadier measure.

``--values-only`` times only the value optimisation (the stage this work changed), the fast path
(:func:`~mechedit.editing.memit.compute_zs.compute_zs`) and the earlier one
(:func:`~mechedit.editing.memit.compute_zs.compute_zs_reference`) interleaved ``--repeat`` times on the same
prepared requests, and prints the ratio of their CPU seconds and how far apart their δ are.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", default="0,1,2")
    ap.add_argument("--hp", nargs="*", default=[], help="MEMITHyperParams overrides, name=value")
    ap.add_argument("--reference", action="store_true", help="use the earlier (whole-stack) value optimisation")
    ap.add_argument("--values-only", action="store_true", help="time fast and reference value paths, interleaved")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of the --values-only comparison")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import mechedit
    from mechedit.editing.memit import MEMITHyperParams
    from mechedit.toy.export import embedded_world, world_records

    model = mechedit.load()
    records = world_records(embedded_world(), n=args.n, seed=args.seed)
    hp = MEMITHyperParams(layers=tuple(int(x) for x in args.layers.split(","))).with_overrides(args.hp)
    out = values_only(model, records, hp, args.repeat) if args.values_only else full(model, records, hp, args)
    out.update({"n_requests": args.n, "seed": args.seed, "threads": torch.get_num_threads(),
                "cores": os.cpu_count(), "hparams": hp.to_dict(), "torch": torch.__version__})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def full(model, records, hp, args) -> dict:
    from mechedit.editing.memit import compute_zs as zs_module
    from mechedit.editing.memit import memit_main
    from mechedit.evaluation.counterfact import rewrite_scores
    from mechedit.evaluation.stats import wilson

    memit_main.layer_statistics(model, hp.layers, hp, None, None)  # warm the cache outside the timing
    if args.reference:  # the earlier value path, through the same memit call
        memit_main.compute_zs = zs_module.compute_zs_reference
    stages: dict[str, float] = {}
    mark = [time.perf_counter()]

    def progress(stage, done, total):  # time since the last call goes to the stage now reporting
        now = time.perf_counter()
        if stage == "value" and done == 0:
            stage = "prepare"  # context templates, tokenizing, residuals before the value optimisation starts
        stages[stage] = stages.get(stage, 0.0) + now - mark[0]
        mark[0] = now

    load = os.getloadavg()[0]
    c0, t0 = time.process_time(), time.perf_counter()
    mark[0] = t0
    try:
        handle = memit_main.memit(model, records, hp, progress)
    finally:
        memit_main.compute_zs = zs_module.compute_zs
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    load_after = os.getloadavg()[0]
    scores = [rewrite_scores(model, r) for r in records]
    handle.restore()

    def rate(key):
        vals = [s[key] for s in scores if s[key] is not None]
        k, n = sum(vals), len(vals)
        lo, hi = wilson(k, n)
        return {"value": round(100.0 * k / n, 1), "ci95": [round(100 * lo, 1), round(100 * hi, 1)], "n": n}

    out = {"path": "reference" if args.reference else "fast", "seconds": round(seconds, 1),
           "cpu_seconds": round(cpu, 1), "target_seconds": 60.0, "ratio_to_target": round(seconds / 60.0, 2),
           "load_average_1min": [round(load, 1), round(load_after, 1)],
           "stages_seconds": {k: round(v, 1) for k, v in stages.items()},
           "ES": rate("efficacy_success"), "PS": rate("paraphrase_success"), "NS": rate("neighborhood_success"),
           "update_ratio": [p["update_ratio"] for p in handle.evidence["per_layer"]],
           "target_prob_mean": handle.evidence["target_prob_mean"], "v_steps_mean": handle.evidence["v_steps_mean"],
           "residual_left_fraction_mean": handle.evidence["residual_left_fraction_mean"]}
    print(f"MEMIT ({out['path']} values), {len(records)} requests in one call: {seconds:.1f} s wall, {cpu:.1f} s CPU "
          f"on {torch.get_num_threads()} thread(s) (1-min load average {load:.1f} -> {load_after:.1f} on "
          f"{os.cpu_count()} cores); target 60 s -> {out['ratio_to_target']}x")
    print(f"  stages (wall): {out['stages_seconds']}")
    print("  " + "  ".join(f"{k} {out[k]['value']:.1f} [{out[k]['ci95'][0]}, {out[k]['ci95'][1]}]"
                           for k in ("ES", "PS", "NS"))
          + f"  ‖ΔW‖/‖W‖ per layer {[round(r, 2) for r in out['update_ratio']]}")
    return out


def values_only(model, records, hp, repeat: int) -> dict:
    from mechedit.editing.memit.compute_ks import prepare, read_resid
    from mechedit.editing.memit.compute_zs import compute_zs, compute_zs_reference
    from mechedit.editing.rome import context_templates
    from mechedit.editing.training import unbridged_copy

    prep = prepare(model, records, context_templates(model, hp), hp.key_position)
    z = read_resid(model, prep, hp.layers[-1])
    hf = unbridged_copy(model)
    runs, deltas = [], {}
    for r in range(repeat):
        for name, f in (("reference", compute_zs_reference), ("fast", compute_zs)):
            load = os.getloadavg()[0]
            c0, t0 = time.process_time(), time.perf_counter()
            v = f(model, prep, hp.layers[-1], z, hp, hf=hf)
            runs.append({"path": name, "round": r, "cpu_seconds": round(time.process_time() - c0, 2),
                         "seconds": round(time.perf_counter() - t0, 2), "load_average_1min": round(load, 1),
                         "steps_mean": float(v.steps.float().mean()), "target_prob_mean": float(v.target_prob.mean())})
            deltas[name] = v.delta
            print(f"  round {r} {name:9s} {runs[-1]['cpu_seconds']:7.1f} CPU-s {runs[-1]['seconds']:7.1f} s wall "
                  f"(load {load:.1f})", flush=True)
    cpu = {p: sum(x["cpu_seconds"] for x in runs if x["path"] == p) for p in ("reference", "fast")}
    wall = {p: sum(x["seconds"] for x in runs if x["path"] == p) for p in ("reference", "fast")}
    rel = ((deltas["fast"] - deltas["reference"]).norm(dim=1) / deltas["reference"].norm(dim=1).clamp_min(1e-12))
    out = {"values_only": True, "runs": runs, "ratio_cpu": round(cpu["reference"] / cpu["fast"], 2),
           "ratio_wall": round(wall["reference"] / wall["fast"], 2), "delta_rel_diff_max": float(rel.max())}
    print(f"value optimisation, {len(records)} requests, {torch.get_num_threads()} thread(s): reference / fast = "
          f"{out['ratio_cpu']}x CPU, {out['ratio_wall']}x wall; δ apart by at most {out['delta_rel_diff_max']:.1e} "
          "(relative)")
    return out


if __name__ == "__main__":
    main()
